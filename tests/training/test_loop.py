"""The one training loop on a toy learner: resume (with its evaluation history) equals an
uninterrupted run bit for bit, the best evaluated step is kept by orbax and returned, early
stopping, the NaN guard on every step, SIGTERM, metrics.jsonl and TensorBoard events.

Killing a real run with SIGKILL at a known step (every learner of the pipeline) is in
tests/test_kill.py."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meta_mask.training import loop
from meta_mask.training.checkpoint import CheckpointManager
from meta_mask.training.steps import TrainState

TX = optax.adam(0.05)
TARGET = np.linspace(-1.0, 1.0, 6).astype(np.float32)


class Crash(RuntimeError):
    pass


def toy_learner(*, nan_at: int = -1, crash_at: int = -1, peak: int = 8, patience: int = 0):
    """Adam on a noisy quadratic; dev score peaks at step `peak`; the loss is NaN from step
    `nan_at` on; asking for the batch of step `crash_at` raises Crash (a kill, in-process)."""

    def init_state():
        params = {"w": jnp.zeros(6, jnp.float32)}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=TX.init(params))

    @jax.jit
    def step(state, batch, rng):
        noise = jax.random.normal(jax.random.fold_in(rng, state.step), (6,))
        loss_fn = lambda p: jnp.sum((p["w"] - batch["target"] - 0.1 * noise) ** 2)  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        loss = jnp.where(state.step + 1 >= nan_at, jnp.nan, loss) if nan_at >= 0 else loss
        updates, opt_state = TX.update(grads, state.opt_state, state.params)
        new = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        return new, {"loss": loss}

    def batch_for_step(s):
        if s == crash_at:
            raise Crash(s)
        return {"target": jnp.asarray(TARGET * (1 + 0.01 * s))}

    def evaluate(state):
        # A dev score that depends on the state and peaks at `peak`.
        s = int(state.step)
        return {"score": -abs(s - peak) + 1e-3 * float(state.params["w"][0]), "at": float(s)}

    key = lambda r: (r["score"], -r["step"])  # noqa: E731
    return loop.Learner(
        init_state=init_state,
        step=step,
        batch_for_step=batch_for_step,
        rng=jax.random.key(0),
        metadata={"toy": {"peak": peak}},
        compare=("toy",),
        evaluate=evaluate,
        eval_every=2,
        best_key=key,
        should_stop=loop.patience_stop(key, patience),
    )


OPTIONS = loop.LoopOptions(num_steps=20, checkpoint_every=3, log_every=1, desc="toy", keep=1)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_best_step_is_kept_by_orbax_and_returned(tmp_path):
    trained = loop.train(toy_learner(), tmp_path, OPTIONS)
    assert trained.best_step == 8
    assert [e["step"] for e in trained.evals] == [0, *range(2, 21, 2)]
    assert int(trained.state.step) == trained.best_step
    # Only the newest checkpoint (keep=1) and the best one remain on disk.
    with CheckpointManager(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == sorted({trained.best_step, 20})
    # The returned state is exactly the one trained to the best step.
    short = loop.train(toy_learner(), tmp_path / "short", dataclasses.replace(OPTIONS, num_steps=8))
    assert int(short.state.step) == 8
    for a, b in zip(leaves(trained.state), leaves(short.state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    ref = loop.train(toy_learner(patience=3), tmp_path / "ref", OPTIONS)
    for crash_at in (4, 11):  # between checkpoints (last at 3, then at 9 with eval at 10)
        with pytest.raises(Crash):
            loop.train(toy_learner(patience=3, crash_at=crash_at), tmp_path / "run", OPTIONS)
    again = loop.train(toy_learner(patience=3), tmp_path / "run", OPTIONS)
    assert again.evals == ref.evals and again.best_step == ref.best_step
    assert again.stopped_early == ref.stopped_early and again.last_step == ref.last_step
    for a, b in zip(leaves(ref.state), leaves(again.state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_patience_stops_early_and_a_rerun_does_not_train_on(tmp_path):
    trained = loop.train(toy_learner(patience=3), tmp_path, OPTIONS)
    # Best at 8 (evaluated every 2 steps), then 10, 12, 14 are not better: stop at 14.
    assert trained.stopped_early and trained.last_step == 14 and trained.best_step == 8
    again = loop.train(toy_learner(patience=3), tmp_path, OPTIONS)
    assert again.last_step == 14 and again.evals == trained.evals


def test_patience_hook_counts_evaluations_since_the_best():
    stop = loop.patience_stop(lambda r: r["f1"], 2)
    evals = [{"f1": f} for f in (0.1, 0.5, 0.4)]
    assert not stop(evals) and stop([*evals, {"f1": 0.5}])
    assert not loop.patience_stop(lambda r: r["f1"], 0)(evals * 5)


def test_nan_is_caught_on_the_step_it_appears_before_any_checkpoint_holds_it(tmp_path):
    with pytest.raises(loop.NonFiniteLoss, match=r"loss is nan at step 5;.*step 4 in"):
        loop.train(toy_learner(nan_at=5), tmp_path, OPTIONS)
    with CheckpointManager(tmp_path / "checkpoints") as ckpt:
        assert max(ckpt.all_steps()) < 5


def test_sigterm_saves_and_raises_preempted_and_the_rerun_resumes(tmp_path):
    learner = toy_learner()
    batch_for_step = learner.batch_for_step

    def terminate_at_5(s):
        if s == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch_for_step(s)

    with pytest.raises(loop.Preempted, match="after step 6"):
        loop.train(dataclasses.replace(learner, batch_for_step=terminate_at_5), tmp_path, OPTIONS)
    with CheckpointManager(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 6
    again = loop.train(toy_learner(), tmp_path, OPTIONS)
    ref = loop.train(toy_learner(), tmp_path / "ref", OPTIONS)
    for a, b in zip(leaves(ref.state), leaves(again.state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_metrics_jsonl_has_every_step_and_every_evaluation(tmp_path):
    loop.train(toy_learner(), tmp_path, OPTIONS)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in rows if "loss" in r]
    dev = [r["step"] for r in rows if "dev_score" in r]
    assert train == list(range(1, 21)) and dev == [0, *range(2, 21, 2)]
    assert all("dev_train_loss" in r for r in rows if "dev_score" in r and r["step"])
    assert list((tmp_path / "tb").glob("events.*"))


def test_a_checkpoint_of_another_config_is_refused_naming_the_field(tmp_path):
    loop.train(toy_learner(), tmp_path, dataclasses.replace(OPTIONS, num_steps=4))
    with pytest.raises(ValueError, match="toy.peak: checkpoint has 8, expected 9"):
        loop.train(toy_learner(peak=9), tmp_path, OPTIONS)


def test_a_checkpoint_from_before_an_option_existed_resumes_at_its_default(tmp_path):
    # A run killed at step 4, resumed by a version whose config has a new option ("rate"):
    # the checkpoint's metadata lacks it, so it counts as the default the learner declares.
    with pytest.raises(Crash):
        loop.train(toy_learner(crash_at=4), tmp_path, OPTIONS)

    def upgraded(rate):
        learner = toy_learner()
        return dataclasses.replace(
            learner,
            metadata={"toy": {"peak": 8, "rate": rate}},
            defaults={"toy": {"peak": 8, "rate": 0.5}},
        )

    with pytest.raises(ValueError, match="toy.rate: checkpoint has 0.5, expected 0.7"):
        loop.train(upgraded(0.7), tmp_path, OPTIONS)
    resumed = loop.train(upgraded(0.5), tmp_path, OPTIONS)
    ref = loop.train(toy_learner(), tmp_path / "ref", OPTIONS)
    assert resumed.evals == ref.evals
    for a, b in zip(leaves(ref.state), leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)
