"""The training loop every stage shares: resume, steps, logging, checkpoints, SIGTERM, NaN guard.

The loop owns no model or data logic: it is given a jitted `train_step`, a pure
`batch_for_step(step)` (data order and masks derive from seed and step, so a resumed run
sees exactly the batches an uninterrupted one would), and a checkpoint manager.

Host round-trips: the loss of step s is read back only after step s+1 has been dispatched,
so the host prepares the next batch while the device computes, and a NaN is still caught
before any checkpoint that contains it is written.
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; carries the step and the last good checkpoint."""


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was saved at `step`."""

    def __init__(self, step: int, directory: str):
        super().__init__(
            f"stopped by SIGTERM after step {step}; checkpoint saved in {directory}. "
            "Rerun the same command to resume."
        )
        self.step = step


@contextlib.contextmanager
def sigterm_flag() -> Iterator[dict]:
    """Turn SIGTERM into a flag the loop polls between steps (main thread only)."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: nothing to install
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class LoopOptions:
    num_steps: int
    checkpoint_every: int = 200
    log_every: int = 20
    desc: str = "train"


def _check_finite(step: int, metrics: Mapping[str, Any], last_good: int | None, where: str):
    loss = float(np.asarray(metrics["loss"]))
    if not math.isfinite(loss):
        good = (
            f"step {last_good} in {where}" if last_good is not None else "none (no checkpoint yet)"
        )
        raise NonFiniteLoss(
            f"loss is {loss} at step {step}; stopping. Last good checkpoint: {good}. "
            "Lower the learning rate or check the data, then rerun to resume from it."
        )
    return loss


def run_loop(
    state,
    *,
    train_step: Callable,
    batch_for_step: Callable[[int], Any],
    rng: jax.Array,
    options: LoopOptions,
    checkpoints,
    writer,
    metadata: Mapping[str, Any],
    on_log: Callable[[int, dict], None] | None = None,
):
    """Train from `state.step` to `options.num_steps`, checkpointing on the way; returns the state.

    `checkpoints` is a training.checkpoint.CheckpointManager (save/latest_step/directory);
    `writer` a MetricWriter. Raises Preempted on SIGTERM (after saving) and NonFiniteLoss.
    """
    start = int(jax.device_get(state.step))
    last_good = checkpoints.latest_step()
    pending: tuple[int, Any] | None = None  # (step number, metrics) not yet read back
    with (
        sigterm_flag() as flag,
        tqdm(
            total=options.num_steps, initial=start, desc=options.desc, disable=None, unit="step"
        ) as bar,
    ):
        for step in range(start, options.num_steps):
            batch = batch_for_step(step)
            state, metrics = train_step(state, batch, rng)
            done = step + 1
            if pending is not None:
                _log(pending, writer, bar, options, last_good, checkpoints, on_log)
            pending = (done, metrics)
            must_save = done % options.checkpoint_every == 0 or done == options.num_steps
            if must_save or flag["stop"]:
                _log(pending, writer, bar, options, last_good, checkpoints, on_log, force=True)
                pending = None
                checkpoints.save(done, state, metadata, force=True)
                last_good = done
            if flag["stop"]:
                checkpoints.wait_until_finished()
                raise Preempted(done, str(checkpoints.directory))
        if pending is not None:
            _log(pending, writer, bar, options, last_good, checkpoints, on_log, force=True)
    checkpoints.wait_until_finished()
    return state


def _log(pending, writer, bar, options, last_good, checkpoints, on_log, force=False):
    step, metrics = pending
    bar.update(step - bar.n)
    if not (force or step % options.log_every == 0):
        # Still check every step: a NaN must never reach a checkpoint.
        _check_finite(step, metrics, last_good, str(checkpoints.directory))
        return
    host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    loss = _check_finite(step, host, last_good, str(checkpoints.directory))
    if step % options.log_every == 0 or force:
        writer.write(step, host)
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_log is not None:
            on_log(step, host)
