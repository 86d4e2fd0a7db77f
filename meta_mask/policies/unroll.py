"""The differentiable inner loop: K optimizer steps of the language model, and their backward pass.

Pure functions of (theta, batches) whose batches carry the policy's weights (the only input
the meta-gradient flows through). `unroll` runs the K inner steps in a lax.scan (gradients
accumulated over microbatches, optional downstream steps after them); with remat each step is
`recomputed_inner_step`, whose hand-written backward pass keeps only (theta_k, optimizer state,
batch) and recomputes the step forward-over-reverse; remat_segment nests the scan
(training/remat.py). Also the LM losses the meta objective is made of (`outer_loss`). Knows
nothing of the policy (policies/meta.py builds the weighted batches).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values

from meta_mask.config import MetaConfig
from meta_mask.training import remat
from meta_mask.training.steps import token_losses

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]
# (theta, batch) -> per-token cross-entropy [B,T] of batch["labels"]
LmLoss = Callable[[PyTree, Batch], Array]

# optax.adam's eps_root: sqrt(nu + eps_root) keeps the derivative of the Adam update finite
# where nu = 0 (parameters with zero gradient); with 0 the second-order meta-gradient is NaN.
ADAM_EPS_ROOT = 1e-12


def bart_lm_loss(model: Any) -> LmLoss:
    """The LmLoss of a Bart module: `token_losses` without dropout."""
    return lambda theta, batch: token_losses(model, theta, batch)


def make_inner_optimizer(cfg: MetaConfig) -> optax.GradientTransformation:
    """The inner loop's optimizer: plain SGD or Adam (eps_root > 0, see ADAM_EPS_ROOT); the
    groups in cfg.inner_frozen get no update (and no optimizer state)."""
    if cfg.inner_optimizer == "sgd":
        tx = optax.sgd(cfg.inner_learning_rate)
    else:
        tx = optax.adam(cfg.inner_learning_rate, eps_root=ADAM_EPS_ROOT)
    if not cfg.inner_frozen:
        return tx
    labels = lambda theta: jax.tree.map(  # noqa: E731
        lambda frozen: "frozen" if frozen else "trained", frozen_leaves(cfg, theta)
    )
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def frozen_leaves(cfg: MetaConfig, theta: PyTree) -> PyTree:
    """theta's structure with True on the leaves of the groups in cfg.inner_frozen (top-level
    keys of theta); ValueError naming the groups when one is not in theta."""
    groups = sorted(theta)
    unknown = [g for g in cfg.inner_frozen if g not in theta]
    if unknown:
        raise ValueError(
            f"--meta.inner_frozen={','.join(cfg.inner_frozen)}: no LM parameter group "
            f"{', '.join(map(repr, unknown))}; the groups are {', '.join(groups)}"
        )
    return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key in cfg.inner_frozen, theta)


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


def unroll(
    cfg: MetaConfig, lm_loss: LmLoss, theta: PyTree, examples: Batch, extra: tuple = ()
) -> PyTree:
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
    tx = make_inner_optimizer(cfg)
    theta = jax.lax.stop_gradient(theta)

    def step_fn(microbatches: int) -> Callable[[tuple, tuple[Array, Batch]], tuple]:
        if cfg.remat:
            return recomputed_inner_step(lm_loss, tx, microbatches)
        return lambda carry, xs: inner_step(lm_loss, tx, carry, xs[1], microbatches)

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
