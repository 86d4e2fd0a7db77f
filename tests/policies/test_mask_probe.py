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
