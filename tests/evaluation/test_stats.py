"""Per-fact scores, pairing by seed and fact, and the two-way bootstrap CI."""

from __future__ import annotations

import numpy as np
import pytest

from meta_mask.evaluation import stats
from meta_mask.evaluation.stats import PairingError


def _runs(matrix, facts=None) -> dict[int, dict[str, float]]:
    """{seed: {fact: score}} from a [seeds, facts] matrix."""
    matrix = np.asarray(matrix, np.float64)
    facts = facts or [f"f{j}" for j in range(matrix.shape[1])]
    return {s: dict(zip(facts, map(float, row), strict=True)) for s, row in enumerate(matrix)}


def _slow_bootstrap_means(diffs, replicates, seed, chunk):
    """The same bootstrap written plainly: per replicate, index the drawn seeds and facts and
    average the resampled grid (the draws come in the same chunks from the same generator)."""
    rng = np.random.default_rng(seed)
    n_seeds, n_facts = diffs.shape
    means = []
    for start in range(0, replicates, chunk):
        n = min(chunk, replicates - start)
        seeds = rng.integers(0, n_seeds, (n, n_seeds))
        facts = rng.integers(0, n_facts, (n, n_facts))
        for r in range(n):
            means.append(diffs[np.ix_(seeds[r], facts[r])].mean())
    return np.array(means)


def test_fact_scores_average_each_facts_examples():
    got = stats.fact_scores(["a", "b", "a", "c", "a"], [1.0, 0.0, 0.0, 1.0, 1.0])
    assert got == {"a": pytest.approx(2 / 3), "b": 0.0, "c": 1.0}
    assert list(got) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="2 fact ids for 3 scores"):
        stats.fact_scores(["a", "b"], [1.0, 0.0, 1.0])


def test_identical_runs_differ_by_zero_with_a_zero_width_interval():
    base = np.random.default_rng(1).random((3, 40))
    diff = stats.paired_difference(_runs(base), _runs(base))
    assert (diff.mean, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert not diff.excludes_zero
    assert (diff.seeds, diff.facts) == (3, 40)


def test_a_constant_shift_per_fact_is_the_difference_with_a_tight_interval():
    base = np.random.default_rng(2).random((4, 30)) * 0.5
    diff = stats.paired_difference(_runs(base + 0.25), _runs(base))
    assert diff.mean == pytest.approx(0.25)
    assert diff.low == pytest.approx(0.25, abs=1e-12)
    assert diff.high == pytest.approx(0.25, abs=1e-12)
    assert diff.excludes_zero
    down = stats.paired_difference(_runs(base), _runs(base + 0.25))
    assert down.mean == pytest.approx(-0.25) and down.excludes_zero


def test_vectorized_bootstrap_equals_the_plain_loop():
    diffs = np.random.default_rng(3).normal(size=(3, 5))
    # 20 replicates in chunks of 7: the last chunk is partial.
    fast = stats.bootstrap_means(diffs, replicates=20, seed=5, chunk=7)
    np.testing.assert_allclose(fast, _slow_bootstrap_means(diffs, 20, 5, 7), rtol=1e-12)
    # The interval is the percentile interval of those means.
    a = np.random.default_rng(4).random((3, 6))
    b = np.random.default_rng(5).random((3, 6))
    diff = stats.paired_difference(_runs(a), _runs(b), replicates=600)
    slow = _slow_bootstrap_means(a - b, 600, stats.BOOTSTRAP_SEED, stats.CHUNK)
    assert diff.mean == pytest.approx((a - b).mean())
    assert (diff.low, diff.high) == pytest.approx(tuple(np.quantile(slow, [0.025, 0.975])))


def test_bootstrap_distribution_by_hand():
    # One seed, two facts with differences 0 and 1: a replicate draws two facts, so its mean is
    # 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4; the 95% interval is [0, 1].
    means = stats.bootstrap_means(np.array([[0.0, 1.0]]))
    values, counts = np.unique(means, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(counts / len(means), [0.25, 0.5, 0.25], atol=0.02)
    diff = stats.paired_difference({0: {"a": 0.0, "b": 1.0}}, {0: {"a": 0.0, "b": 0.0}})
    assert (diff.mean, diff.low, diff.high) == (0.5, 0.0, 1.0)
    # Seeds are resampled the same way: two seeds of one fact.
    means = stats.bootstrap_means(np.array([[0.0], [1.0]]))
    assert np.unique(means).tolist() == [0.0, 0.5, 1.0]


def test_bootstrap_spread_matches_the_standard_error_and_both_ways_add():
    rng = np.random.default_rng(6)
    facts = rng.normal(size=(1, 400))
    # One seed: the bootstrap variance of a mean of F draws is the population variance / F.
    got = stats.bootstrap_means(facts).std()
    assert got == pytest.approx(facts.std() / np.sqrt(400), rel=0.05)
    # Seed effects widen the interval: resampling seeds counts them.
    shifted = facts + np.array([[-1.0], [0.0], [1.0]])
    assert stats.bootstrap_means(shifted).std() > 5 * got


def test_bootstrap_is_reproducible_and_checks_its_input():
    diffs = np.random.default_rng(7).random((2, 9))
    np.testing.assert_array_equal(stats.bootstrap_means(diffs), stats.bootstrap_means(diffs))
    assert not np.array_equal(
        stats.bootstrap_means(diffs, seed=1), stats.bootstrap_means(diffs, seed=2)
    )
    with pytest.raises(ValueError, match="non-empty"):
        stats.bootstrap_means(np.zeros((0, 3)))


def test_pairing_is_by_seed_and_fact():
    runs = {0: {"x": 1.0, "y": 0.0}, 2: {"y": 1.0, "x": 1.0}, 5: {"x": 0.0, "y": 0.0}}
    reference = {0: {"y": 0.0, "x": 0.0}, 2: {"x": 1.0, "y": 0.0}, 3: {"x": 1.0, "y": 1.0}}
    diffs, seeds, facts = stats.difference_matrix(runs, reference)
    assert seeds == [0, 2] and facts == ["x", "y"]
    np.testing.assert_array_equal(diffs, [[1.0, 0.0], [0.0, 1.0]])
    assert stats.paired_difference(runs, {7: {"x": 0.0, "y": 0.0}}) is None


def test_facts_in_only_one_run_are_an_error_naming_them():
    reference = {0: {"1:employer": 1.0, "2:employer": 0.0}}
    with pytest.raises(PairingError, match=r"meta's run of seed 0 .* lacks 1: '2:employer'"):
        stats.difference_matrix(
            {0: {"1:employer": 1.0}}, reference, names=("meta", "salient_spans")
        )
    extra = {0: {"1:employer": 1.0, "2:employer": 0.0, "9:birth_city": 1.0}}
    with pytest.raises(PairingError, match=r"only it has 1: '9:birth_city'.*--world"):
        stats.difference_matrix(extra, reference)
    many = {0: {f"{i}:x": 0.0 for i in range(9)}}
    with pytest.raises(PairingError, match=r"lacks 9: .* and 4 more"):
        stats.difference_matrix({0: {}}, many)
    # Every seed must score the same facts too (one matrix of seeds x facts).
    reference = {0: {"a": 0.0}, 1: {"b": 0.0}}
    with pytest.raises(PairingError, match="seed 1"):
        stats.difference_matrix({0: {"a": 1.0}, 1: {"b": 1.0}}, reference)
