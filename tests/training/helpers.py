"""Shared setup of the training tests and of the multi-device modules they run in fresh
processes: the tiny one-layer model, its initial parameters, random batches, the optimizer, and
the run-on-simulated-devices plumbing with its saved results."""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from meta_mask.config import MeshConfig, ModelConfig, OptimConfig, tiny_model_config
from meta_mask.model.bart import Bart, init_params
from meta_mask.training import sharding, steps
from tests.processes import run_module

PAD, EOS, START = 1, 2, 2

# Warmup makes the reported learning rates checkable; clip_norm=0.1 is below the gradient norm
# of a fresh model, so clipping is active.
COMMON_OPTIM = OptimConfig(learning_rate=1e-3, warmup_steps=4, total_steps=100, clip_norm=0.1)


def make_batch(seed: int, batch: int = 4, src_len: int = 16, tgt_len: int = 16, vocab: int = 128):
    """A random batch in the train-step format, with ragged lengths padded by <pad>."""
    rng = np.random.default_rng(seed)
    input_ids = np.full((batch, src_len), PAD, np.int32)
    labels = np.full((batch, tgt_len), PAD, np.int32)
    for b in range(batch):
        n_src = rng.integers(src_len // 2, src_len + 1)
        input_ids[b, : n_src - 1] = rng.integers(4, vocab, n_src - 1)
        input_ids[b, n_src - 1] = EOS
        n_tgt = rng.integers(tgt_len // 2, tgt_len + 1)
        labels[b, : n_tgt - 1] = rng.integers(4, vocab, n_tgt - 1)
        labels[b, n_tgt - 1] = EOS
    decoder_input_ids = np.concatenate([np.full((batch, 1), START, np.int32), labels[:, :-1]], 1)
    weights = (labels != PAD).astype(np.float32)
    return {
        "input_ids": input_ids,
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
        "weights": weights,
    }


def one_layer_config(**overrides: Any) -> ModelConfig:
    """The tiny model with one layer per side: the step machinery is what is under test, and
    compiles stay short."""
    return tiny_model_config(**{"encoder_layers": 1, "decoder_layers": 1, **overrides})


@functools.cache
def host_params(cfg: ModelConfig, seed: int):
    """Initial parameters as numpy (initialised once per config: init is a compile too)."""
    return jax.tree.map(np.asarray, init_params(cfg, jax.random.key(seed)))


def place(tree):
    """A fresh copy of `tree` replicated over the default (all-device) mesh."""
    mesh = sharding.make_mesh(MeshConfig())
    return jax.device_put(jax.tree.map(np.asarray, tree), sharding.replicated(mesh))


def tiny_setup(dropout: float = 0.1, optim: OptimConfig = COMMON_OPTIM, seed: int = 0):
    """(model, optim, state): the one-layer model with `dropout`, and its initial train state
    placed where the jitted step keeps it, so the step donates these very arrays."""
    cfg = one_layer_config(dropout=dropout)
    params = host_params(cfg.replace(dropout=0.0), seed)
    state = steps.create_train_state(params, steps.make_optimizer(optim))
    return Bart(cfg), optim, place(state)


def run_on_devices(module: str, out: pathlib.Path, *args: object, devices: int) -> None:
    """Run `python -m module out args` in a fresh python with `devices` simulated CPU devices."""
    proc = run_module(module, out, *args, devices=devices)
    assert proc.returncode == 0, proc.stderr[-4000:]


def run_arrays(name: str, loss: Any, params: Any) -> dict[str, np.ndarray]:
    """One run's final loss and params as arrays named "name/loss", "name/<keystr path>": what
    a multi-device module saves in its .npz for assert_runs_match."""
    out = {name + "/loss": np.asarray(loss)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out[name + "/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def save_runs(out: str, arrays: dict[str, np.ndarray], facts: dict) -> None:
    """Write OUT.npz (every run's run_arrays) and OUT.json (`facts`) for the test to read."""
    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as f:
        json.dump(facts, f)


def assert_runs_match(npz: pathlib.Path, names: Iterable[str], loss: Any, params: Any) -> None:
    """Each run `name` saved in `npz` (run_arrays) matches loss/params."""
    with np.load(npz) as multi:
        for name in names:
            np.testing.assert_allclose(multi[name + "/loss"], loss, rtol=1e-5)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
                np.testing.assert_allclose(
                    multi[name + "/" + jax.tree_util.keystr(path)],
                    leaf,
                    rtol=1e-4,
                    atol=1e-6,
                    err_msg=f"{name} {jax.tree_util.keystr(path)}",
                )
