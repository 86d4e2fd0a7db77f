"""Rematerialization for differentiable unrolls: a step whose backward pass recomputes it, and
nested (segment) checkpointing of a scan of such steps.

`recomputed(fn)` is `fn(carry, xs) -> carry` with a backward pass that saves only its inputs and
recomputes `fn` (with its own saved values) once the output cotangent has arrived:

- the recomputation depends on the cotangent (`after`), so XLA cannot schedule it as soon as
  its inputs exist, e.g. in the forward pass or while a later step's backward pass still
  holds its activations, with both sets live at once (jax.checkpoint's optimization barrier
  does not order anything on CPU);
- only inputs that are being differentiated get a cotangent (`symbolic_zeros`).

The meta-learning unroll's inner step has its own backward pass (policies/unroll.py's
`recomputed_inner_step`, forward-over-reverse, with the same barrier); `recomputed` here wraps
the nested segments.

`checkpointed_scan(step, carry, xs, segment)` runs `step` over the leading axis of `xs`. With
`segment = S > 0` it is a scan of recomputed segments of S steps (the last one shorter when S
does not divide the length): only each segment's starting carry is kept for the backward pass,
and a segment's backward pass recomputes its S steps (keeping their carries) before going back
through them. Live carries: n/S + S instead of n, for one more forward pass of every step.
Values and derivatives are those of the plain scan (the same operations, recomputed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values

PyTree = Any
Step = Callable[[PyTree, PyTree], PyTree]


def after(tree: PyTree, cot: PyTree) -> PyTree:
    """`tree` (same values), computed only once `cot` exists: every inexact leaf gets
    0 * (one element of cot) added. A true data dependency, which XLA's scheduler respects;
    jax.lax.optimization_barrier does not order anything on CPU, where XLA removes barriers
    before scheduling (a K = 1 meta step's backward recomputation was hoisted into the forward
    pass, both sets of activations live at once). x * 0 is not folded for floats (NaN), and
    a non-finite cotangent makes the gradient non-finite anyway."""
    first = next(c for c in jax.tree.leaves(cot) if jnp.issubdtype(c.dtype, jnp.inexact))
    zero = 0 * first.reshape(-1)[0]
    inexact = lambda x: jnp.issubdtype(x.dtype, jnp.inexact)  # noqa: E731
    return jax.tree.map(lambda x: x + zero.astype(x.dtype) if inexact(x) else x, tree)


def zeros_for(cot: Any) -> Any:
    """A symbolic-zero cotangent as an array (float0 for integer outputs)."""
    if cot.dtype == jax.dtypes.float0:
        return np.zeros(cot.shape, jax.dtypes.float0)
    return jnp.zeros(cot.shape, cot.dtype)


def recomputed(fn: Step) -> Step:
    """`fn(carry, xs)` whose backward pass keeps only (carry, xs) and recomputes `fn` after the
    output cotangent has arrived; cotangents only for the inputs being differentiated."""

    @jax.custom_vjp
    def f(carry: PyTree, xs: PyTree) -> PyTree:
        return fn(carry, xs)

    def f_fwd(carry: PyTree, xs: PyTree) -> tuple[PyTree, tuple]:
        # Integer leaves (an optimizer's step count) have no cotangent to compute.
        perturbed = tuple(
            leaf.perturbed and jnp.issubdtype(jnp.result_type(leaf.value), jnp.inexact)
            for leaf in jax.tree.leaves((carry, xs))
        )
        carry, xs = custom_vjp_primal_tree_values((carry, xs))
        return fn(carry, xs), (carry, xs, perturbed)

    def f_bwd(res: tuple, cot: PyTree) -> tuple[PyTree, PyTree]:
        carry, xs, perturbed = res
        is_zero = lambda c: isinstance(c, SymbolicZero)  # noqa: E731
        cot = jax.tree.map(lambda c: zeros_for(c) if is_zero(c) else c, cot, is_leaf=is_zero)
        carry, xs = after((carry, xs), cot)  # recompute once the cotangent has arrived
        leaves, treedef = jax.tree.flatten((carry, xs))

        def of_perturbed(diff: list) -> PyTree:
            it = iter(diff)
            args = [next(it) if p else x for x, p in zip(leaves, perturbed, strict=True)]
            return fn(*jax.tree.unflatten(treedef, args))

        diff = [x for x, p in zip(leaves, perturbed, strict=True) if p]
        _, pullback = jax.vjp(of_perturbed, diff)
        it = iter(pullback(cot)[0])
        grads = [next(it) if p else None for p in perturbed]
        return tuple(jax.tree.unflatten(treedef, grads))

    f.defvjp(f_fwd, f_bwd, symbolic_zeros=True)
    return f


def _length(xs: PyTree) -> int:
    return jax.tree.leaves(xs)[0].shape[0]


def scan_steps(step: Step, carry: PyTree, xs: PyTree) -> PyTree:
    """`step` over the leading axis of `xs` (a lax.scan); the final carry."""
    if _length(xs) == 0:
        return carry
    return jax.lax.scan(lambda c, x: (step(c, x), None), carry, xs)[0]


def checkpointed_scan(step: Step, carry: PyTree, xs: PyTree, segment: int = 0) -> PyTree:
    """`scan_steps`, keeping only every `segment`-th carry for the backward pass when
    `segment` > 0 (module docstring); `step` is typically `recomputed`."""
    n = _length(xs)
    if segment <= 0 or n <= segment:
        return scan_steps(step, carry, xs)
    run = recomputed(lambda c, seg: scan_steps(step, c, seg))
    full = n // segment
    head = jax.tree.map(lambda x: x[: full * segment].reshape((full, segment) + x.shape[1:]), xs)
    carry = scan_steps(run, carry, head)
    if n % segment:
        carry = run(carry, jax.tree.map(lambda x: x[full * segment :], xs))
    return carry
