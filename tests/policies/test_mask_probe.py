"""The reference masks of the meta-objective probe (policies/mask_probe.py)."""

import numpy as np

from meta_mask.policies import mask_probe


def test_reference_masks_add_equal_counts_of_each_kind_to_the_answer():
    # Row 0: answer at 1-2, subject at 5-7, entity tokens (not answer / subject) at 9-11,
    # template words elsewhere; row 1 has only one other-entity token: its count is 1.
    kinds = np.zeros((2, 16), np.int32)
    kinds[:, 1:3] = 1
    kinds[:, 5:8] = 2
    entity = np.zeros((2, 16), bool)
    entity[:, 1:3] = entity[:, 5:8] = True
    entity[0, 9:12] = True
    entity[1, 9] = True
    valid = np.ones((2, 16), bool)
    valid[:, 14:] = False
    masks = mask_probe.reference_masks(kinds, valid, entity, fill=2, seed=0)
    assert tuple(masks) == mask_probe.VARIANTS
    answer = kinds == 1
    np.testing.assert_array_equal(masks["answer"], answer)
    for name, pool in (
        ("answer+subject", kinds == 2),
        ("answer+other_entities", entity & (kinds == 0)),
        ("answer+other_words", valid & ~entity & (kinds == 0)),
    ):
        extra = masks[name] & ~answer
        assert (masks[name] & answer == answer).all(), name
        assert (extra <= pool).all(), name
        np.testing.assert_array_equal(extra.sum(1), [2, 1], err_msg=name)
    np.testing.assert_array_equal(masks["subject"], masks["answer+subject"] & ~answer)
    assert not (np.stack(list(masks.values())) & ~valid).any()


def test_probe_batches_with_inner_repeat_mask_the_same_contexts_afresh_at_every_step(tmp_path):
    import dataclasses

    from meta_mask.context import build_context
    from meta_mask.policies import learned, meta_train
    from tests.helpers import parse_config

    cfg = parse_config(["--flagfile=experiments/world_quick.flags", "--policy.name=meta"])
    ctx = build_context(cfg, tmp_path / "run", tmp_path / "cache")
    dev = ctx.examples(ctx.dev_split())
    _, triples = learned._meta_triples(
        cfg, dev, dev, ctx.tokenizer, "answers_and_question_entities",
        cfg.policy.salient_labels, None,
    )  # fmt: skip
    qa = meta_train.encode_questions(
        triples, ctx.tokenizer, ctx.special, cfg.data.source_length, cfg.data.target_length
    )
    mcfg = dataclasses.replace(cfg.meta, inner_steps=3, inner_repeat=True, mask_rate=0.25)
    batches = mask_probe.probe_batches(
        triples, qa, mcfg, special=ctx.special, seed=0, length=cfg.data.mlm_length, fill=2,
        max_batches=2, qa_pool=None,
    )  # fmt: skip
    assert len(batches) == 2
    for batch, masks in batches:
        ids = batch["inner"]["input_ids"]
        assert ids.shape[0] == 3 and (ids == ids[0]).all()  # one set of contexts, K times
        for name in mask_probe.VARIANTS:
            assert masks[name].shape == ids.shape
        # The answer is the same at every step; the added tokens are drawn afresh.
        assert (masks["answer"] == masks["answer"][0]).all() and masks["answer"].any()
        added = masks["answer+other_words"] & ~masks["answer"]
        assert added.any() and not (added == added[0]).all()
