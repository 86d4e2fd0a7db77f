"""The ONE mask sampler: (scores, units, maskable) -> boolean mask under a fixed budget.

Every policy (heuristic or learned) is a scorer that returns per-token `scores` (logits,
float32 [B, L]) and `unit_ids` (int32 [B, L]): tokens that share a unit id are masked together;
-1 marks tokens that are never masked. This module turns them into a mask, in numpy for the host
input pipeline (`sample_mask_np`) and in JAX (`sample_mask_jax`, jittable, fixed shapes, vmapped
over the batch) with the same semantics.

The rule (identical in both implementations):

1. Eligible tokens: `valid & (unit_ids >= 0)`. Unit ids must lie in [0, L); heuristic scorers use
   the position of the unit's first token. Special and padding tokens are never valid.
2. A unit's score is the MAX of its tokens' scores. (Max, not mean, because it is exact in any
   summation order, so numpy and JAX rank units identically bit for bit.)
3. Gumbel-top-k: unit u of example b gets the key `score_u + noise[b, u]` with `noise` standard
   Gumbel; units are ranked by key, descending, ties broken by the lower unit id. This draws
   units without replacement with probabilities softmax(scores): equal scores = uniform order.
4. Budget, exactly one of:
   - `num_units=k`: the top-k units (all of them when a sentence has fewer).
   - `mask_rate=r`: target T = round_half_up(r * n) tokens, n = VALID tokens of the sentence
     (all maskable tokens, whatever the policy's units cover: so every policy masks the same
     number of tokens of a sentence, the basis of a fair comparison; a policy whose units run
     out, e.g. salient spans on a sentence with one short entity, masks fewer),
     computed in integers as (n * round(r * 1e6) + 500000) // 1000000 so both implementations
     agree exactly; T is at least 1 when r > 0 and n > 0. Units are taken in rank order while
     the running total is still below T: the smallest prefix of the ranking that covers T.
     So the mask never falls short of T (unless the units run out) and exceeds T by less than
     the length of the last unit taken. Long units on short sentences overshoot most: a 15%
     budget with SpanBERT spans (3.8 words) on ~20-token sentences masks ~30% in practice;
     single-token units hit T exactly. Compare policies at equal *measured* rates when units
     differ in length, or:
5. `truncate_last_unit=True` (rate budget only) masks just the first T - (tokens before it)
   tokens, by position, of the last unit taken, as SpanBERT does with its last span: exactly T
   tokens (when the units suffice), at the price of one partial unit per sentence.

Randomness: per-example noise is derived from (seed, step, example id) so a mask never depends
on batch composition or on the host that made it. numpy uses
`np.random.default_rng([seed, step, example_id])`; JAX uses
`fold_in(fold_in(key, step), example_id)`. The two RNG streams differ (numpy's and JAX's
generators are different algorithms); given the same noise array the masks are identical,
which the tests check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from meta_mask.batches import PolicyBatch

_RATE_SCALE = 1_000_000  # mask rates are resolved to parts per million for exact integer rounding


def _rate_ppm(mask_rate: float) -> int:
    return int(round(mask_rate * _RATE_SCALE))


def _check_budget(mask_rate: float | None, num_units: int | None) -> None:
    if (mask_rate is None) == (num_units is None):
        raise ValueError(
            f"give exactly one budget: mask_rate (a token fraction) or num_units (units per "
            f"sentence); got mask_rate={mask_rate!r}, num_units={num_units!r}"
        )
    if mask_rate is not None and not 0.0 <= mask_rate <= 1.0:
        raise ValueError(f"mask_rate={mask_rate!r} must lie in [0, 1]")
    if num_units is not None and num_units < 0:
        raise ValueError(f"num_units={num_units!r} must be >= 0")


def _check_shapes(**arrays) -> tuple[int, int]:
    shapes = {name: tuple(np.shape(a)) for name, a in arrays.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"sampler inputs must all be [B, L] with the same shape; got {shapes}")
    return first


class Scorer(Protocol):
    """What every policy is. `batch` is a batches.PolicyBatch; returns (scores float32 [B, L]
    logits, unit_ids int32 [B, L], -1 = never masked). A learned policy's per-token logits drop
    in as `scores` with `unit_ids = where(valid, arange(L), -1)` (or whole-word units)."""

    def __call__(self, batch: PolicyBatch, rng: BatchRng) -> tuple[np.ndarray, np.ndarray]: ...


# ---------------------------------------------------------------------------------------------
# numpy


# Per-example numpy streams: the Gumbel noise uses default_rng([seed, step, example_id]); a
# scorer's own randomness (span lengths) and the corruption's (80/10/10) append a stream id, so
# each is independent of the others and of how many draws the others make.
STREAM_SCORER = 1
STREAM_CORRUPT = 2


@dataclass(frozen=True)
class BatchRng:
    """Where a host batch's randomness comes from: (seed, step) and one id per example."""

    seed: int
    step: int
    example_ids: np.ndarray  # int64 [B]: stable ids (e.g. the sentence's index in the corpus)

    def generators(self, stream: int) -> list[np.random.Generator]:
        """One generator per example: default_rng([seed, step, example_id, stream])."""
        return [
            np.random.default_rng([self.seed, self.step, int(i), stream]) for i in self.example_ids
        ]

    def noise(self, length: int) -> np.ndarray:
        """The sampler's Gumbel noise [B, length]."""
        return gumbel_noise_np(self.seed, self.step, self.example_ids, length)


def gumbel_noise_np(seed: int, step: int, example_ids: Sequence[int], length: int) -> np.ndarray:
    """Standard Gumbel noise float32 [B, length]; row i from default_rng([seed, step, ids[i]]).

    -log(-log(u)) from the row's uniforms (one vectorized transform for the batch: the per-call
    overhead of Generator.gumbel dominated the host pipeline); u is kept inside (0, 1)."""
    u = np.asarray(
        [np.random.default_rng([seed, step, int(i)]).random(length) for i in example_ids]
    ).reshape(len(example_ids), length)
    u = np.clip(u, np.finfo(np.float64).tiny, 1.0 - np.finfo(np.float64).epsneg)
    return (-np.log(-np.log(u))).astype(np.float32)


def target_counts_np(n_eligible: np.ndarray, mask_rate: float) -> np.ndarray:
    """Tokens to mask per sentence under a rate budget (see the module docstring, rule 4)."""
    n = np.asarray(n_eligible, np.int64)
    target = (n * _rate_ppm(mask_rate) + _RATE_SCALE // 2) // _RATE_SCALE
    if mask_rate > 0:
        target = np.maximum(target, (n > 0).astype(np.int64))
    return np.minimum(target, n)


def sample_mask_np(
    scores: np.ndarray,
    unit_ids: np.ndarray,
    valid: np.ndarray,
    noise: np.ndarray,
    *,
    mask_rate: float | None = None,
    num_units: int | None = None,
    truncate_last_unit: bool = False,
) -> np.ndarray:
    """Boolean mask [B, L]: Gumbel-top-k over units under the budget (module docstring)."""
    _check_budget(mask_rate, num_units)
    b, length = _check_shapes(scores=scores, unit_ids=unit_ids, valid=valid, noise=noise)
    unit_ids = np.asarray(unit_ids)
    eligible = np.asarray(valid, bool) & (unit_ids >= 0)
    if np.any(unit_ids >= length):
        raise ValueError(f"unit_ids must lie in [-1, L={length}); got max {unit_ids.max()}")
    rows = np.broadcast_to(np.arange(b)[:, None], (b, length))
    seg = np.where(eligible, unit_ids, 0)

    unit_score = np.full((b, length), -np.inf, np.float32)
    np.maximum.at(
        unit_score, (rows[eligible], seg[eligible]), np.asarray(scores, np.float32)[eligible]
    )
    unit_len = np.zeros((b, length), np.int64)
    np.add.at(unit_len, (rows[eligible], seg[eligible]), 1)
    exists = unit_len > 0

    key = np.where(exists, unit_score + np.asarray(noise, np.float32), -np.inf).astype(np.float32)
    order = np.argsort(-key, axis=1, kind="stable")
    sorted_len = np.take_along_axis(unit_len, order, axis=1)
    sorted_exists = np.take_along_axis(exists, order, axis=1)
    if num_units is not None:
        take = np.arange(length)[None, :] < num_units
    else:
        target = target_counts_np(np.asarray(valid, bool).sum(1), mask_rate)
        before = np.cumsum(sorted_len, axis=1) - sorted_len
        take = before < target[:, None]
    take = take & sorted_exists
    if truncate_last_unit and mask_rate is not None:
        quota_sorted = np.where(take, np.minimum(sorted_len, target[:, None] - before), 0)
        quota = np.zeros((b, length), np.int64)
        np.put_along_axis(quota, order, quota_sorted, axis=1)
        pos = np.arange(length)
        # rank[b, t]: eligible tokens of t's unit at earlier positions.
        same = (seg[:, :, None] == seg[:, None, :]) & eligible[:, None, :]
        rank = (same & (pos[None, None, :] < pos[None, :, None])).sum(-1)
        return eligible & (rank < np.take_along_axis(quota, seg, axis=1))
    chosen = np.zeros((b, length), bool)
    np.put_along_axis(chosen, order, take, axis=1)
    return eligible & np.take_along_axis(chosen, seg, axis=1)


# ---------------------------------------------------------------------------------------------
# JAX


def example_keys_jax(key: jax.Array, step: int | jax.Array, example_ids: jax.Array) -> jax.Array:
    """Per-example keys fold_in(fold_in(key, step), example_id), [B] keys."""
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.asarray(example_ids))


def gumbel_noise_jax(
    key: jax.Array, step: int | jax.Array, example_ids: jax.Array, length: int
) -> jax.Array:
    """Standard Gumbel noise float32 [B, length], one row per example key."""
    keys = example_keys_jax(key, step, example_ids)
    return jax.vmap(lambda k: jax.random.gumbel(k, (length,), jnp.float32))(keys)


def _sample_one_jax(scores, unit_ids, valid, noise, mask_rate, num_units, truncate_last_unit):
    length = scores.shape[0]
    eligible = valid & (unit_ids >= 0)
    # Ineligible tokens go to a dump segment `length` that is dropped.
    seg = jnp.where(eligible, unit_ids, length)
    unit_score = jax.ops.segment_max(
        jnp.where(eligible, scores.astype(jnp.float32), -jnp.inf), seg, num_segments=length + 1
    )[:length]
    unit_len = jax.ops.segment_sum(eligible.astype(jnp.int32), seg, num_segments=length + 1)[
        :length
    ]
    exists = unit_len > 0
    key = jnp.where(exists, unit_score + noise.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-key, stable=True)
    sorted_len = unit_len[order]
    if num_units is not None:
        take = jnp.arange(length) < num_units
    else:
        n = valid.sum().astype(jnp.int32)
        # int32 is exact here: n <= L and ppm <= 1e6 keep n * ppm far below 2**31 for L < 2000.
        target = (n * _rate_ppm(mask_rate) + _RATE_SCALE // 2) // _RATE_SCALE
        if mask_rate > 0:
            target = jnp.maximum(target, (n > 0).astype(jnp.int32))
        target = jnp.minimum(target, n)
        before = jnp.cumsum(sorted_len) - sorted_len
        take = before < target
    take = take & exists[order]
    seg_safe = jnp.clip(seg, 0, length - 1)
    if truncate_last_unit and mask_rate is not None:
        quota_sorted = jnp.where(take, jnp.minimum(sorted_len, target - before), 0)
        quota = jnp.zeros((length,), jnp.int32).at[order].set(quota_sorted)
        pos = jnp.arange(length)
        same = (seg[:, None] == seg[None, :]) & eligible[None, :] & (pos[None, :] < pos[:, None])
        return eligible & (same.sum(-1) < quota[seg_safe])
    chosen = jnp.zeros((length,), bool).at[order].set(take)
    return eligible & chosen[seg_safe]


def sample_mask_jax(
    scores: jax.Array,
    unit_ids: jax.Array,
    valid: jax.Array,
    noise: jax.Array,
    *,
    mask_rate: float | None = None,
    num_units: int | None = None,
    truncate_last_unit: bool = False,
) -> jax.Array:
    """JAX twin of `sample_mask_np` (same rule); jittable with the budget static."""
    _check_budget(mask_rate, num_units)
    _, length = _check_shapes(scores=scores, unit_ids=unit_ids, valid=valid, noise=noise)
    if mask_rate is not None and length * _RATE_SCALE >= 2**31:
        raise ValueError(f"sample_mask_jax supports L < {2**31 // _RATE_SCALE}; got L={length}")
    fn = lambda s, u, v, g: _sample_one_jax(s, u, v, g, mask_rate, num_units, truncate_last_unit)
    return jax.vmap(fn)(
        jnp.asarray(scores), jnp.asarray(unit_ids, jnp.int32), jnp.asarray(valid, bool), noise
    )


def mask_batch_np(
    scorer: Scorer,
    batch: PolicyBatch,
    rng: BatchRng,
    *,
    mask_rate: float | None = None,
    num_units: int | None = None,
    truncate_last_unit: bool = False,
) -> np.ndarray:
    """Score a host batch and sample its mask: the whole host-side policy in one call."""
    scores, unit_ids = scorer(batch, rng)
    noise = rng.noise(scores.shape[1])
    return sample_mask_np(
        scores,
        unit_ids,
        batch["valid"],
        noise,
        mask_rate=mask_rate,
        num_units=num_units,
        truncate_last_unit=truncate_last_unit,
    )
