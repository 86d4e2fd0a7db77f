"""A meta step problem run on a given mesh: the data-parallel meta step's reference runs.

tests/training/test_scale_out.py runs `main` in a fresh python with 8 simulated CPU devices
(data=8, and data=2 x fsdp=4 with theta FSDP-sharded) and compares with `run` on one device;
tests/training/test_distributed.py runs `main_process` in two jax.distributed processes. Every
process builds the same global batches (from a seed) and contributes its own rows, as
policies/meta_train.py does.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np

from meta_mask.config import MeshConfig, MetaConfig, tiny_model_config
from meta_mask.model.bart import Bart, init_params
from meta_mask.policies import meta, meta_train
from meta_mask.policies import net as netlib
from meta_mask.training import sharding

V, L, B = 128, 12, 8
MASK_ID = V - 1
STEPS = 2
MIN_SIZE = 256  # split the tiny matrices over "fsdp" as BART-base's would be
# K = 4: a first step, then a nested scan of 3 (one segment of 2 and a remainder of 1);
# microbatches split every device's rows; Adam inner steps; the downstream steps.
CFG = MetaConfig(
    inner_steps=4,
    inner_optimizer="adam",
    inner_learning_rate=0.01,
    inner_batch_size=B,
    outer_batch_size=B,
    inner_microbatches=2,
    remat=True,
    remat_segment=2,
    downstream_steps=1,
    mask_rate=0.3,
    learning_rate=1e-2,
)
LM = tiny_model_config(vocab_size=V, encoder_layers=1, decoder_layers=1)


def _qa(rng: np.random.Generator) -> dict:
    ids = rng.integers(4, V - 1, size=(B, L)).astype(np.int32)
    labels = rng.integers(4, V - 1, size=(B, 6)).astype(np.int32)
    dec = np.concatenate([np.full((B, 1), 2, np.int32), labels[:, :-1]], axis=1)
    return {"input_ids": ids, "decoder_input_ids": dec, "labels": labels,
            "weights": (rng.random((B, 6)) < 0.8).astype(np.float32)}  # fmt: skip


def batches(step: int) -> dict:
    """The global host batches of meta step `step` (the same in every process)."""
    rng = np.random.default_rng(100 + step)
    k = CFG.inner_steps
    ids = rng.integers(4, V - 1, size=(k, B, L)).astype(np.int32)
    ids[..., 0], ids[..., -1] = 0, 2
    valid = np.ones_like(ids, bool)
    valid[..., 0] = valid[..., -1] = False
    c_ids = rng.integers(4, V - 1, size=(B, L)).astype(np.int32)
    return {
        "inner": {
            "input_ids": ids,
            "valid": valid,
            "example_ids": rng.permutation(k * B).reshape(k, B).astype(np.int32),
        },
        "outer": _qa(rng),
        "context": {"input_ids": c_ids, "valid": c_ids > 3},
        "qa": _qa(rng),
    }


def run(mesh: jax.sharding.Mesh, fsdp: bool = False) -> dict[str, np.ndarray]:
    """STEPS meta steps on `mesh` (theta FSDP-sharded when `fsdp`): metrics and final phi."""
    pnet = netlib.PolicyNet(
        vocab_size=V, d_model=16, num_layers=1, num_heads=2, ffn_dim=32, max_length=L
    )
    phi = netlib.init_policy_params(pnet, jax.random.key(1), length=L)
    setup = meta.MetaSetup(
        CFG, meta.policy_fn_from_net(pnet), meta.bart_lm_loss(Bart(LM)), mask_id=MASK_ID
    )
    theta = init_params(LM, jax.random.key(2))
    min_size = MIN_SIZE if fsdp else 2**62
    theta_sharding = sharding.param_shardings(theta, mesh, min_size=min_size)
    theta = sharding.place(theta, theta_sharding)
    step = meta.make_meta_step(setup, mesh=mesh, theta_sharding=theta_sharding)
    state = meta.create_meta_state(phi, CFG)
    out: dict[str, np.ndarray] = {}
    for s in range(STEPS):
        placed = meta.shard_meta_batches(meta_train.host_rows(batches(s)), mesh)
        state, metrics = step(state, theta, placed, jax.random.key(3))
        for name, value in metrics.items():
            out[f"{name}/{s}"] = np.asarray(value)
    out["inner_shards"] = np.asarray(len(placed["inner"]["input_ids"].addressable_shards))
    out["theta_sharded"] = np.asarray(
        any(
            not leaf.sharding.is_fully_replicated
            for leaf in jax.tree.leaves(theta)
            if hasattr(leaf, "sharding")
        )
    )
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        out["phi" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def main() -> None:
    """8 simulated devices: data=8, then data=2 x fsdp=4 with theta FSDP-sharded."""
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for name, mesh_cfg, fsdp in (
        ("data8", MeshConfig(data=8, fsdp=1), False),
        ("data2_fsdp4", MeshConfig(data=2, fsdp=4), True),
    ):
        for key, value in run(sharding.make_mesh(mesh_cfg), fsdp).items():
            out[f"{name}/{key}"] = value
    np.savez(sys.argv[1] + ".npz", **out)


def main_process() -> None:
    """One of two jax.distributed processes with 2 CPU devices each: data=2 x fsdp=2."""
    out, address, pid = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    from meta_mask.training import distributed

    assert distributed.initialize(
        "on", distributed.DistributedArgs(address, num_processes=2, process_id=pid)
    )
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    result = run(sharding.make_mesh(MeshConfig(data=2, fsdp=2)), fsdp=True)
    np.savez(out / f"meta{pid}.npz", **result)
    json.dump({"done": True}, open(out / f"meta{pid}.json", "w"))


if __name__ == "__main__":
    main_process() if len(sys.argv) > 2 else main()
