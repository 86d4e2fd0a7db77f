"""The one train step, the optimizer and the token losses.

Owns `TrainState`, the AdamW optimizer with its learning-rate schedule and weight-decay mask,
the token losses every stage and policy trains on (the cross-entropy itself, plain and fused
with the LM head, is the model's: meta_mask/model/bart.py), and the factory `make_train_step`.
Intermediate pre-training (masked-span or full-sentence output) and fine-tuning all feed this
same step: their batches share one format, batches.Seq2SeqBatch, and differ only in content.
The functions here are pure; jitting, donation and shardings are applied once by the factory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, Sharding

from meta_mask.batches import Seq2SeqBatch
from meta_mask.config import MeshConfig, OptimConfig
from meta_mask.model.bart import cross_entropy
from meta_mask.training import sharding as sharding_lib

Batch = Seq2SeqBatch
Metrics = dict[str, jax.Array]
# loss_fn(params, batch, dropout_rng) -> (scalar loss, metrics); the hook of make_train_step.
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, Metrics]]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree, so it jits and checkpoints whole."""

    step: jax.Array  # int32 scalar: number of updates applied so far
    params: Any
    opt_state: optax.OptState


# ----------------------------------------------------------------------------- optimizer


def learning_rate_schedule(optim_cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup 0 -> learning_rate over warmup_steps, then constant / linear / cosine.

    The linear and cosine decays reach learning_rate * end_lr_fraction at total_steps and stay
    there; "constant" ignores end_lr_fraction.
    """
    cfg = optim_cfg
    if cfg.total_steps < 1:
        raise ValueError(
            f"OptimConfig.total_steps={cfg.total_steps}; must be >= 1 (the pipeline sets 0 to "
            "the stage's steps)"
        )
    if not 0 <= cfg.warmup_steps <= cfg.total_steps:
        raise ValueError(
            f"OptimConfig.warmup_steps={cfg.warmup_steps}; must be in [0, total_steps="
            f"{cfg.total_steps}]"
        )
    peak = cfg.learning_rate
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, peak * cfg.end_lr_fraction, decay_steps)
    else:  # cosine; OptimConfig validates the choice
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_fraction)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def weight_decay_mask(params: Any) -> Any:
    """True where AdamW applies weight decay: not on biases nor on LayerNorm scale/bias.

    Decided by parameter path (as HF/fairseq BART fine-tuning does): a leaf named `bias`,
    `scale` or `*_bias` (final_logits_bias), or any leaf inside a module whose name contains
    "norm", is not decayed. Embeddings and Dense kernels are.
    """

    def decays(path: tuple[Any, ...], _leaf: Any) -> bool:
        names = [_key_name(k) for k in path]
        leaf_name = names[-1] if names else ""
        if leaf_name in ("bias", "scale") or leaf_name.endswith("_bias"):
            return False
        return not any("norm" in n.lower() for n in names[:-1])

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping (when clip_norm > 0) then AdamW on the warmup/decay schedule."""
    cfg = optim_cfg
    adamw = optax.adamw(
        learning_rate_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask,
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


def create_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 with fresh optimizer state."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# ----------------------------------------------------------------------------- losses


def _apply(
    model: nn.Module,
    params: Any,
    batch: Batch,
    rng: jax.Array | None,
    deterministic: bool,
    method: str = "__call__",
    **kwargs: Any,
) -> Any:
    if not deterministic and rng is None:
        raise ValueError("deterministic=False needs an rng for dropout")
    rngs = {"dropout": rng} if rng is not None else {}
    # Optional explicit masks pass through; by default the model masks <pad> itself.
    masks = {k: batch[k] for k in ("attention_mask", "decoder_attention_mask") if k in batch}
    return model.apply(
        {"params": params},
        batch["input_ids"],
        batch["decoder_input_ids"],
        deterministic=deterministic,
        rngs=rngs,
        method=method,
        **masks,
        **kwargs,
    )


def _logits(
    model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None, deterministic: bool
) -> jax.Array:
    logits = _apply(model, params, batch, rng, deterministic)
    # Loss math in at least float32 whatever the compute dtype (float64 stays float64, so
    # finite-difference checks can run the loss in double precision).
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _head_cross_entropy(
    model: nn.Module,
    params: Any,
    batch: Batch,
    rng: jax.Array | None,
    deterministic: bool,
    label_smoothing: float,
) -> tuple[jax.Array, jax.Array]:
    """(ce [B,T], correct [B,T]) through the model's fused LM head + loss (reverse mode only)."""
    return _apply(
        model,
        params,
        batch,
        rng,
        deterministic,
        method="token_cross_entropy",
        labels=batch["labels"],
        label_smoothing=label_smoothing,
    )


def token_losses(
    model: nn.Module,
    params: Any,
    batch: Batch,
    *,
    rng: jax.Array | None = None,
    deterministic: bool = True,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Per-token cross-entropy [B,T] (float32; float64 for a float64 model) of `labels`.

    The meta-learned policy reweights these; `weighted_loss` is the ordinary reduction.
    Differentiable in any mode (the meta estimators take its jvp), unlike the fused head of
    `weighted_loss`: the same values, computed from the materialized logits.
    """
    logits = _logits(model, params, batch, rng, deterministic)
    return cross_entropy(logits, batch["labels"], label_smoothing)[0]


def _reduce(ce: jax.Array, correct: jax.Array, weights: jax.Array) -> tuple[jax.Array, Metrics]:
    weights = weights.astype(jnp.float32)
    weight_sum = jnp.sum(weights)
    loss = jnp.sum(weights * ce) / jnp.maximum(weight_sum, 1.0)
    counted = weights > 0
    tokens = jnp.sum(counted, dtype=jnp.int32)
    accuracy = jnp.sum(correct & counted) / jnp.maximum(tokens, 1)
    metrics = {"loss": loss, "accuracy": accuracy, "tokens": tokens, "weight_sum": weight_sum}
    return loss, metrics


def weighted_loss(
    model: nn.Module,
    params: Any,
    batch: Batch,
    *,
    rng: jax.Array | None = None,
    deterministic: bool = True,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """sum(w * ce) / max(sum(w), 1) with w = batch["weights"], and its metrics.

    Metrics: loss, accuracy (argmax == label over tokens with w > 0), tokens (count of w > 0)
    and weight_sum. Zero weights make padding (or any ignored label) invisible to the loss.
    The LM head and the loss are the model's fused `token_cross_entropy` (reverse mode only).
    """
    ce, correct = _head_cross_entropy(model, params, batch, rng, deterministic, label_smoothing)
    return _reduce(ce, correct, batch["weights"])


# ----------------------------------------------------------------------------- steps


def _apply_update(
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_fn: LossFn,
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
) -> tuple[TrainState, Metrics]:
    # fold_in(step): the dropout key depends only on (seed, step), so a run resumed from a
    # checkpoint draws the same masks as one that never stopped.
    step_rng = jax.random.fold_in(rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, step_rng
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        **metrics,
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),  # before clipping
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),  # used by this update
    }
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def default_loss_fn(model: nn.Module, label_smoothing: float = 0.0) -> LossFn:
    """The train loss: `weighted_loss` with dropout on."""

    def loss_fn(params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        return weighted_loss(
            model, params, batch, rng=rng, deterministic=False, label_smoothing=label_smoothing
        )

    return loss_fn


def make_train_step(
    model: nn.Module,
    optim_cfg: OptimConfig,
    *,
    mesh: Mesh | None = None,
    donate: bool = True,
    jit: bool = True,
    loss_fn: LossFn | None = None,
    state_sharding: Any = None,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """`train_step(state, batch, rng) -> (state, metrics)`: one AdamW update.

    `rng` is the run's base key (the same every step); the dropout key is fold_in(rng, step).
    `loss_fn(params, batch, dropout_rng) -> (loss, metrics)` replaces the default weighted
    cross-entropy when a stage needs another loss. Metrics: loss, accuracy, tokens,
    weight_sum, grad_norm, learning_rate.

    With jit=True the step is jitted once here, with the state donated (its buffers are reused
    for the new state) and explicit shardings: the state as `state_sharding` (a sharding or a
    pytree of them; default replicated over `mesh`), the batch split over the mesh's batch axes,
    rng and metrics replicated. `mesh` defaults to all devices on the data axis.

    Fixed shapes never re-trace: a state that is not yet where the step puts its outputs (fresh
    from init or a restore) is moved there first (see `_placing`). Feed batches one way
    throughout (always `sharding.shard_batch`, or always host numpy), as jax also keys its
    trace cache on where they live. The jitted function itself is `train_step.jitted`.
    """
    tx = make_optimizer(optim_cfg)
    schedule = learning_rate_schedule(optim_cfg)
    if loss_fn is None:
        loss_fn = default_loss_fn(model, optim_cfg.label_smoothing)
    train_step = functools.partial(_apply_update, tx, schedule, loss_fn)
    if not jit:
        return train_step
    mesh = sharding_lib.make_mesh(MeshConfig()) if mesh is None else mesh
    repl = sharding_lib.replicated(mesh)
    state_sharding = repl if state_sharding is None else state_sharding
    jitted = jax.jit(
        train_step,
        in_shardings=(state_sharding, sharding_lib.batch_sharding(mesh), repl),
        out_shardings=(state_sharding, repl),
        donate_argnums=(0,) if donate else (),
    )
    return _placing(jitted, state_sharding)


def _placing(jitted: Callable, sharding: Any) -> Callable:
    """`jitted`, moving its first argument to `sharding` (one, or a pytree) when it is elsewhere.

    jax keys its trace cache on where inputs live (the mesh is part of an array's type): a
    state fresh from init (one device, no mesh) and the step's own output (on the mesh) would
    each trace and compile the step, doubling compile time. Checking the first leaf per call
    costs a comparison; the move happens once.
    """
    first = sharding if isinstance(sharding, Sharding) else jax.tree.leaves(sharding)[0]

    def call(arg: Any, *rest: Any) -> Any:
        leaf = jax.tree.leaves(arg)[0]
        if not isinstance(leaf, jax.core.Tracer) and getattr(leaf, "sharding", None) != first:
            arg = jax.device_put(arg, sharding)
        return jitted(arg, *rest)

    call.jitted = jitted
    call.__doc__ = jitted.__doc__
    return call
