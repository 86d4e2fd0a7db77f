"""The LM learner: the one train step over a stage's batches, as `loop.train` runs it.

Every stage that trains the seq2seq LM (intermediate pre-training under a masking policy,
fine-tuning on the downstream task) is this learner with its own batches and StageConfig:
AdamW state created in the FSDP layout over the mesh, the jitted train step with donated
state, each host's rows assembled into one global batch, dropout keys from (seed, salt, step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from meta_mask import config as config_lib
from meta_mask.training import sharding, steps
from meta_mask.training.loop import Learner, LoopOptions, patience_stop


def resolved(stage_cfg: config_lib.StageConfig) -> config_lib.StageConfig:
    """The stage config with `optim.total_steps = 0` resolved to the stage's own steps (the
    learning-rate schedule decays over exactly the stage)."""
    if stage_cfg.optim.total_steps:
        return stage_cfg
    optim = dataclasses.replace(stage_cfg.optim, total_steps=stage_cfg.steps)
    return dataclasses.replace(stage_cfg, optim=optim)


def options(stage_cfg: config_lib.StageConfig, desc: str) -> LoopOptions:
    return LoopOptions(
        num_steps=stage_cfg.steps,
        checkpoint_every=stage_cfg.checkpoint_every,
        log_every=stage_cfg.log_every,
        desc=desc,
    )


def lm_learner(
    model: Any,
    params: Any,
    stage_cfg: config_lib.StageConfig,
    *,
    mesh: jax.sharding.Mesh,
    batch_for_step: Callable[[int], Mapping[str, Any]],
    rng: jax.Array,
    metadata: Mapping[str, Any],
    dev_score: Callable[[Any], Mapping[str, float]] | None = None,
    select_by: str = "",
) -> Learner:
    """A Learner training `params` with AdamW under `stage_cfg` (already `resolved`) on
    `batch_for_step(step)` (this host's rows of the global batch, host numpy). `metadata`
    must hold "model" and "stage_config": a checkpoint of another model or stage config is
    refused on resume.

    With stage_cfg.eval_every > 0, `dev_score(params)` (the task's metrics on its dev split)
    is evaluated every eval_every steps; the step with the highest `select_by` metric (the
    earliest among ties) is returned, and the stage stops after stage_cfg.patience
    evaluations without a gain (0: never)."""
    tx = steps.make_optimizer(stage_cfg.optim)
    shardings = sharding.param_shardings(params, mesh)

    def init_state() -> steps.TrainState:
        placed = sharding.place(params, shardings)
        return sharding.sharded_call(lambda p: steps.create_train_state(p, tx), placed, mesh=mesh)

    # Where sharded_call puts the state (the train step keeps it there).
    abstract = jax.eval_shape(lambda p: steps.create_train_state(p, tx), params)
    state_sharding = sharding.param_shardings(abstract, mesh)
    train_step = steps.make_train_step(
        model, stage_cfg.optim, mesh=mesh, state_sharding=state_sharding
    )
    return Learner(
        init_state=init_state,
        step=train_step,
        # This host's rows -> one global array over the mesh.
        batch_for_step=lambda s: sharding.shard_batch(batch_for_step(s), mesh),
        rng=rng,
        metadata=metadata,
        compare=("model", "stage_config"),
        defaults={
            "model": config_lib.to_dict(config_lib.ModelConfig()),
            "stage_config": config_lib.to_dict(config_lib.StageConfig()),
        },
        **_selection(stage_cfg, dev_score, select_by),
    )


def _selection(stage_cfg, dev_score, select_by: str) -> dict[str, Any]:
    if not stage_cfg.eval_every:
        return {}
    if dev_score is None or not select_by:
        raise ValueError("StageConfig.eval_every > 0 needs a dev_score and the metric to select by")
    best_key = lambda record: (record[select_by], -record["step"])  # noqa: E731
    return {
        "evaluate": lambda state: dev_score(state.params),
        "eval_every": stage_cfg.eval_every,
        "best_key": best_key,
        "should_stop": patience_stop(best_key, stage_cfg.patience),
    }
