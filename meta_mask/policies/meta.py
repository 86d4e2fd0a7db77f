"""Meta-learning the masking policy: inner MLM updates, the unroll, the meta loss, the meta step.

Pure functions only (no I/O, no jax.config); `make_meta_step` jits once. phi = the policy's
parameters, theta = the language model's (an input of every meta step, never updated here).
The derivation, with the reasons for each choice, is docs/meta_gradient.md; in short:

- q = softmax of the policy's logits over a context's maskable tokens (the sampler's own
  distribution; unit logits mean-pooled); the mask m is drawn from sg(logits) with fixed noise.
- Each masked token's loss is weighted by w_i = exp(d_i - mean_{j masked} d_j), d = lp - sg(lp),
  lp = log min(1, T Q_u) (clip_weights; else log q): 1 in value, likelihood-ratio gradient.
- The inner examples are the intermediate stage's (`corruption`); `label_source` maps w onto
  the labels, so the inner loss equals that stage's loss in value. K optax steps in a lax.scan
  (microbatched gradients; optional QA step), then the outer loss on the contexts' own questions
  minus (contrastive) other contexts' questions.
- Regularizers: -entropy_weight * H (normalized entropy of q) + budget_weight * B, B =
  (mean_i min(1, T q_i) - sum T / sum n)^2. Estimators: second_order (jax.grad through the
  unroll) or first_order, the surrogate -a <grad L_mlm(theta_0, phi), sg(grad L_down(theta_0))>
  whose per-label alignments come from one jvp. tests/policies/test_meta.py checks the first
  against central finite differences in float64 (`reference_phi`), the second against its
  definition.
- Memory and time (cfg.remat): each inner step's backward pass keeps only (theta_k, optimizer
  state, batch) and recomputes the step, forward-over-reverse (`recomputed_inner_step`; the
  first step needs no Hessian-vector product, theta_0 not depending on phi); remat_segment
  nests the scan (training/remat.py); training/memory.py counts the bytes. With a mesh the
  meta step is data parallel (`make_meta_step`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values
from jax.sharding import Mesh

from meta_mask.config import MeshConfig, MetaConfig
from meta_mask.policies.corrupt import corrupt_full_sentence_jax, corrupt_spans_jax
from meta_mask.policies.sampler import gumbel_noise_jax, sample_mask_jax
from meta_mask.special_tokens import SpecialTokens
from meta_mask.training import remat
from meta_mask.training import sharding as sharding_lib
from meta_mask.training.steps import TrainState, token_losses

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]
Metrics = dict[str, Array]
# (phi, input_ids [B,L], valid [B,L], unit_ids [B,L] | None) -> logits [B,L] (-inf off valid)
PolicyFn = Callable[[PyTree, Array, Array, Array | None], Array]
# (theta, batch) -> per-token cross-entropy [B,T] of batch["labels"]
LmLoss = Callable[[PyTree, Batch], Array]
# (input_ids [B,L], mask [B,L]) -> a SpanSeq2SeqBatch (with "label_source")
Corrupt = Callable[[Array, Array], Mapping[str, Array]]

# optax.adam's eps_root: sqrt(nu + eps_root) keeps the derivative of the Adam update finite
# where nu = 0 (parameters with zero gradient); with 0 the second-order meta-gradient is NaN.
ADAM_EPS_ROOT = 1e-12
_NEG = -1e30  # a finite "minus infinity" for masked log-sum-exp (no NaN gradients)
_RATE_SCALE = 1_000_000


def bart_lm_loss(model: Any) -> LmLoss:
    """The LmLoss of a Bart module: `token_losses` without dropout."""
    return lambda theta, batch: token_losses(model, theta, batch)


def policy_fn_from_net(net: Any) -> PolicyFn:
    """The PolicyFn of a PolicyNet (linen module)."""
    return lambda phi, ids, valid, unit_ids=None: net.apply({"params": phi}, ids, valid, unit_ids)


@dataclass(frozen=True)
class MetaSetup:
    """The static parts of a meta problem: config, policy, LM loss and special token ids."""

    cfg: MetaConfig
    policy_fn: PolicyFn
    lm_loss: LmLoss
    special: SpecialTokens
    # (input_ids [B, L], mask [B, L]) -> the corrupted example with "label_source" (see
    # `corruption`); default: full sentence, one <mask> per masked token.
    corrupt: Corrupt | None = None

    def __post_init__(self) -> None:
        if self.corrupt is None:
            default = functools.partial(corrupt_full_sentence_jax, special=self.special)
            object.__setattr__(self, "corrupt", default)
        if not self.cfg.mask_rate > 0:
            raise ValueError(
                "MetaSetup needs the sampling rate: MetaConfig.mask_rate > 0 (the meta learner "
                "resolves 0 to the intermediate stage's --policy.mask_rate)"
            )


# ----------------------------------------------------------------------------- the policy


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


# ----------------------------------------------------------------------------- inner loop


def make_inner_optimizer(cfg: MetaConfig) -> optax.GradientTransformation:
    """The inner loop's optimizer: plain SGD or Adam (eps_root > 0, see ADAM_EPS_ROOT)."""
    if cfg.inner_optimizer == "sgd":
        return optax.sgd(cfg.inner_learning_rate)
    return optax.adam(cfg.inner_learning_rate, eps_root=ADAM_EPS_ROOT)


def corruption(
    output_format: str, infill: str, special: SpecialTokens, *, enc_len: int, dec_len: int
) -> Corrupt:
    """The jittable corruption of the intermediate stage's output format (policies/corrupt.py),
    so the inner step trains on exactly the examples the stage will: masked_spans via
    corrupt_spans_jax, full_sentence via corrupt_full_sentence_jax (every real token is a
    label; label_source points the masked ones at themselves). BERT's 80/10/10 replacement
    has no jitted form (policies/corrupt.py draws it on the host)."""
    if output_format == "masked_spans":
        return functools.partial(
            corrupt_spans_jax, enc_len=enc_len, dec_len=dec_len, special=special, infill=infill
        )
    return functools.partial(corrupt_full_sentence_jax, special=special, infill=infill)


def mlm_examples(input_ids: Array, mask: Array, weights: Array, setup: MetaSetup) -> dict:
    """The MLM batch of `input_ids` masked by `mask`, corrupted as the intermediate stage does
    (setup.corrupt), with "weights" = (the reconstruction of masked token i: w_i; any other
    label: 1) / N, N its real labels (a constant): sum(weights * ce) is the stage's mean
    loss in value, and carries w's gradient on the masked tokens' own labels."""
    ex = dict(setup.corrupt(input_ids, mask))
    source = ex.pop("label_source")
    on_label = jnp.take_along_axis(weights, jnp.maximum(source, 0), axis=-1)
    w = ex["weights"] * jnp.where(source >= 0, on_label, 1.0).astype(weights.dtype)
    count = jnp.maximum(jnp.sum(ex["weights"]), 1).astype(weights.dtype)  # no gradient
    return {**ex, "weights": w / count}


def normalized(batch: Batch) -> dict:
    """A supervised batch with weights w / max(sum w, 1), so sum(w * ce) is its mean loss."""
    w = jnp.asarray(batch["weights"])
    return {**batch, "weights": w / jnp.maximum(jnp.sum(w), 1.0)}


def summed_loss(lm_loss: LmLoss, theta: PyTree, batch: Batch) -> Array:
    """sum(weights * ce): the loss of a batch whose weights are already normalized."""
    ce = lm_loss(theta, batch)
    return jnp.sum(batch["weights"].astype(ce.dtype) * ce)


def outer_loss(lm_loss: LmLoss, theta: PyTree, batch: Batch) -> Array:
    """Downstream teacher-forced cross-entropy: sum(w * ce) / max(sum w, 1)."""
    return summed_loss(lm_loss, theta, normalized(batch))


def split_microbatches(batch: Batch, microbatches: int) -> dict:
    """[B, ...] -> [microbatches, B / microbatches, ...] for every entry; microbatch m holds rows
    m, m + M, m + 2M, ... (M = microbatches). Strided rather than contiguous so that a batch
    split over devices in contiguous blocks (training/sharding.py) splits evenly on every
    device: each microbatch stays data-parallel, with no resharding."""
    return {
        k: v.reshape((v.shape[0] // microbatches, microbatches) + v.shape[1:]).swapaxes(0, 1)
        for k, v in batch.items()
    }


def merge_microbatches(x: Array) -> Array:
    """The inverse of split_microbatches for one array: [M, B / M, ...] -> [B, ...]."""
    return x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def grad_and_token_losses(
    lm_loss: LmLoss, theta: PyTree, batch: Batch, microbatches: int = 1
) -> tuple[PyTree, Array]:
    """(grad_theta sum(weights * ce), ce [B, T]) of `batch`, the gradient summed over its
    `microbatches` microbatches (split_microbatches) by a lax.scan whose per-microbatch work is
    under jax.checkpoint: one microbatch's activations are live at a time, in the forward and
    in the meta-gradient's backward pass alike. Exact (up to float summation order) because the
    weights already carry every batch-level quantity (mlm_examples, normalized) and rows do not
    interact in the LM."""

    def one(th: PyTree, part: Batch) -> tuple[PyTree, Array]:
        ce, pullback = jax.vjp(lambda t: lm_loss(t, part), th)
        return pullback(part["weights"].astype(ce.dtype))[0], ce

    if microbatches == 1:
        return one(theta, batch)
    # Only the microbatch's work is rematerialized, not the accumulation: the add is linear, so
    # the backward pass keeps no per-microbatch copy of the running sum (theta is loop-invariant).
    one = jax.checkpoint(one)

    def body(acc: PyTree, micro: Batch) -> tuple[PyTree, Array]:
        grads, ce = one(theta, micro)
        return jax.tree.map(jnp.add, acc, grads), ce

    zeros = jax.tree.map(jnp.zeros_like, theta)
    grads, ce = jax.lax.scan(body, zeros, split_microbatches(batch, microbatches))
    return grads, merge_microbatches(ce)


def microbatched_losses(
    lm_loss: LmLoss, theta: PyTree, batch: Batch, microbatches: int = 1
) -> Array:
    """The per-token losses ce [B, T] of `batch`, one microbatch (split_microbatches) at a
    time."""
    if microbatches == 1:
        return lm_loss(theta, batch)
    ce = jax.lax.map(lambda micro: lm_loss(theta, micro), split_microbatches(batch, microbatches))
    return merge_microbatches(ce)


def accumulated_grad(lm_loss: LmLoss, theta: PyTree, batch: Batch, microbatches: int = 1) -> PyTree:
    """grad_theta sum(weights * ce) of `batch`, accumulated over `microbatches` microbatches
    (grad_and_token_losses)."""
    return grad_and_token_losses(lm_loss, theta, batch, microbatches)[0]


def _apply_update(
    tx: optax.GradientTransformation, theta: PyTree, opt_state: optax.OptState, grads: PyTree
) -> tuple[PyTree, optax.OptState]:
    updates, opt_state = tx.update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state


def inner_step(
    lm_loss: LmLoss,
    tx: optax.GradientTransformation,
    carry: tuple,
    batch: Batch,
    microbatches: int = 1,
) -> tuple[PyTree, optax.OptState]:
    """One differentiable update: (theta, opt_state) -> (theta', opt_state'), the gradient
    accumulated over `microbatches` microbatches of `batch`."""
    theta, opt_state = carry
    return _apply_update(
        tx, theta, opt_state, accumulated_grad(lm_loss, theta, batch, microbatches)
    )


def _instantiate(cot: PyTree) -> PyTree:
    """Symbolic-zero cotangents (custom_vjp's symbolic_zeros) as arrays."""
    return jax.tree.map(
        lambda c: remat.zeros_for(c) if isinstance(c, SymbolicZero) else c,
        cot,
        is_leaf=lambda c: isinstance(c, SymbolicZero),
    )


def recomputed_inner_step(
    lm_loss: LmLoss, tx: optax.GradientTransformation, microbatches: int = 1
) -> Callable[[tuple, tuple[Array, Batch]], tuple]:
    """`(carry, (k, batch)) -> inner_step(carry, batch)` with a hand-written backward pass that
    keeps only (carry, batch) and recomputes the step once the cotangent has arrived
    (remat.recomputed's barrier), by forward-over-reverse:

        theta' = U(theta, s, g),  g = sum_i w_i grad ce_i(theta)   (U: the optimizer's update)
        (v_theta, v_s, u) = vjp of U at the cotangent (v_theta', v_s')
        cot_theta = v_theta + H u,  cot_w_i = <grad ce_i(theta), u>,  H = sum_i w_i hess ce_i

    with H u and every <grad ce_i, u> from ONE forward-mode product (jax.linearize) of
    theta -> (g, ce) along u (H is symmetric). Why not jax's own reverse-over-reverse: the same
    FLOPs (XLA: 82 vs 83 G on the benchmark config), but 1.6x faster on CPU (0.84 vs 1.32 s;
    the double transposition fuses into slow copy/transpose kernels) and 7% less memory.

    The carry gets no cotangent at k = 0 (lax.cond, at run time): `unroll`'s first step starts
    from theta_0, a constant of the differentiation, so its backward pass is the Jacobian
    product alone, with no Hessian. Only batch["weights"] may depend on the differentiated
    variables (the other entries are token ids)."""

    def step(carry: tuple, xs: tuple[Array, Batch]) -> tuple:
        return inner_step(lm_loss, tx, carry, xs[1], microbatches)

    def losses(theta: PyTree, batch: Batch) -> tuple[PyTree, Array]:
        return grad_and_token_losses(lm_loss, theta, batch, microbatches)

    @jax.custom_vjp
    def f(carry: tuple, xs: tuple[Array, Batch]) -> tuple:
        return step(carry, xs)

    def f_fwd(carry: tuple, xs: tuple[Array, Batch]) -> tuple[tuple, tuple]:
        batch = xs[1]
        for name, leaf in batch.items():
            if name != "weights" and leaf.perturbed and jnp.issubdtype(leaf.value, jnp.inexact):
                raise NotImplementedError(
                    f"recomputed_inner_step differentiates batch['weights'] only; "
                    f"batch[{name!r}] depends on the differentiated variables too"
                )
        carry_perturbed = any(leaf.perturbed for leaf in jax.tree.leaves(carry))
        weights_perturbed = batch["weights"].perturbed
        carry, xs = custom_vjp_primal_tree_values((carry, xs))
        return step(carry, xs), (carry, xs, carry_perturbed, weights_perturbed)

    def f_bwd(res: tuple, cot: tuple) -> tuple:
        carry, (k, batch), carry_perturbed, weights_perturbed = res
        cot = _instantiate(cot)
        carry, batch = remat.after((carry, batch), cot)  # recompute once cot has arrived
        theta, opt_state = carry

        def floats(d_carry: tuple) -> tuple:  # no cotangent for Adam's integer step count
            inexact = lambda x: jnp.issubdtype(x.dtype, jnp.inexact)  # noqa: E731
            return jax.tree.map(lambda d, x: d if inexact(x) else None, d_carry, carry)

        def with_carry() -> tuple:
            (grads, _), linear = jax.linearize(lambda t: losses(t, batch), theta)
            _, update_vjp = jax.vjp(functools.partial(_apply_update, tx), theta, opt_state, grads)
            d_theta, d_state, u = update_vjp(cot)
            h_u, j_u = linear(u)
            return floats((jax.tree.map(jnp.add, d_theta, h_u), d_state)), j_u

        def without_carry() -> tuple:
            # The update's cotangent w.r.t. g (Adam needs g's value; for SGD XLA drops it).
            grads = accumulated_grad(lm_loss, theta, batch, microbatches)
            u = jax.vjp(lambda g: _apply_update(tx, theta, opt_state, g), grads)[1](cot)[0]
            ce = lambda t: microbatched_losses(lm_loss, t, batch, microbatches)  # noqa: E731
            j_u = jax.jvp(ce, (theta,), (u,))[1]
            return floats(jax.tree.map(jnp.zeros_like, carry)), j_u

        if carry_perturbed:
            d_carry, j_u = jax.lax.cond(k == 0, without_carry, with_carry)
        else:
            d_carry, j_u = without_carry()
        d_batch = {name: None for name in batch}
        if weights_perturbed:
            d_batch["weights"] = j_u.astype(batch["weights"].dtype)
        return (d_carry if carry_perturbed else None), (None, d_batch)

    f.defvjp(f_fwd, f_bwd, symbolic_zeros=True)
    return f


def unroll(setup: MetaSetup, theta: PyTree, examples: Batch, extra: tuple = ()) -> PyTree:
    """theta_K after a lax.scan of inner steps over `examples` (leading axis K; each step's
    gradient accumulated over cfg.inner_microbatches microbatches), then one unsplit step on
    each batch of `extra` in order (the downstream steps). Fresh optimizer state. theta is a
    constant of the differentiation (the meta-gradient is w.r.t. phi).

    With cfg.remat each step is `recomputed_inner_step`: its backward pass keeps only theta_k,
    the optimizer state and the batch, and recomputes the step; cfg.remat_segment = S > 0 nests
    the scan in segments of S steps (remat.checkpointed_scan): theta is kept at segment starts
    only, ~K / S + S copies instead of K, for one more forward pass of every step. Both give
    the plain unroll's values and derivatives (to float rounding).

    Cost. The first step's backward pass needs only the weights' cotangent (theta_0 does not
    depend on phi): one Jacobian-vector product of the per-token losses. Every later step also
    needs theta_k's cotangent, a Hessian-vector product through the LM, about twice the FLOPs
    of a gradient. On the benchmark config XLA counts 85 GFLOP for the whole K = 1 meta step,
    then 115 GFLOP for each further step (the step 31, its recomputation and second-order
    backward 84), so time(K) ~ time(1) * (1 + 1.3 (K - 1)) at best, not K * time(1). A plain
    scan also computed the carry's cotangent of the first step and discarded it (one more such
    step; ~3.2x K = 1 at K = 2): recomputed_inner_step skips it at run time. (Peeling the first
    step out of the scan instead costs ~170 MiB more peak memory on the benchmark: XLA's
    straight-line schedule overlaps what the loop keeps apart.)"""
    cfg = setup.cfg
    tx = make_inner_optimizer(cfg)
    theta = jax.lax.stop_gradient(theta)

    def step_fn(microbatches: int) -> Callable[[tuple, tuple[Array, Batch]], tuple]:
        if cfg.remat:
            return recomputed_inner_step(setup.lm_loss, tx, microbatches)
        return lambda carry, xs: inner_step(setup.lm_loss, tx, carry, xs[1], microbatches)

    k = jax.tree.leaves(examples)[0].shape[0]
    segment = cfg.remat_segment if cfg.remat else 0
    step = step_fn(cfg.inner_microbatches)
    carry = remat.checkpointed_scan(
        step, (theta, tx.init(theta)), (jnp.arange(k), examples), segment
    )
    last = step_fn(1)
    for i, batch in enumerate(extra):
        carry = last(carry, (jnp.asarray(k + i), batch))
    return carry[0]


def _flat(x: Array) -> Array:
    """[K, B, ...] -> [B * K, ...], sentence-major: with B split over devices the flat rows
    stay split in contiguous blocks (a K-major flattening would need a resharding)."""
    return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def _unflat(x: Array, shape: tuple[int, ...]) -> Array:
    """The inverse of _flat: [B * K, ...] -> `shape` = [K, B, ...]."""
    return x.reshape((shape[1], shape[0]) + tuple(shape[2:])).swapaxes(0, 1)


def _policy_logits(setup: MetaSetup, phi: PyTree, batch: Batch, leading: int) -> Array:
    """Policy logits for a [leading..., B, L] batch (flattened into one call)."""
    unit_ids = batch.get("unit_ids")
    ids, valid = batch["input_ids"], batch["valid"]
    if leading:
        ids, valid = _flat(ids), _flat(valid)
        unit_ids = None if unit_ids is None else _flat(unit_ids)
    # Recomputed in the backward pass: over K x B sentences the policy's activations would
    # stay live through the whole unroll (~15 MiB per inner step on the benchmark config).
    # (remat.recomputed, not jax.checkpoint, whose recomputation XLA schedules up front.)
    policy = remat.recomputed(lambda p, inputs: setup.policy_fn(p, *inputs))
    logits = policy(phi, (ids, valid, unit_ids))
    return _unflat(logits, batch["input_ids"].shape) if leading else logits


def _check_inner(setup: MetaSetup, inner_batches: Batch, noise: Array) -> None:
    shape = tuple(inner_batches["input_ids"].shape)
    if len(shape) != 3 or shape[0] != setup.cfg.inner_steps:
        raise ValueError(
            f"inner_batches['input_ids'] must be [K, B, L] with K = MetaConfig.inner_steps="
            f"{setup.cfg.inner_steps}; got shape {shape}"
        )
    for name, arr in (("inner_batches['valid']", inner_batches["valid"]), ("noise", noise)):
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(arr.shape)}; expected {shape}")
    micro = setup.cfg.inner_microbatches
    if shape[1] % micro:
        raise ValueError(
            f"MetaConfig.inner_microbatches={micro} must divide the inner batch size; "
            f"inner_batches['input_ids'] has shape {shape} (B = {shape[1]})"
        )


def policy_masks(
    phi: PyTree,
    batch: Batch,
    noise: Array,
    setup: MetaSetup,
    *,
    masks: Array | None = None,
    reference_phi: PyTree | None = None,
    leading: int = 0,
) -> tuple[Array, Array, Array]:
    """(logits, masks, weights) for a policy-masked batch: masks from fixed noise unless given;
    weights (on masked tokens) from `log_inclusion`, relative to `reference_phi` when given
    (else stop_gradient)."""
    cfg = setup.cfg
    logits = _policy_logits(setup, phi, batch, leading)
    valid, units = batch["valid"], batch.get("unit_ids")
    flat = (lambda x: x) if not leading else _flat
    if masks is None:
        masks = sample_masks(
            flat(logits),
            flat(valid),
            flat(noise),
            cfg.mask_rate,
            None if units is None else flat(units),
        )
        masks = _unflat(masks, valid.shape) if leading else masks

    def log_p(lg: Array) -> Array:
        return log_inclusion(lg, valid, units, cfg.mask_rate, cfg.clip_weights)

    log_p_ref = None
    if reference_phi is not None:
        log_p_ref = log_p(_policy_logits(setup, reference_phi, batch, leading))
    return logits, masks, mask_weights(log_p(logits), masks, log_p_ref)


def _regularizers(
    logits: Array, masks: Array, valid: Array, cfg: MetaConfig
) -> tuple[Array, Metrics]:
    """policy_regularizers, with metrics["mask_rate"] = masked / maskable tokens."""
    reg, metrics = policy_regularizers(logits, valid, cfg)
    metrics["mask_rate"] = jnp.sum(masks) / jnp.maximum(jnp.sum(valid), 1)
    return reg, metrics


def inner_loop(
    phi: PyTree,
    theta: PyTree,
    inner_batches: Batch,
    noise: Array,
    setup: MetaSetup,
    *,
    masks: Array | None = None,
    reference_phi: PyTree | None = None,
    qa: Batch | None = None,
) -> tuple[PyTree, Array, Metrics]:
    """theta_K(phi), the policy's regularizer loss and metrics.

    inner_batches: batches.MaskableBatch [K,B,L] (with optional "unit_ids"); noise: Gumbel
    [K,B,L]; masks: optional fixed masks [K,B,L]. qa (needed iff cfg.downstream_steps = 1): a
    Seq2SeqBatch of question -> answer pairs for one QA step after the MLM steps.
    """
    cfg = setup.cfg
    _check_inner(setup, inner_batches, noise)
    if cfg.downstream_steps and qa is None:
        raise ValueError("MetaConfig.downstream_steps=1 needs a `qa` batch (the QA step)")
    logits, masks, weights = policy_masks(
        phi, inner_batches, noise, setup, masks=masks, reference_phi=reference_phi, leading=1
    )
    examples = jax.vmap(lambda i, m, w: mlm_examples(i, m, w, setup))(
        inner_batches["input_ids"], masks, weights
    )
    extra = (normalized(qa),) if cfg.downstream_steps else ()
    theta_k = unroll(setup, theta, examples, extra)
    reg, metrics = _regularizers(logits, masks, inner_batches["valid"], cfg)
    return theta_k, reg, metrics


def downstream_loss(
    lm_loss: LmLoss, theta: PyTree, outer_batch: Batch, contrast: Batch | None = None
) -> tuple[Array, Metrics]:
    """The outer objective: the questions' loss, minus (contrastive) the loss of questions
    about other contexts. Anything an MLM step does for every question alike (answer format,
    output-embedding drift) cancels in the difference; what remains is what the masked
    contexts taught about their own questions."""
    own = outer_loss(lm_loss, theta, outer_batch)
    if contrast is None:
        return own, {"outer_loss": own}
    other = outer_loss(lm_loss, theta, contrast)
    return own - other, {"outer_loss": own - other, "outer_own": own, "outer_contrast": other}


def meta_loss(
    phi: PyTree,
    theta: PyTree,
    inner_batches: Batch,
    outer_batch: Batch,
    noise: Array,
    setup: MetaSetup,
    *,
    masks: Array | None = None,
    reference_phi: PyTree | None = None,
    contrast: Batch | None = None,
    qa: Batch | None = None,
) -> tuple[Array, Metrics]:
    """L_down(theta_K(phi)) + regularizers, and metrics (outer_loss, entropy, mean_p, ...)."""
    theta_k, reg, metrics = inner_loop(
        phi, theta, inner_batches, noise, setup, masks=masks, reference_phi=reference_phi, qa=qa
    )
    out, out_metrics = downstream_loss(setup.lm_loss, theta_k, outer_batch, contrast)
    return out + reg, {**metrics, **out_metrics}


def first_order_loss(
    phi: PyTree,
    theta: PyTree,
    inner_batches: Batch,
    outer_batch: Batch,
    noise: Array,
    setup: MetaSetup,
    *,
    masks: Array | None = None,
    reference_phi: PyTree | None = None,
    contrast: Batch | None = None,
) -> tuple[Array, Metrics]:
    """The first-order surrogate -a <grad L_mlm(theta, phi), sg(grad L_down(theta))> + regs;
    its phi-gradient is the first-order meta-gradient (module docstring). Metrics carry
    outer_loss = L_down(theta) and the alignment <grad L_mlm, grad L_down>."""
    cfg = setup.cfg
    _check_inner(setup, inner_batches, noise)
    lm_loss = setup.lm_loss
    (down, down_metrics), down_grad = jax.value_and_grad(
        lambda th: downstream_loss(lm_loss, th, outer_batch, contrast), has_aux=True
    )(theta)
    down_grad = jax.lax.stop_gradient(down_grad)
    logits, masks, weights = policy_masks(
        phi, inner_batches, noise, setup, masks=masks, reference_phi=reference_phi, leading=1
    )
    examples = jax.vmap(lambda i, m, w: mlm_examples(i, m, w, setup))(
        inner_batches["input_ids"], masks, weights
    )
    label_weights = examples["weights"]

    def per_label_alignment(ex: Batch) -> Array:
        # c_j = <grad ce_j(theta), grad L_down(theta)> for every label: one jvp per microbatch.
        ce = lambda th: microbatched_losses(lm_loss, th, ex, cfg.inner_microbatches)  # noqa: E731
        return jax.jvp(ce, (theta,), (down_grad,))[1]

    align = jax.lax.map(per_label_alignment, jax.lax.stop_gradient(examples))  # [K, B, T]
    alignment = jnp.sum(label_weights * jax.lax.stop_gradient(align))
    reg, metrics = _regularizers(logits, masks, inner_batches["valid"], cfg)
    surrogate = -cfg.inner_learning_rate * alignment
    return surrogate + reg, {**metrics, **down_metrics, "alignment": alignment}


def meta_gradient(
    phi: PyTree,
    theta: PyTree,
    inner_batches: Batch,
    outer_batch: Batch,
    noise: Array,
    setup: MetaSetup,
    *,
    contrast: Batch | None = None,
    qa: Batch | None = None,
) -> tuple[PyTree, Array, Metrics]:
    """(d objective / d phi, objective, metrics) with the estimator of setup.cfg.estimator."""
    if setup.cfg.estimator == "second_order":
        fn = functools.partial(meta_loss, setup=setup, contrast=contrast, qa=qa)
    else:
        if setup.cfg.downstream_steps:
            raise ValueError(
                "MetaConfig.downstream_steps=1 needs estimator='second_order' (the first-order "
                "estimator evaluates the downstream gradient at theta_0, before any step)"
            )
        fn = functools.partial(first_order_loss, setup=setup, contrast=contrast)
    (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(
        phi, theta, inner_batches, outer_batch, noise
    )
    return grads, loss, metrics


# ----------------------------------------------------------------------------- meta step


def make_policy_optimizer(cfg: MetaConfig) -> optax.GradientTransformation:
    """Adam at cfg.learning_rate after global-norm clipping (clip_norm > 0). A frozen token
    table gets exactly zero gradient, hence exactly zero Adam update."""
    adam = optax.adam(cfg.learning_rate)
    return (
        optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam) if cfg.clip_norm > 0 else adam
    )


def create_meta_state(phi: PyTree, cfg: MetaConfig) -> TrainState:
    """Step 0 with fresh policy-optimizer state."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=phi, opt_state=make_policy_optimizer(cfg).init(phi)
    )


def batch_noise(rng: Array, step: Array, batches: Mapping[str, Any]) -> Array:
    """Gumbel noise [K, B, L] for the inner batches: batch k uses the sampler's per-example
    stream gumbel_noise_jax(fold_in(rng, k), step, example_ids[k], L); example_ids default to
    0..B-1."""
    inner = batches["inner"]
    kk, b, length = inner["input_ids"].shape
    ids = inner.get("example_ids", jnp.broadcast_to(jnp.arange(b), (kk, b)))
    return jax.vmap(lambda i, e: gumbel_noise_jax(jax.random.fold_in(rng, i), step, e, length))(
        jnp.arange(kk), ids
    )


def _split(batches: Mapping[str, Any]) -> tuple[dict, Batch, Batch | None, Batch | None]:
    inner = {k: v for k, v in batches["inner"].items() if k != "example_ids"}
    return inner, batches["outer"], batches.get("contrast"), batches.get("qa")


def make_meta_step(
    setup: MetaSetup,
    *,
    mesh: Mesh | None = None,
    theta_sharding: Any = None,
    jit: bool = True,
    donate: bool = True,
) -> Callable[[TrainState, PyTree, Mapping[str, Any], Array], tuple[TrainState, Metrics]]:
    """`meta_step(meta_state, theta, batches, rng) -> (meta_state, metrics)`: one policy update.

    batches: batches.MetaBatches: "inner" [K,B,L] (with "example_ids" [K,B]), "outer" (the
    inner contexts' questions), optional "contrast" (other contexts' questions: the
    contrastive outer loss) and, with downstream_steps = 1, "qa" (the in-loop QA step). `rng`
    is the run's base key (the same every step); the masks' noise is derived from (rng, step)
    as in the sampler. theta is read, never updated. Metrics: loss, outer_loss (outer_own,
    outer_contrast), entropy, mean_p, budget_penalty, mask_rate, grad_norm (and alignment for
    first_order).

    Data parallel with jit=True: the policy state, rng and metrics are replicated over `mesh`
    (default: every device on the data axis), theta is laid out as `theta_sharding` (default
    replicated; `sharding.param_shardings` for FSDP) and the batches as the caller placed them:
    `shard_meta_batches` splits every batch dimension (B, axis 1 of the inner [K,B,L] arrays)
    over the mesh. Everything batch-level (the masked-token count N, the weights' centring, the
    LM gradients of the inner steps, the policy's gradient) is then a sum over devices that XLA
    all-reduces: the step equals the one-device step up to summation order.
    """
    cfg = setup.cfg
    tx = make_policy_optimizer(cfg)

    def meta_step(
        state: TrainState, theta: PyTree, batches: Mapping[str, Any], rng: Array
    ) -> tuple[TrainState, Metrics]:
        noise = batch_noise(rng, state.step, batches)
        inner, outer, contrast, qa = _split(batches)
        grads, loss, metrics = meta_gradient(
            state.params, theta, inner, outer, noise, setup, contrast=contrast, qa=qa
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if not jit:
        return meta_step
    mesh = sharding_lib.make_mesh(MeshConfig()) if mesh is None else mesh
    repl = sharding_lib.replicated(mesh)
    theta_sharding = repl if theta_sharding is None else theta_sharding
    return jax.jit(
        meta_step,
        in_shardings=(repl, theta_sharding, None, repl),  # None: the batches' own layout
        out_shardings=(repl, repl),
        donate_argnums=(0,) if donate else (),
    )


def shard_meta_batches(batches: Mapping[str, Any], mesh: Mesh) -> dict:
    """Host batches (this process's rows of each batch dimension) as global arrays over `mesh`:
    `sharding.shard_batch` of each part, along axis 1 of the inner [K,B,L] arrays."""
    return {
        name: sharding_lib.shard_batch(part, mesh, dim=int(name == "inner"))
        for name, part in batches.items()
    }


def make_meta_objective(
    setup: MetaSetup,
) -> Callable[[PyTree, PyTree, Mapping[str, Any], Array, int], Metrics]:
    """`objective(phi, theta, batches, rng, step) -> metrics`: the meta step's forward (the
    same masks, inner steps and outer loss, no gradient), jitted once: the dev meta-objective
    a policy is selected by (metrics["outer_loss"], lower is better). Its inputs' layout
    decides where it runs (data parallel on batches from `shard_meta_batches`)."""

    def objective(phi, theta, batches, rng, step):
        noise = batch_noise(rng, step, batches)
        inner, outer, contrast, qa = _split(batches)
        _, metrics = meta_loss(phi, theta, inner, outer, noise, setup, contrast=contrast, qa=qa)
        return metrics

    return jax.jit(objective)
