"""The one training loop: every trained thing (the LM stages, the supervised policy, the
meta-learned policy) runs through `train`.

What is trained is described by a `Learner`: a fresh state, a jitted step, a pure
`batch_for_step(step)` and optionally an `evaluate` hook on dev data with a `best_key` (the
best evaluated step is kept by orbax's best-checkpoint policy and returned) and a
`should_stop` hook (early stopping). The loop owns everything else, for every learner alike:

- resume: the newest checkpoint in `<directory>/checkpoints` is restored (its config checked
  against the learner's) together with the evaluation history, so a run killed at any point
  and rerun ends with the same parameters, bit for bit, as an uninterrupted one (data order,
  masks and dropout derive from seed and step);
- SIGTERM: a checkpoint is saved and `Preempted` raised (the CLI exits with 143);
- the NaN guard, every step: a non-finite loss raises `NonFiniteLoss` before any checkpoint
  that holds it is written;
- metrics: `<directory>/metrics.jsonl` and TensorBoard events (training metrics every
  `log_every` steps, evaluations with a "dev_" prefix), and a progress bar.

Host round-trips: the loss of step s is read back only after step s+1 has been dispatched, so
the host prepares the next batch while the device computes.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from meta_mask.evaluation.writers import MetricWriter
from meta_mask.training import checkpoint as checkpoint_lib
from meta_mask.training.distributed import is_writer

Record = dict[str, Any]


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


@dataclass(frozen=True)
class Learner:
    """One trained thing, as the loop sees it.

    init_state: () -> a fresh state: a pytree with an int `step` field, placed where `step`
        expects it (its leaves' shardings are reused when a checkpoint is restored).
    step: (state, batch, rng) -> (state, metrics with a scalar "loss"); jitted, may donate state.
    batch_for_step: step -> the batch of that step; a pure function of the step number.
    rng: the run's key for this learner (the step folds the step number in itself).
    metadata: stored with every checkpoint; the `compare` sections must equal the stored ones
        on resume (a checkpoint of another config is refused, naming the field).
    defaults: the `compare` sections of the default config: a field a checkpoint lacks (it
        was written before that option existed) counts as its default.
    evaluate: state -> dev metrics {name: float}; run before the first step, every
        `eval_every` steps and after the last one.
    best_key: an evaluation record -> a sortable key, larger is better; the returned state is
        the best evaluated one (None: the last state).
    should_stop: the evaluation history so far -> stop now (early stopping).
    """

    init_state: Callable[[], Any]
    step: Callable[[Any, Any, jax.Array], tuple[Any, Mapping[str, Any]]]
    batch_for_step: Callable[[int], Any]
    rng: jax.Array
    metadata: Mapping[str, Any] = field(default_factory=dict)
    compare: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    evaluate: Callable[[Any], Mapping[str, float]] | None = None
    eval_every: int = 0
    best_key: Callable[[Record], Any] | None = None
    should_stop: Callable[[Sequence[Record]], bool] | None = None


@dataclass(frozen=True)
class LoopOptions:
    num_steps: int
    checkpoint_every: int = 200
    log_every: int = 20
    desc: str = "train"
    keep: int = 2  # newest checkpoints kept for resuming (the best one is kept besides)


@dataclass
class Trained:
    """What `train` returns: the final state (the best evaluated one when the learner has a
    `best_key`) and the run's evaluation history."""

    state: Any
    evals: list[Record]
    best_step: int | None
    last_step: int
    stopped_early: bool

    def history(self) -> dict[str, Any]:
        return {
            "evals": self.evals,
            "best_step": self.best_step,
            "last_step": self.last_step,
            "stopped_early": self.stopped_early,
        }


def patience_stop(best_key: Callable[[Record], Any], patience: int):
    """A `should_stop` hook: stop once `patience` evaluations in a row were not better (by
    `best_key`) than the best before them; 0 never stops."""

    def should_stop(evals: Sequence[Record]) -> bool:
        if not patience or not evals:
            return False
        best = max(range(len(evals)), key=lambda i: best_key(evals[i]))
        return len(evals) - 1 - best >= patience

    return should_stop


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


def _host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def _shardings(state: Any) -> Any:
    leaves = jax.tree.leaves(state)
    if leaves and all(isinstance(x, jax.Array) for x in leaves):
        return jax.tree.map(lambda x: x.sharding, state)
    return None


class _Run:
    """The mutable bookkeeping of one `train` call (kept out of the loop's body)."""

    def __init__(self, learner: Learner, options: LoopOptions, ckpt, writer, bar):
        self.learner, self.options = learner, options
        self.ckpt, self.writer, self.bar = ckpt, writer, bar
        self.evals: list[Record] = []
        self.window: list[float] = []  # training losses since the last evaluation
        self.last_good = ckpt.latest_step()

    def metadata(self) -> dict[str, Any]:
        return {**self.learner.metadata, "evals": self.evals}

    def check(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Read back one step's metrics; NonFiniteLoss if its loss is not finite."""
        host = _host_metrics(metrics)
        loss = host["loss"]
        if not math.isfinite(loss):
            good = (
                f"step {self.last_good} in {self.ckpt.directory}"
                if self.last_good is not None
                else "none (no checkpoint yet)"
            )
            raise NonFiniteLoss(
                f"loss is {loss} at step {step}; stopping. Last good checkpoint: {good}. "
                "Lower the learning rate or check the data, then rerun to resume from it."
            )
        self.window.append(loss)
        self.bar.update(step - self.bar.n)
        if step % self.options.log_every == 0 or step == self.options.num_steps:
            self.writer.write(step, host)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        return host

    def evaluate(self, step: int, state: Any) -> Record:
        record: Record = {"step": step}
        if self.window:
            record["train_loss"] = float(np.mean(self.window))
        self.window = []
        record.update({k: float(v) for k, v in self.learner.evaluate(state).items()})
        self.evals.append(record)
        self.writer.write(step, {k: v for k, v in record.items() if k != "step"}, prefix="dev_")
        return record

    def save(self, step: int, state: Any, record: Record | None = None) -> None:
        self.ckpt.save(step, state, self.metadata(), metrics=record, force=True)
        self.last_good = step


def _manager(directory: pathlib.Path, learner: Learner, options: LoopOptions):
    best_fn = None
    if learner.best_key is not None:
        key = learner.best_key
        best_fn = lambda metrics: key(metrics)  # noqa: E731 - orbax wants a plain callable
    return checkpoint_lib.CheckpointManager(
        directory / "checkpoints", max_to_keep=options.keep, best_fn=best_fn
    )


def train(learner: Learner, directory: str | pathlib.Path, options: LoopOptions) -> Trained:
    """Train `learner` to `options.num_steps` (or an early stop), resuming from the newest
    checkpoint in `directory`; returns the final (or best evaluated) state and the history.

    Raises Preempted on SIGTERM (after saving) and NonFiniteLoss on a NaN/Inf loss.
    """
    directory = pathlib.Path(directory)
    state = learner.init_state()
    shardings = _shardings(state)
    with (
        _manager(directory, learner, options) as ckpt,
        MetricWriter(directory, enabled=is_writer()) as writer,
        sigterm_flag() as flag,
        tqdm(total=options.num_steps, desc=options.desc, disable=None, unit="step") as bar,
    ):
        run = _Run(learner, options, ckpt, writer, bar)
        if ckpt.latest_step() is not None:
            stored = ckpt.metadata()
            state = ckpt.restore(
                jax.eval_shape(lambda: state),
                expected_metadata=learner.metadata,
                compare_sections=learner.compare,
                defaults=learner.defaults,
                sharding=shardings,
            )
            run.evals = list(stored.get("evals", []))
        elif learner.evaluate is not None:
            run.save(0, state, run.evaluate(0, state))
        step = int(jax.device_get(state.step))
        bar.update(step)
        stopped = learner.should_stop is not None and learner.should_stop(run.evals)
        pending: tuple[int, Any] | None = None  # (step, metrics) not yet read back
        while step < options.num_steps and not stopped:
            state, metrics = learner.step(state, learner.batch_for_step(step), learner.rng)
            step += 1
            if pending is not None:
                run.check(*pending)
            pending = (step, metrics)
            evaluating = learner.evaluate is not None and (
                step % max(learner.eval_every, 1) == 0 or step == options.num_steps
            )
            saving = step % options.checkpoint_every == 0 or step == options.num_steps
            if not (evaluating or saving or flag["stop"]):
                continue
            run.check(*pending)  # nothing non-finite reaches a checkpoint
            pending = None
            record = run.evaluate(step, state) if evaluating else None
            if record is not None:
                bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "step"})
                stopped = learner.should_stop is not None and learner.should_stop(run.evals)
            run.save(step, state, record)
            if flag["stop"] and not stopped and step < options.num_steps:
                ckpt.wait_until_finished()
                raise Preempted(step, str(ckpt.directory))
        ckpt.wait_until_finished()
        best = ckpt.best_step() if learner.best_key is not None else None
        if best is not None and best != step:
            state = ckpt.restore(jax.eval_shape(lambda: state), step=best, sharding=shardings)
    return Trained(
        state=state, evals=run.evals, best_step=best, last_step=step, stopped_early=stopped
    )
