"""Diagnostics of a run on the synthetic world, reported beside its scores (never used to select
anything): where the masking policy puts its masks, and what intermediate pre-training stored.

- `mask_shares`: over corpus rows of held-out (dev) people, the share of the policy's masked
  tokens that fall on the values the task asks about, on other attribute values, on names,
  and on everything else (the template words), under the run's own budget and sampler. This is
  the mechanism a learned policy is supposed to find: at the same budget, masking the asked
  values more often is what can make it store more of what the task needs.
- `cloze_probe`: after intermediate pre-training, each asked value of held-out (test) people's
  corpus rows is masked alone (masked_spans format) and the LM generates it greedily; the
  probe is the fraction reproduced exactly. It measures storage, before fine-tuning has to
  extract it.

Both read gold entity spans typed by attribute (the world's corpus rows carry them as
"entity_types": "name", "birth_city", ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from meta_mask.policies.sampler import BatchRng, Scorer, mask_batch_np

CATEGORIES = ("asked_values", "other_values", "names", "template")


def token_categories(
    batch: Mapping[str, Any], entity_types: Sequence[Sequence[str]], asked: Sequence[str]
) -> np.ndarray:
    """Each token's category [B, L] as an index into CATEGORIES (template words by default)."""
    valid = np.asarray(batch["valid"], bool)
    out = np.full(valid.shape, CATEGORIES.index("template"), np.int8)
    for i, (spans, types) in enumerate(zip(batch["entity_spans"], entity_types, strict=True)):
        for (start, end), kind in zip(spans, types, strict=False):
            if start < 0:
                continue
            if kind == "name":
                category = "names"
            elif kind in asked:
                category = "asked_values"
            else:
                category = "other_values"
            out[i, start:end] = CATEGORIES.index(category)
    return out


def mask_shares(
    scorer: Scorer,
    batch: Mapping[str, Any],
    entity_types: Sequence[Sequence[str]],
    budget: Mapping[str, Any],
    *,
    asked: Sequence[str],
    draws: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """{"mask_<category>": share of masked tokens} over `draws` sampler draws of `scorer` on a
    policy batch (policies/mlm_batches.policy_batch) under `budget`, and "mask_rate"."""
    categories = token_categories(batch, entity_types, asked)
    counts = np.zeros(len(CATEGORIES), np.int64)
    valid = int(np.asarray(batch["valid"]).sum())
    for d in range(draws):
        rng = BatchRng(seed, d, np.asarray(batch["example_ids"]))
        mask = mask_batch_np(scorer, batch, rng, **budget)
        counts += np.bincount(categories[mask], minlength=len(CATEGORIES))
    total = max(int(counts.sum()), 1)
    shares = {f"mask_{name}": float(c / total) for name, c in zip(CATEGORIES, counts, strict=True)}
    return {**shares, "mask_rate": float(counts.sum() / max(valid * draws, 1))}


def cloze_examples(
    batch: Mapping[str, Any],
    entity_types: Sequence[Sequence[str]],
    asked: Sequence[str],
    *,
    corrupt,
) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """One masked_spans example per asked value of each row (that value alone masked), and the
    value's gold tokens. `corrupt(input_ids, mask)` writes the examples (corrupt_np with the
    run's format settings)."""
    ids = np.asarray(batch["input_ids"])
    rows, masks, gold = [], [], []
    for i, (spans, types) in enumerate(zip(batch["entity_spans"], entity_types, strict=True)):
        for (start, end), kind in zip(spans, types, strict=False):
            if start < 0 or kind not in asked:
                continue
            mask = np.zeros(ids.shape[1], bool)
            mask[start:end] = True
            rows.append(i)
            masks.append(mask)
            gold.append(ids[i, start:end].tolist())
    if not rows:
        return {}, []
    return corrupt(ids[np.asarray(rows)], np.stack(masks)), gold


def cloze_probe(
    generate,
    params: Any,
    examples: Mapping[str, np.ndarray],
    gold: Sequence[Sequence[int]],
    *,
    sentinel: int,
    stop: Sequence[int],
    batch_size: int = 64,
) -> float:
    """The fraction of `gold` values the LM reproduces exactly: `generate(params, input_ids)`
    (greedy, jitted) must emit <sentinel> value after its start token, the value ending at the
    first `stop` id (</s>, or the next span's sentinel: an LM trained on several spans per
    example may go on to guess another)."""
    if not gold:
        return float("nan")
    ids = np.asarray(examples["input_ids"])
    hits = 0
    for lo in range(0, len(ids), batch_size):
        chunk = ids[lo : lo + batch_size]
        real = len(chunk)
        if real < batch_size:  # one compiled shape: pad with copies of the first row
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
        out = np.asarray(generate(params, chunk))[:real]
        for row, want in zip(out, gold[lo : lo + real], strict=True):
            tokens = row[1:].tolist()  # after the decoder start token
            if tokens and tokens[0] == sentinel:
                tokens = tokens[1:]
            ends = [i for i, t in enumerate(tokens) if t in stop]
            got = tokens[: ends[0]] if ends else tokens
            hits += got == list(want)
    return hits / len(gold)


def world_diagnostics(
    batches: Any,
    doc_ids: Sequence[str],
    world: Any,
    asked: Sequence[str],
    *,
    generate,
    params: Any,
    special: Any,
    policy: Any,
    data: Any,
    max_rows: int = 512,
) -> dict[str, float]:
    """A world run's diagnostics: `mask_shares` of the run's policy (batches.scorer, the
    intermediate stage's MlmBatches; none for policy "none") on its dev people's corpus rows,
    and the `cloze_probe` of the LM `params` on its test people's rows (masked_spans runs
    only). `doc_ids` are the corpus rows' doc ids (the world's document ids, as strings)."""
    from meta_mask.policies.corrupt import corrupt_np

    def rows_of(split: str) -> np.ndarray:
        docs = {str(d) for d in world.person_rows(world.splits[split])}
        return np.asarray([i for i, d in enumerate(doc_ids) if str(d) in docs][:max_rows])

    out: dict[str, float] = {}
    if policy.name != "none":
        dev = batches.rows(rows_of("dev"))
        out.update(mask_shares(batches.scorer, dev, dev["entity_types"], policy.budget(),
                               asked=asked))  # fmt: skip
    if policy.output_format == "masked_spans":
        test = batches.rows(rows_of("test"))

        def corrupt(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
            return corrupt_np(
                ids, mask, output_format="masked_spans", enc_len=data.mlm_length,
                dec_len=data.mlm_target_length, special=special, infill=policy.infill,
            )  # fmt: skip

        examples, gold = cloze_examples(test, test["entity_types"], asked, corrupt=corrupt)
        sentinel = special.sentinels[0] if special.sentinels else special.mask
        out["cloze"] = cloze_probe(
            generate, params, examples, gold, sentinel=sentinel,
            stop=(special.eos, *special.sentinels),
        )  # fmt: skip
    return out
