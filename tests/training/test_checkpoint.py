"""Tests for meta_mask.training.checkpoint: exact round trips, named mismatches, kill safety."""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest

from meta_mask.config import Config, MeshConfig, ModelConfig, OptimConfig, StageConfig
from meta_mask.model.bart import Bart, init_params
from meta_mask.training import checkpoint, sharding, steps
from tests.processes import run_module
from tests.training.helpers import make_batch, one_layer_config


def run_config(**model_kw) -> Config:
    model = one_layer_config(dropout=0.1, **model_kw)
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=2, total_steps=20)
    return Config(model=model, intermediate=StageConfig(optim=optim))


def fresh_state(cfg: Config, seed: int = 0) -> steps.TrainState:
    params = init_params(cfg.model, jax.random.key(seed))
    state = steps.create_train_state(params, steps.make_optimizer(cfg.intermediate.optim))
    mesh = sharding.make_mesh(MeshConfig())
    return jax.device_put(state, sharding.replicated(mesh))


def abstract_state(cfg: Config) -> steps.TrainState:
    return jax.eval_shape(lambda: fresh_state(cfg))


def assert_bitwise_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y)


@pytest.fixture(scope="module")
def trained():
    """A config, its jitted step, and a state after 2 steps (so Adam moments are non-zero)."""
    cfg = run_config()
    train_step = steps.make_train_step(Bart(cfg.model), cfg.intermediate.optim, donate=False)
    state = fresh_state(cfg)
    for i in range(2):
        state, _ = train_step(state, make_batch(i), jax.random.key(7))
    return cfg, train_step, state


def test_round_trip_is_bitwise_including_opt_state_and_step(tmp_path, trained):
    cfg, _, state = trained
    with checkpoint.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.save(2, state, cfg)
    with checkpoint.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.latest_step() == 2
        restored = manager.restore(abstract_state(cfg), expected_metadata=cfg)
        assert manager.metadata(2) == checkpoint.to_jsonable(cfg)
    assert isinstance(restored, steps.TrainState)
    assert int(restored.step) == 2
    assert_bitwise_equal(restored, state)
    # Concrete arrays work as a target too, and keep the target's sharding.
    with checkpoint.CheckpointManager(tmp_path / "ckpt") as manager:
        again = manager.restore(fresh_state(cfg, seed=1))
    assert_bitwise_equal(again, state)
    assert (
        again.params["shared"]["embedding"].sharding == state.params["shared"]["embedding"].sharding
    )


def test_restore_into_different_shapes_names_the_parameter(tmp_path, trained):
    cfg, _, state = trained
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(2, state, cfg)
        other = run_config(vocab_size=100)
        with pytest.raises(checkpoint.CheckpointMismatchError) as err:
            manager.restore(abstract_state(other))
    message = str(err.value)
    assert "'params/shared/embedding'" in message
    assert "(128, 32)" in message and "(100, 32)" in message
    assert "'opt_state/1/0/mu/shared/embedding'" in message  # Adam moments too
    assert str(tmp_path) in message


def test_restore_with_missing_parameter_names_it(tmp_path, trained):
    cfg, _, state = trained
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(2, state, cfg)
        target = abstract_state(cfg)
        params = dict(target.params)
        params["extra_head"] = jax.ShapeDtypeStruct((3, 4), np.float32)
        with pytest.raises(checkpoint.CheckpointMismatchError, match="'params/extra_head'"):
            manager.restore(target.replace(params=params))


def test_restore_with_different_model_config_names_the_field(tmp_path, trained):
    cfg, _, state = trained
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(2, state, cfg)
        # Same shapes, different model: only the config check can catch it.
        other = dataclasses.replace(cfg, model=cfg.model.replace(dropout=0.3))
        with pytest.raises(checkpoint.CheckpointMismatchError) as err:
            manager.restore(abstract_state(cfg), expected_metadata=other)
        assert "model.dropout: checkpoint has 0.1, expected 0.3" in str(err.value)
        # A different optimizer (e.g. a longer schedule on resume) is not a model change.
        longer = dataclasses.replace(cfg, intermediate=StageConfig(steps=99))
        manager.restore(abstract_state(cfg), expected_metadata=longer)


def test_a_field_the_checkpoint_lacks_counts_as_its_default(tmp_path, trained):
    cfg, _, state = trained
    stored = checkpoint.to_jsonable(cfg)
    del stored["model"]["remat"]  # written by a version without the option
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(2, state, stored)
        defaults = {"model": checkpoint.to_jsonable(ModelConfig())}
        with pytest.raises(checkpoint.CheckpointMismatchError, match="has '<missing>'"):
            manager.restore(abstract_state(cfg), expected_metadata=cfg)
        manager.restore(abstract_state(cfg), expected_metadata=cfg, defaults=defaults)
        other = dataclasses.replace(cfg, model=cfg.model.replace(remat=True))
        with pytest.raises(
            checkpoint.CheckpointMismatchError, match="model.remat: checkpoint has False"
        ):
            manager.restore(abstract_state(cfg), expected_metadata=other, defaults=defaults)


def test_partial_checkpoint_dir_is_ignored_and_cleaned(tmp_path, trained):
    cfg, _, state = trained
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(2, state, cfg)
    # What a kill during the save of step 4 leaves: a tmp folder that was never renamed.
    partial = tmp_path / "4.orbax-checkpoint-tmp-1795673958"
    shutil.copytree(tmp_path / "2", partial)
    os.remove(partial / "state" / "manifest.ocdbt")
    with checkpoint.CheckpointManager(tmp_path) as manager:
        assert manager.latest_step() == 2
        assert manager.all_steps() == [2]
        restored = manager.restore(abstract_state(cfg))
    assert int(restored.step) == 2
    assert not partial.exists()


def test_process_killed_mid_save_leaves_only_complete_steps(tmp_path):
    proc = run_module("tests.training.killed_mid_save", tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert any(p.name.startswith("2.orbax-checkpoint-tmp") for p in tmp_path.iterdir())
    target = {"w": jax.ShapeDtypeStruct((4, 4), np.float32)}
    with checkpoint.CheckpointManager(tmp_path) as manager:
        assert manager.all_steps() == [1]
        restored = manager.restore(target, expected_metadata={"model": {"d_model": 4}})
    np.testing.assert_array_equal(restored["w"], np.ones((4, 4), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def test_interval_and_max_to_keep(tmp_path, trained):
    cfg, _, state = trained
    with checkpoint.CheckpointManager(tmp_path, max_to_keep=2, save_interval_steps=2) as m:
        saved = [m.save(step, state, cfg) for step in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        assert m.save(7, state, cfg, force=True)
        m.wait_until_finished()
        assert m.all_steps() == [6, 7]
    with checkpoint.CheckpointManager(tmp_path) as m:
        with pytest.raises(FileNotFoundError, match="step 3"):
            m.restore(abstract_state(cfg), step=3)
    with checkpoint.CheckpointManager(tmp_path / "empty") as m:
        assert m.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            m.restore(abstract_state(cfg))


def test_resumed_training_is_bitwise_identical(tmp_path):
    """2N steps == N steps, save, restore in a fresh manager, N steps (dropout on)."""
    cfg = run_config()
    model = Bart(cfg.model)
    rng = jax.random.key(11)
    n = 3

    straight = steps.make_train_step(model, cfg.intermediate.optim)
    state = fresh_state(cfg)
    for i in range(2 * n):
        state, _ = straight(state, make_batch(100 + i), rng)

    first = steps.make_train_step(model, cfg.intermediate.optim)
    half = fresh_state(cfg)
    with checkpoint.CheckpointManager(tmp_path) as manager:
        for i in range(n):
            half, _ = first(half, make_batch(100 + i), rng)
        manager.save(n, half, cfg)
        # As the loop does: hand the state to the (donating) step while the save is in flight.
        _, _ = first(half, make_batch(999), rng)

    second = steps.make_train_step(model, cfg.intermediate.optim)
    replicated = sharding.replicated(sharding.make_mesh(MeshConfig()))
    with checkpoint.CheckpointManager(tmp_path) as manager:
        # eval_shape targets carry no sharding: place the result as the step's outputs are.
        resumed = manager.restore(abstract_state(cfg), expected_metadata=cfg, sharding=replicated)
    assert all(x.sharding == replicated for x in jax.tree.leaves(resumed))
    for i in range(int(resumed.step), 2 * n):
        resumed, _ = second(resumed, make_batch(100 + i), rng)
    assert int(resumed.step) == 2 * n
    assert second.jitted._cache_size() == 1  # the restored state did not force a re-trace
    assert_bitwise_equal(resumed, state)


def test_save_and_load_bare_params(tmp_path, trained):
    cfg, _, state = trained
    path = tmp_path / "policy"
    checkpoint.save_params(path, state.params)
    assert_bitwise_equal(checkpoint.load_params(path, state.params), state.params)
    loaded = checkpoint.load_params(path)
    assert_bitwise_equal(loaded, state.params)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="'shared/embedding'"):
        checkpoint.load_params(
            path, init_params(run_config(vocab_size=64).model, jax.random.key(0))
        )
    checkpoint.save_params(path, state.params, overwrite=True)  # overwriting is opt-in
    with pytest.raises(Exception, match="exists"):
        checkpoint.save_params(path, state.params)
