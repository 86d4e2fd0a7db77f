"""Diagnostics: mask shares by token category under the real sampler, and the cloze probe's
examples and scoring."""

from __future__ import annotations

import dataclasses

import numpy as np

from meta_mask.evaluation import diagnostics
from meta_mask.policies.corrupt import corrupt_np
from tests.helpers import BART_SPECIAL

# Two rows: <s> name name t t VALUE VALUE t OTHER t </s>; row 1 has no asked value.
IDS = np.array(
    [[0, 10, 11, 20, 21, 30, 31, 22, 40, 23, 2], [0, 12, 13, 24, 25, 41, 26, 27, 28, 29, 2]]
)
VALID = np.ones(IDS.shape, bool)
VALID[:, 0] = VALID[:, -1] = False
BATCH = {
    "input_ids": IDS,
    "valid": VALID,
    "entity_spans": np.array([[[1, 3], [5, 7], [8, 9]], [[1, 3], [5, 6], [-1, -1]]]),
    "example_ids": np.array([0, 1]),
}
TYPES = [["name", "birth_city", "school"], ["name", "club"]]


def scorer_preferring(category: int):
    """Scores every token of one category highest (token units)."""
    cats = diagnostics.token_categories(BATCH, TYPES, asked=("birth_city",))

    def scorer(batch, rng):
        scores = np.where(cats == category, 10.0, 0.0) + 0.01 * np.arange(IDS.shape[1])
        units = np.where(batch["valid"], np.arange(IDS.shape[1]), -1)
        return np.where(batch["valid"], scores, -np.inf).astype(np.float32), units

    return scorer


def test_token_categories_follow_the_typed_spans():
    cats = diagnostics.token_categories(BATCH, TYPES, asked=("birth_city",))
    names = [diagnostics.CATEGORIES[c] for c in cats[0]]
    assert names[1:3] == ["names", "names"] and names[5:7] == ["asked_values"] * 2
    assert names[8] == "other_values" and names[3] == "template"


def test_mask_shares_sum_to_one_and_follow_the_scores():
    asked = diagnostics.CATEGORIES.index("asked_values")
    shares = diagnostics.mask_shares(
        scorer_preferring(asked), BATCH, TYPES, {"mask_rate": 0.2}, asked=("birth_city",)
    )
    assert abs(sum(v for k, v in shares.items() if k != "mask_rate") - 1.0) < 1e-9
    # Row 0 masks its two asked tokens; row 1 has none, so its 2 masked tokens go elsewhere.
    assert shares["mask_asked_values"] == 0.5
    assert shares["mask_rate"] == 4 / VALID.sum()


def test_cloze_examples_mask_each_asked_value_alone_and_the_probe_scores_exact_spans():
    def corrupt(ids, mask):
        return corrupt_np(
            ids, mask, output_format="masked_spans", enc_len=11, dec_len=6,
            special=dataclasses.replace(BART_SPECIAL, sentinels=(100, 101)),
        )  # fmt: skip

    examples, gold = diagnostics.cloze_examples(
        BATCH, TYPES, ("birth_city", "club"), corrupt=corrupt
    )
    assert gold == [[30, 31], [41]]
    np.testing.assert_array_equal(examples["labels"][0][:4], [100, 30, 31, 2])
    assert 100 in examples["input_ids"][0] and 30 not in examples["input_ids"][0]

    def generate(params, input_ids):  # right for the first value (then guesses another span)
        out = np.full((len(input_ids), 7), 1)
        out[:, 0] = 2
        out[0, 1:7] = [100, 30, 31, 101, 41, 2]
        out[1, 1:4] = [100, 99, 2]
        return out

    score = diagnostics.cloze_probe(
        generate, None, examples, gold, sentinel=100, stop=(2, 100, 101), batch_size=4
    )
    assert score == 0.5
