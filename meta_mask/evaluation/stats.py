"""Statistics of a study's runs: per-fact scores and paired policy differences with a CI.

What this module owns:

- `fact_scores`: a run's score per fact, the mean over the fact's examples (paraphrased
  questions about one fact are not independent evidence, so a fact, not a question, is the unit
  that is resampled).
- `difference_matrix`: the per-fact differences of a policy's runs from the reference policy's
  runs, paired by seed (runs of one seed share the generic LM, the init and the data order) and
  by fact; facts that only one of two paired runs has are a `PairingError` naming them.
- `paired_difference`: the mean difference with a two-way bootstrap confidence interval
  (`bootstrap_means`), reproducible: the bootstrap's RNG seed is fixed.

Formatting the numbers into tables is evaluation/report.py's job.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from meta_mask.errors import UserError

CONFIDENCE = 0.95
REPLICATES = 10_000
BOOTSTRAP_SEED = 0
# Replicates drawn and summed at once: memory is chunk x facts floats. The draws (and so the
# result) depend on it, so it is fixed too.
CHUNK = 256


class PairingError(UserError, ValueError):
    """Runs compared pairwise do not line up (other facts, or two runs of one seed)."""


@dataclass(frozen=True)
class Difference:
    """A policy's mean paired difference from the reference and its bootstrap CI."""

    mean: float
    low: float
    high: float
    seeds: int  # paired seeds
    facts: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def fact_scores(facts: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
    """{fact: mean of the scores of its examples}, facts in order of first appearance."""
    if len(facts) != len(scores):
        raise ValueError(f"{len(facts)} fact ids for {len(scores)} scores")
    grouped: dict[str, list[float]] = defaultdict(list)
    for fact, score in zip(facts, scores, strict=True):
        grouped[fact].append(float(score))
    return {fact: sum(values) / len(values) for fact, values in grouped.items()}


def _some(names: set[str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(map(repr, shown)) + more


def difference_matrix(
    runs: Mapping[int, Mapping[str, float]],
    reference: Mapping[int, Mapping[str, float]],
    *,
    names: tuple[str, str] = ("the policy", "the reference"),
) -> tuple[np.ndarray, list[int], list[str]]:
    """(differences [seeds, facts], the paired seeds, the facts): `runs[seed][fact]` minus
    `reference[seed][fact]` over the seeds both have (sorted) and their facts (sorted).

    Every paired run must score the same facts (the same world and test split): otherwise a
    PairingError names the facts one side lacks; `names` say which side is which."""
    seeds = sorted(set(runs) & set(reference))
    if not seeds:
        return np.zeros((0, 0)), [], []
    facts = sorted(reference[seeds[0]])
    wanted = set(facts)
    rows = []
    for seed in seeds:
        for name, scores in zip(names, (runs[seed], reference[seed]), strict=True):
            have = set(scores)
            if have != wanted:
                missing, extra = wanted - have, have - wanted
                raise PairingError(
                    f"{name}'s run of seed {seed} does not score the facts that "
                    f"{names[1]}'s run of seed {seeds[0]} scores"
                    + (f"; it lacks {len(missing)}: {_some(missing)}" if missing else "")
                    + (f"; only it has {len(extra)}: {_some(extra)}" if extra else "")
                    + ". Paired runs must evaluate the same world and test split "
                    "(--world.*, --eval.split, --eval.max_examples)."
                )
        rows.append([runs[seed][f] - reference[seed][f] for f in facts])
    return np.asarray(rows, np.float64), seeds, facts


def _counts(indices: np.ndarray, size: int) -> np.ndarray:
    """How often each of 0..size-1 occurs in each row of `indices` [n, k] -> [n, size]."""
    n = indices.shape[0]
    flat = indices + size * np.arange(n)[:, None]
    return np.bincount(flat.ravel(), minlength=n * size).reshape(n, size)


def bootstrap_means(
    diffs: np.ndarray,
    *,
    replicates: int = REPLICATES,
    seed: int = BOOTSTRAP_SEED,
    chunk: int = CHUNK,
) -> np.ndarray:
    """The mean of `diffs` [seeds, facts] in each of `replicates` two-way bootstrap samples.

    A sample draws the seeds (rows) with replacement and, independently, the facts (columns)
    with replacement, and averages the resampled grid (Owen 2007, "the pigeonhole bootstrap").

    Why two-way: the study's uncertainty has two sources, crossed (every seed is scored on every
    fact). Seeds are the training randomness (a rerun would give other numbers); facts are the
    sample of knowledge asked about (another world or test split would give other numbers).
    Resampling only facts treats the few trained seeds as the whole population and gives too
    narrow an interval whenever seeds disagree; resampling only seeds treats the test set as
    fixed and, with 3-5 seeds, is very coarse. Resampling both covers both (the interval is
    slightly conservative, since the seed-by-fact interaction counts in both terms).

    Vectorized: a resampled grid's mean is sum_ij a_i b_j diffs[i, j] / (S F), where a and b
    count how often each seed and each fact was drawn; `chunk` replicates at a time. The draws
    come from np.random.default_rng(seed): the same inputs give the same numbers."""
    diffs = np.asarray(diffs, np.float64)
    if diffs.ndim != 2 or 0 in diffs.shape:
        raise ValueError(f"need a non-empty [seeds, facts] matrix, got shape {diffs.shape}")
    n_seeds, n_facts = diffs.shape
    rng = np.random.default_rng(seed)
    out = np.empty(replicates, np.float64)
    for start in range(0, replicates, chunk):
        n = min(chunk, replicates - start)
        seed_counts = _counts(rng.integers(0, n_seeds, (n, n_seeds)), n_seeds)
        fact_counts = _counts(rng.integers(0, n_facts, (n, n_facts)), n_facts)
        out[start : start + n] = ((seed_counts @ diffs) * fact_counts).sum(1)
    return out / (n_seeds * n_facts)


def paired_difference(
    runs: Mapping[int, Mapping[str, float]],
    reference: Mapping[int, Mapping[str, float]],
    *,
    names: tuple[str, str] = ("the policy", "the reference"),
    confidence: float = CONFIDENCE,
    replicates: int = REPLICATES,
    seed: int = BOOTSTRAP_SEED,
) -> Difference | None:
    """The mean over paired seeds and facts of `runs` minus `reference` (both {seed: {fact:
    score}}), with the percentile interval of `bootstrap_means`; None when no seed is in both.

    Each fact weighs the same (its examples' scores are averaged first, `fact_scores`), so the
    difference can differ slightly from that of the per-example metric means when facts have
    different numbers of examples."""
    diffs, seeds, facts = difference_matrix(runs, reference, names=names)
    if not seeds:
        return None
    means = bootstrap_means(diffs, replicates=replicates, seed=seed)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Difference(float(diffs.mean()), float(low), float(high), len(seeds), len(facts))
