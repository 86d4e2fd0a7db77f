"""The meta step: one jitted, data-parallel update of the policy, and the dev meta-objective.

`make_meta_step` wraps policies/meta.py's `meta_gradient` with the policy's optimizer (Adam
after clipping), the masks' noise derived from (rng, step) as in the sampler, and the mesh
layout (policy state replicated, theta as given, batches split over the data axes by
`shard_meta_batches`); `make_meta_objective` is the same forward without a gradient, the
objective a policy is selected by.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from meta_mask.config import MeshConfig, MetaConfig
from meta_mask.policies.meta import Batch, MetaSetup, meta_gradient, meta_loss
from meta_mask.policies.sampler import gumbel_noise_jax
from meta_mask.training import sharding as sharding_lib
from meta_mask.training.steps import TrainState

Array = jax.Array
PyTree = Any
Metrics = dict[str, Array]


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
    contrastive outer loss) and, with downstream_steps = N > 0, "qa" (the N in-loop QA steps'
    batches, one after another). `rng` is the run's base key (the same every step); the masks'
    noise is derived from (rng, step) as in the sampler. theta is read, never updated.
    Metrics: loss, outer_loss (outer_own, outer_contrast), entropy, mean_p, budget_penalty,
    mask_rate, grad_norm (and alignment for first_order).

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
