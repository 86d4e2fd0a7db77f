"""The meta learner's batches: the inner contexts, their own questions, questions about other
contexts (contrast) and the in-loop QA step's questions, as a pure function of (seed, step)."""

from __future__ import annotations

import numpy as np
import pytest

from meta_mask.config import MetaConfig
from meta_mask.data.seq2seq import EncodedExamples
from meta_mask.errors import UserError
from meta_mask.policies.meta_train import meta_batch
from tests.helpers import BART_SPECIAL as SPECIAL

N = 24  # triples: 12 "people", two facts each, their two contexts name both answers


def triples():
    out = []
    for i in range(N):
        person = i // 2
        text = f"person{person} lives in city{person} and works at firm{person}"
        out.append(
            {
                "input_ids": np.asarray([0, 10 + i, 11, 12, 2], np.int32),
                "word_ids": np.asarray([-1, 0, 1, 2, -1], np.int32),
                "answer_labels": np.asarray([0, 1, 0, 0, 0], np.int32),
                "text": text,
                "answer": f"city{person}" if i % 2 == 0 else f"firm{person}",
                "question": f"q{i}",
            }
        )
    return out


QA = EncodedExamples(  # row i's question is i + 5 repeated: rows_of can find it again
    np.repeat(np.arange(5, 5 + N, dtype=np.int32)[:, None], 5, axis=1),
    np.full((N, 4), 7, np.int32),
    0,
    0,
)


def cfg(**kw):
    base = dict(inner_steps=1, inner_batch_size=4, outer_batch_size=4, mask_rate=0.25)
    return MetaConfig(**{**base, **kw})


def rows_of(batch):
    """The triple rows a Seq2SeqBatch came from (QA's encoder rows are distinct)."""
    return [int(np.flatnonzero((QA.input_ids == r).all(1))[0]) for r in batch["input_ids"]]


def test_contrast_questions_are_about_other_people_and_the_qa_step_about_yet_others():
    t = triples()
    out = meta_batch(t, QA, 3, cfg(downstream_steps=1), special=SPECIAL, seed=0, length=8)
    inner = out["inner"]["example_ids"][0].tolist()
    own, contrast, qa = rows_of(out["outer"]), rows_of(out["contrast"]), rows_of(out["qa"])
    assert own == inner  # the inner contexts' own questions
    inner_people = {i // 2 for i in inner}
    assert not {i // 2 for i in contrast} & inner_people  # no answer in the inner contexts
    assert not {i // 2 for i in qa} & inner_people and not set(qa) & set(contrast)
    again = meta_batch(t, QA, 3, cfg(downstream_steps=1), special=SPECIAL, seed=0, length=8)
    assert rows_of(again["contrast"]) == contrast and rows_of(again["qa"]) == qa
    other = meta_batch(t, QA, 4, cfg(downstream_steps=1), special=SPECIAL, seed=0, length=8)
    assert out["inner"]["example_ids"].tolist() != other["inner"]["example_ids"].tolist()


def test_n_qa_steps_take_n_batches_of_yet_other_questions_the_first_as_with_one():
    t = triples()
    one = meta_batch(t, QA, 3, cfg(downstream_steps=1), special=SPECIAL, seed=0, length=8)
    two = meta_batch(t, QA, 3, cfg(downstream_steps=2), special=SPECIAL, seed=0, length=8)
    qa = rows_of(two["qa"])
    assert len(qa) == 8 == len(set(qa))  # two steps' batches of 4, no question twice
    assert qa[:4] == rows_of(one["qa"])  # one step's batch is the first of two
    assert rows_of(two["contrast"]) == rows_of(one["contrast"])
    taken = {i // 2 for i in two["inner"]["example_ids"][0].tolist() + rows_of(two["contrast"])}
    assert not {i // 2 for i in qa} & taken  # about people neither scored nor contrasted


def test_dev_batches_take_the_qa_step_from_the_training_pool():
    dev = triples()[:8]  # 4 people: too few for own + contrast + QA questions of their own
    with pytest.raises(UserError, match="outer_batch_size"):
        meta_batch(dev, QA, 0, cfg(downstream_steps=1), special=SPECIAL, seed=1, length=8)
    pool = triples()
    out = meta_batch(
        dev, QA, 0, cfg(downstream_steps=1, contrastive=False), special=SPECIAL, seed=1,
        length=8, qa_pool=(pool, QA),
    )  # fmt: skip
    inner_people = {i // 2 for i in out["inner"]["example_ids"][0].tolist()}
    qa = rows_of(out["qa"])
    assert len(qa) == 4 and not {i // 2 for i in qa} & inner_people


def test_too_few_other_contexts_is_an_error_naming_the_flags():
    with pytest.raises(UserError, match="inner_batch_size"):
        meta_batch(triples(), QA, 0, cfg(inner_batch_size=20, outer_batch_size=20),
                   special=SPECIAL, seed=0, length=8)  # fmt: skip


def test_inner_repeat_trains_every_step_on_the_scored_contexts():
    t = triples()
    plain = meta_batch(t, QA, 2, cfg(inner_steps=3), special=SPECIAL, seed=0, length=8)
    ids = plain["inner"]["example_ids"]
    assert ids.shape == (3, 4) and len(set(ids.ravel().tolist())) == 12  # three batches
    assert rows_of(plain["outer"]) == ids[0].tolist()  # only the first batch's questions
    out = meta_batch(
        t, QA, 2, cfg(inner_steps=3, inner_repeat=True), special=SPECIAL, seed=0, length=8
    )
    ids = out["inner"]["example_ids"]
    tokens = out["inner"]["input_ids"]
    assert (ids == ids[0]).all() and (tokens == tokens[0]).all()
    assert rows_of(out["outer"]) == ids[0].tolist()  # every step's contexts are scored
    assert not {i // 2 for i in rows_of(out["contrast"])} & {i // 2 for i in ids[0].tolist()}
    # The step's contexts are the same as K = 1's: repeat only adds exposures.
    one = meta_batch(t, QA, 2, cfg(), special=SPECIAL, seed=0, length=8)
    assert ids[0].tolist() == one["inner"]["example_ids"][0].tolist()
