"""The shared sampler: budget rule, whole units, never specials, Gumbel-top-k law, determinism,
and numpy == JAX given the same noise (checked against a plain-Python reference of the rule)."""

import jax
import numpy as np
import pytest

from meta_mask.policies.sampler import (
    BatchRng,
    example_keys_jax,
    gumbel_noise_jax,
    gumbel_noise_np,
    sample_mask_jax,
    sample_mask_np,
)


def random_problem(rng, b=64, length=24, max_unit=4, unit_prob=0.9):
    """Random [B, L] scores / contiguous units / valid (a <s> .. </s> window, then padding)."""
    scores = rng.normal(size=(b, length)).astype(np.float32)
    unit_ids = np.full((b, length), -1, np.int32)
    valid = np.zeros((b, length), bool)
    for i in range(b):
        n = rng.integers(0, length - 1)  # real tokens between <s> and </s>
        valid[i, 1 : 1 + n] = True
        pos = 1
        while pos < 1 + n:
            w = min(int(rng.integers(1, max_unit + 1)), 1 + n - pos)
            if rng.random() < unit_prob:
                unit_ids[i, pos : pos + w] = pos
            pos += w
    # Some unit ids on invalid positions too: the sampler must ignore them.
    unit_ids[:, 0] = 0
    return scores, unit_ids, valid


def reference_mask(
    scores, unit_ids, valid, noise, mask_rate=None, num_units=None, truncate_last_unit=False
):
    """The documented rule, one example at a time in plain Python."""
    b, length = scores.shape
    out = np.zeros((b, length), bool)
    for i in range(b):
        units = {}
        for t in range(length):
            if valid[i, t] and unit_ids[i, t] >= 0:
                units.setdefault(int(unit_ids[i, t]), []).append(t)
        keys = {u: max(scores[i, t] for t in ts) + noise[i, u] for u, ts in units.items()}
        order = sorted(units, key=lambda u: (-keys[u], u))
        n = int(valid[i].sum())  # the budget counts every valid token
        if num_units is not None:
            chosen = order[:num_units]
        else:
            target = min(n, max(int(np.floor(mask_rate * n + 0.5)), int(n > 0 and mask_rate > 0)))
            chosen, total = [], 0
            for u in order:
                if total >= target:
                    break
                chosen.append(u)
                total += len(units[u])
            if truncate_last_unit and chosen:
                cut = max(total - target, 0)  # drop this many tokens from the last unit's end
                units[chosen[-1]] = units[chosen[-1]][: len(units[chosen[-1]]) - cut]
        for u in chosen:
            out[i, units[u]] = True
    return out


BUDGETS = [dict(mask_rate=0.15), dict(mask_rate=0.5), dict(mask_rate=1.0), dict(num_units=1)]
BUDGETS += [dict(num_units=3), dict(mask_rate=0.0), dict(num_units=0)]
BUDGETS += [
    dict(mask_rate=0.15, truncate_last_unit=True),
    dict(mask_rate=0.4, truncate_last_unit=True),
]
BUDGETS += [dict(num_units=2, truncate_last_unit=True)]  # no effect with a unit budget


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_numpy_and_jax_match_reference_given_same_noise(budget):
    rng = np.random.default_rng(0)
    scores, unit_ids, valid = random_problem(rng)
    # Equal scores inside some rows: ties are broken by the noise alone.
    scores[::3] = 0.0
    noise = gumbel_noise_np(1, 2, np.arange(len(scores)), scores.shape[1])
    ref = reference_mask(scores, unit_ids, valid, noise, **budget)
    got_np = sample_mask_np(scores, unit_ids, valid, noise, **budget)
    got_jax = jax.jit(lambda *a: sample_mask_jax(*a, **budget))(scores, unit_ids, valid, noise)
    np.testing.assert_array_equal(got_np, ref)
    np.testing.assert_array_equal(np.asarray(got_jax), ref)


def test_rate_budget_properties_over_many_sentences():
    rng = np.random.default_rng(1)
    scores, unit_ids, valid = random_problem(rng, b=500, length=40, max_unit=5)
    noise = gumbel_noise_np(0, 0, np.arange(500), 40)
    mask = sample_mask_np(scores, unit_ids, valid, noise, mask_rate=0.15)
    eligible = valid & (unit_ids >= 0)
    assert not (mask & ~eligible).any()  # never a special/pad/non-unit token
    # The budget counts every valid token, whatever the units cover (equal budgets across
    # policies); a sentence whose units run out masks all of its eligible tokens.
    n = valid.sum(1)
    target = np.minimum(n, np.maximum(np.floor(0.15 * n + 0.5), (n > 0)))
    count = mask.sum(1)
    assert (count >= np.minimum(target, eligible.sum(1))).all()
    for i in range(500):
        masked_units = set(unit_ids[i][mask[i]])
        for u in masked_units:  # whole units only
            assert mask[i][eligible[i] & (unit_ids[i] == u)].all()
        lens = [(eligible[i] & (unit_ids[i] == u)).sum() for u in masked_units]
        # Exceeds the target by less than one unit.
        assert count[i] - max(lens, default=0) < max(target[i], 1)
    # Overall rate close to the budget (units of <= 5 tokens overshoot a little).
    assert 0.13 <= count.sum() / n.sum() < 0.25


def test_truncate_last_unit_hits_the_rate_exactly():
    rng = np.random.default_rng(4)
    scores, unit_ids, valid = random_problem(rng, b=500, length=40, max_unit=5, unit_prob=1.0)
    noise = gumbel_noise_np(0, 0, np.arange(500), 40)
    mask = sample_mask_np(scores, unit_ids, valid, noise, mask_rate=0.15, truncate_last_unit=True)
    n = valid.sum(1)
    target = np.minimum(n, np.maximum(np.floor(0.15 * n + 0.5), (n > 0)))
    np.testing.assert_array_equal(mask.sum(1), target)
    for i in range(500):  # at most one unit is partial, and it keeps its leading tokens
        partial = [u for u in set(unit_ids[i][mask[i]]) if not mask[i][unit_ids[i] == u].all()]
        assert len(partial) <= 1
        for u in partial:
            m = mask[i][valid[i] & (unit_ids[i] == u)]
            assert m[0] and (np.diff(m.astype(int)) <= 0).all()


def test_num_units_budget_takes_exactly_k_units():
    rng = np.random.default_rng(2)
    scores, unit_ids, valid = random_problem(rng, b=300)
    noise = gumbel_noise_np(0, 0, np.arange(300), scores.shape[1])
    mask = sample_mask_np(scores, unit_ids, valid, noise, num_units=2)
    eligible = valid & (unit_ids >= 0)
    for i in range(300):
        n_units = len(set(unit_ids[i][eligible[i]]))
        assert len(set(unit_ids[i][mask[i]])) == min(2, n_units)


def test_gumbel_top1_follows_softmax_of_scores():
    b = 40_000
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    scores = np.tile(np.r_[0.0, np.log(probs), 0.0], (b, 1)).astype(np.float32)
    unit_ids = np.tile(np.r_[-1, 1, 2, 3, 4, -1], (b, 1)).astype(np.int32)
    valid = unit_ids >= 0
    noise = gumbel_noise_np(3, 0, np.arange(b), 6)
    freq = sample_mask_np(scores, unit_ids, valid, noise, num_units=1)[:, 1:5].mean(0)
    np.testing.assert_allclose(freq, probs, atol=0.01)
    # Equal scores: uniform.
    freq = sample_mask_np(np.zeros_like(scores), unit_ids, valid, noise, num_units=1)
    np.testing.assert_allclose(freq[:, 1:5].mean(0), 0.25, atol=0.01)


def test_jax_noise_gives_same_law_and_masks():
    key = jax.random.key(0)
    b = 20_000
    noise = np.asarray(gumbel_noise_jax(key, 0, np.arange(b), 6))
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    scores = np.tile(np.r_[0.0, np.log(probs), 0.0], (b, 1)).astype(np.float32)
    unit_ids = np.tile(np.r_[-1, 1, 2, 3, 4, -1], (b, 1)).astype(np.int32)
    mask = np.asarray(sample_mask_jax(scores, unit_ids, unit_ids >= 0, noise, num_units=1))
    np.testing.assert_allclose(mask[:, 1:5].mean(0), probs, atol=0.015)


def test_numpy_determinism_per_seed_step_example():
    a = gumbel_noise_np(7, 3, [10, 11, 12], 16)
    np.testing.assert_array_equal(a, gumbel_noise_np(7, 3, [10, 11, 12], 16))
    # A row depends on its own example id only, not on the batch it sits in.
    np.testing.assert_array_equal(a[1], gumbel_noise_np(7, 3, [11], 16)[0])
    assert not np.allclose(a, gumbel_noise_np(7, 4, [10, 11, 12], 16))  # another step
    assert not np.allclose(a, gumbel_noise_np(8, 3, [10, 11, 12], 16))  # another seed
    assert not np.allclose(a[0], a[1])  # another example
    rng = BatchRng(seed=7, step=3, example_ids=np.array([10, 11, 12]))
    np.testing.assert_array_equal(rng.noise(16), a)
    # Scorer / corruption streams are independent of the noise stream.
    assert not np.allclose(rng.generators(1)[0].gumbel(size=16), a[0])


def test_jax_determinism_per_seed_step_example():
    key = jax.random.key(5)
    a = np.asarray(gumbel_noise_jax(key, 3, np.array([10, 11, 12]), 16))
    np.testing.assert_array_equal(
        a, np.asarray(gumbel_noise_jax(key, 3, np.array([10, 11, 12]), 16))
    )
    np.testing.assert_array_equal(a[1], np.asarray(gumbel_noise_jax(key, 3, np.array([11]), 16))[0])
    assert not np.allclose(a, np.asarray(gumbel_noise_jax(key, 4, np.array([10, 11, 12]), 16)))
    k = example_keys_jax(key, 3, np.array([11]))[0]
    expected = jax.random.fold_in(jax.random.fold_in(key, 3), 11)
    np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(expected))


def test_masks_differ_across_steps_and_agree_within():
    rng = np.random.default_rng(3)
    scores, unit_ids, valid = random_problem(rng, b=32)
    scores[:] = 0
    ids = np.arange(32)
    m1 = sample_mask_np(scores, unit_ids, valid, gumbel_noise_np(0, 1, ids, 24), mask_rate=0.3)
    m1b = sample_mask_np(scores, unit_ids, valid, gumbel_noise_np(0, 1, ids, 24), mask_rate=0.3)
    m2 = sample_mask_np(scores, unit_ids, valid, gumbel_noise_np(0, 2, ids, 24), mask_rate=0.3)
    np.testing.assert_array_equal(m1, m1b)
    assert (m1 != m2).any()


def test_budget_and_shape_errors_are_actionable():
    z = np.zeros((2, 4), np.float32)
    u = np.zeros((2, 4), np.int32)
    v = np.ones((2, 4), bool)
    with pytest.raises(ValueError, match="exactly one budget"):
        sample_mask_np(z, u, v, z)
    with pytest.raises(ValueError, match="exactly one budget"):
        sample_mask_np(z, u, v, z, mask_rate=0.1, num_units=1)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        sample_mask_np(z, u[:, :3], v, z, mask_rate=0.1)
    with pytest.raises(ValueError, match="unit_ids must lie"):
        sample_mask_np(z, u + 4, v, z, mask_rate=0.1)
