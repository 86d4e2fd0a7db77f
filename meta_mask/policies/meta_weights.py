"""The policy's side of the meta-gradient: its distribution, masks and masked tokens' weights.

Pure jittable functions of the policy's logits (no LM, no I/O). q = the softmax of the logits
over a context's maskable tokens (the sampler's own distribution); masks are drawn from
stop_gradient(logits) with fixed noise by the shared sampler (policies/sampler.py); each masked
token's loss is weighted by w_i = exp(d_i - mean_{j masked} d_j), d = lp - sg(lp),
lp = `log_inclusion` (log min(1, T Q_u) with clipping, else log q): 1 in value, the
likelihood-ratio gradient; `share_credit` optionally spreads the credit a masked token receives
over its context's mask (the whole-mask score function). The regularizers (entropy, budget) are
functions of q too.
docs/meta_gradient.md derives them; policies/meta.py puts them together with the unroll.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from meta_mask.config import MetaConfig
from meta_mask.policies.sampler import sample_mask_jax

Array = jax.Array
Metrics = dict[str, Array]

_NEG = -1e30  # a finite "minus infinity" for masked log-sum-exp (no NaN gradients)
_RATE_SCALE = 1_000_000


def policy_distribution(logits: Array, valid: Array) -> tuple[Array, Array]:
    """(log q, q) [..., L]: the softmax over each sentence's valid tokens; 0 off `valid`."""
    z = jnp.where(valid, logits, _NEG)  # where() also blocks gradients into the -inf entries
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    log_q = jnp.where(valid, z - lse, 0.0)
    return log_q, jnp.where(valid, jnp.exp(log_q), 0.0)


def target_counts(n_valid: Array, mask_rate: float) -> Array:
    """Tokens the sampler masks per sentence (policies/sampler.py, rule 4, same integers)."""
    n = n_valid.astype(jnp.int32)
    target = (n * int(round(mask_rate * _RATE_SCALE)) + _RATE_SCALE // 2) // _RATE_SCALE
    return jnp.minimum(jnp.maximum(target, (n > 0).astype(jnp.int32)), n)


def policy_probabilities(logits: Array, valid: Array, mask_rate: float) -> Array:
    """p_i = min(1, T q_i): each token's (approximate) inclusion probability under the budget."""
    _, q = policy_distribution(logits, valid)
    t = target_counts(valid.sum(-1), mask_rate).astype(q.dtype)
    return jnp.minimum(1.0, t[..., None] * q)


def policy_regularizers(logits: Array, valid: Array, cfg: MetaConfig) -> tuple[Array, Metrics]:
    """-entropy_weight * H + budget_weight * B (module docstring), and their metrics."""
    log_q, q = policy_distribution(logits, valid)
    n = valid.sum(-1)
    entropy = -jnp.sum(q * log_q, axis=-1) / jnp.log(jnp.maximum(n, 2).astype(q.dtype))
    rows = (n > 0).astype(q.dtype)
    entropy = jnp.sum(entropy * rows) / jnp.maximum(jnp.sum(rows), 1.0)
    p = policy_probabilities(logits, valid, cfg.mask_rate)
    mean_p = jnp.sum(p) / jnp.maximum(jnp.sum(valid), 1)
    target = jnp.sum(target_counts(n, cfg.mask_rate)) / jnp.maximum(jnp.sum(n), 1)
    budget = (mean_p - target) ** 2
    loss = -cfg.entropy_weight * entropy + cfg.budget_weight * budget
    return loss, {"entropy": entropy, "mean_p": mean_p, "budget_penalty": budget}


def _units(valid: Array, unit_ids: Array | None) -> Array:
    pos = jnp.broadcast_to(jnp.arange(valid.shape[-1], dtype=jnp.int32), valid.shape)
    return jnp.where(valid, pos if unit_ids is None else unit_ids, -1)


def sample_masks(
    logits: Array, valid: Array, noise: Array, mask_rate: float, unit_ids: Array | None = None
) -> Array:
    """The sampler's mask [B, L] from the policy's logits (no gradient) and fixed noise."""
    return sample_mask_jax(
        jax.lax.stop_gradient(logits),
        _units(valid, unit_ids),
        valid,
        noise,
        mask_rate=mask_rate,
    )


def unit_mass(q: Array, valid: Array, unit_ids: Array | None) -> Array:
    """Q [..., L]: each token's unit's total probability under q (q itself for token units).
    Unit ids are positions in [0, L) (-1 off valid), as the sampler reads them."""
    if unit_ids is None:
        return q
    length = q.shape[-1]
    ids = jnp.where(valid, unit_ids, length).reshape((-1, length))  # a spare segment off valid

    def per_row(qr: Array, idr: Array) -> Array:
        sums = jax.ops.segment_sum(qr, idr, num_segments=length + 1)
        return sums[idr]

    return jnp.where(valid, jax.vmap(per_row)(q.reshape((-1, length)), ids).reshape(q.shape), 0.0)


def log_inclusion(
    logits: Array, valid: Array, unit_ids: Array | None, mask_rate: float, clip: bool
) -> Array:
    """The log-probability whose change a masked token's weight carries (0 off valid).

    clip=False: log q_i (the sampler's first-draw probability). clip=True: log min(1, T Q_u),
    T the target count, Q_u the token's unit's total probability: the unit's approximate
    chance to be masked at all, so a unit that is already always masked (T Q_u >= 1) gets no
    more credit, and the policy cannot pour its mass into one unit per sentence.
    """
    log_q, q = policy_distribution(logits, valid)
    if not clip:
        return log_q
    t = target_counts(valid.sum(-1), mask_rate).astype(q.dtype)[..., None]
    p = jnp.minimum(1.0, t * unit_mass(q, valid, unit_ids))
    return jnp.where(valid, jnp.log(jnp.maximum(p, 1e-30)), 0.0)


def mask_weights(log_q: Array, mask: Array, log_q_ref: Array | None = None) -> Array:
    """w_i = exp(d_i - mean_{j masked} d_j) on masked tokens (0 elsewhere), d = log q - log q_ref,
    the mean over each batch's masked tokens (last two axes). q_ref = stop_gradient(q) by
    default: then w = 1 in value, with gradient grad log q_i - mean_j grad log q_j."""
    ref = jax.lax.stop_gradient(log_q) if log_q_ref is None else log_q_ref
    delta = jnp.where(mask, log_q - ref, 0.0)
    count = jnp.maximum(jnp.sum(mask, axis=(-2, -1), keepdims=True), 1).astype(delta.dtype)
    center = jnp.sum(delta, axis=(-2, -1), keepdims=True) / count
    return jnp.where(mask, jnp.exp(delta - center), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def share_credit(weights: Array, mask: Array, alpha: float) -> Array:
    """The identity on the masked tokens' weights [..., L], whose backward pass replaces each
    masked token's cotangent c_i (its loss's effect on the outer objective, the credit
    `mask_weights` turns into grad log q_i) by (1 - alpha) c_i + alpha * mean_{j masked in its
    row} c_j. alpha = 1: every token of a row's mask gets the effect of the whole mask, the
    first-order score-function estimator of E_m[J(m)] over the row's masks (m also decides what
    the other masked tokens are predicted from, which per-token credit does not see); alpha = 0:
    the exact gradient of the weighted objective."""
    del mask, alpha
    return weights


def _share_credit_fwd(weights: Array, mask: Array, alpha: float) -> tuple[Array, Array]:
    return weights, mask


def _share_credit_bwd(alpha: float, mask: Array, g: Array) -> tuple[Array, None]:
    m = mask.astype(g.dtype)
    row = jnp.sum(g * m, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(m, -1, keepdims=True), 1)
    return jnp.where(mask, (1.0 - alpha) * g + alpha * row, g), None


share_credit.defvjp(_share_credit_fwd, _share_credit_bwd)
