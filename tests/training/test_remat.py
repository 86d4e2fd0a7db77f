"""meta_mask.training.remat: a recomputed step and nested (segment) checkpointing of a scan give
the plain scan's values and derivatives (float64), and the segments lower the compiled memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_mask.training import remat
from tests.helpers import x64


def step(carry, xs):
    """A nonlinear step with a float and an integer carry and a float/int input."""
    theta, count = carry
    w, ids = xs["w"], xs["ids"]
    grad = jnp.tanh(theta @ theta.T) @ theta * w[:, None] + jnp.sin(ids)[:, None]
    return theta - 0.1 * grad, count + 1


def unrolled(w, theta, segment, wrap):
    xs = {"w": w, "ids": jnp.arange(w.size).reshape(w.shape) % 5}
    fn = remat.recomputed(step) if wrap else step
    theta_k, count = remat.checkpointed_scan(fn, (theta, jnp.int32(0)), xs, segment)
    return jnp.sum(theta_k**2) + 0.0 * count


@pytest.mark.parametrize("n,segment", [(6, 2), (7, 3), (5, 8), (4, 0)])
def test_checkpointed_scan_equals_the_plain_scan(n, segment):
    with x64():
        rng = np.random.default_rng(n)
        w = jnp.asarray(rng.normal(size=(n, 4)))
        theta = jnp.asarray(rng.normal(size=(4, 3)) * 0.5)
        plain = jax.jit(jax.value_and_grad(unrolled, argnums=(0, 1)), static_argnums=(2, 3))
        value, (gw, gt) = plain(w, theta, 0, False)
        assert float(jnp.linalg.norm(gw)) > 1e-3  # a comparison that means something
        for wrap in (False, True):
            v, (gw2, gt2) = plain(w, theta, segment, wrap)
            np.testing.assert_allclose(v, value, rtol=1e-13)
            np.testing.assert_allclose(gw2, gw, rtol=1e-11, atol=1e-14)
            np.testing.assert_allclose(gt2, gt, rtol=1e-11, atol=1e-14)


def test_recomputed_differentiates_only_what_is_differentiated():
    """Gradients w.r.t. the inputs alone (carry constant) and the carry alone both match."""
    with x64():
        rng = np.random.default_rng(0)
        w = jnp.asarray(rng.normal(size=(3, 4)))
        theta = jnp.asarray(rng.normal(size=(4, 3)) * 0.5)
        for argnums in (0, 1):
            ref = jax.grad(unrolled, argnums)(w, theta, 0, False)
            got = jax.grad(unrolled, argnums)(w, theta, 2, True)
            np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-14)


def test_segments_keep_fewer_carries():
    """24 steps of a carry of 1 MiB: the plain scan keeps every carry for the backward pass,
    segments of 5 keep ~24 / 5 + 5 (XLA's compiled temporaries)."""

    def loss(w, theta, segment):
        fn = remat.recomputed(lambda c, x: jnp.tanh(c * x + 0.1 * c**2))
        return jnp.sum(remat.checkpointed_scan(fn, theta, w, segment))

    w = jnp.ones((24, 1))
    theta = jnp.ones((512, 512), jnp.float32)  # 1 MiB
    temp = {}
    for segment in (0, 5):
        fn = jax.jit(jax.grad(loss), static_argnums=2)
        compiled = fn.lower(w, theta, segment).compile()
        temp[segment] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    assert temp[0] >= 24, temp
    assert temp[5] <= 14, temp
