"""Sharded init and three train steps of the one-layer model on 8 simulated devices, as data=8
and as data=2 x fsdp=4, for test_scale_out.py's comparison with one device.

    python -m tests.training.scale_out_steps OUT

writes OUT.npz (each run's loss and params, helpers.run_arrays) and OUT.json (per run: the
partition specs and per-device shard shapes of the embedding, fc1 and a bias, the Adam moment's
spec, the largest difference between sharded and unsharded init, the batch's shard count).
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from meta_mask.config import MeshConfig
from meta_mask.model import bart
from meta_mask.training import sharding, steps
from tests.training.helpers import (
    COMMON_OPTIM,
    host_params,
    make_batch,
    one_layer_config,
    run_arrays,
    save_runs,
)

# Vocab 128, d_model 32 (embedding 128 x 32, fc1 32 x 64); a low threshold so the tiny matrices
# are split as BART-base's would be.
CFG = one_layer_config()
MIN_SIZE = 256


def main(out: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    arrays, facts = {}, {}
    for name, mesh_cfg in (
        ("data8", MeshConfig(data=8, fsdp=1)),
        ("data2_fsdp4", MeshConfig(data=2, fsdp=4)),
    ):
        mesh = sharding.make_mesh(mesh_cfg)
        # Sharded init: compare with the unsharded init, and record what each device holds.
        params = sharding.init_sharded_params(CFG, jax.random.key(0), mesh, min_size=MIN_SIZE)
        emb = params["shared"]["embedding"]
        kernel = params["encoder"]["layers_0"]["fc1"]["kernel"]
        facts[name] = {
            "emb_spec": list(emb.sharding.spec),
            "emb_shards": sorted({tuple(s.data.shape) for s in emb.addressable_shards}),
            "fc1_spec": list(kernel.sharding.spec),
            "fc1_shards": sorted({tuple(s.data.shape) for s in kernel.addressable_shards}),
            "bias_spec": list(params["final_logits_bias"].sharding.spec),
        }
        reference = bart.init_params(CFG, jax.random.key(0))
        facts[name]["init_max_diff"] = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True)
        )
        # The train step from the same start as the single-device run, state created sharded
        # (as stages.train_stage does) with Adam moments laid out like their params.
        tx = steps.make_optimizer(COMMON_OPTIM)
        start = sharding.place(
            host_params(CFG, 0),
            sharding.param_shardings(host_params(CFG, 0), mesh, min_size=MIN_SIZE),
        )
        state = sharding.sharded_call(
            lambda p, tx=tx: steps.create_train_state(p, tx), start, mesh=mesh, min_size=MIN_SIZE
        )
        state_sharding = jax.tree.map(lambda x: x.sharding, state)
        mu = state.opt_state[1][0].mu["shared"]["embedding"]
        facts[name]["mu_spec"] = list(mu.sharding.spec)
        model = bart.Bart(CFG.replace(dropout=0.1))
        step = steps.make_train_step(model, COMMON_OPTIM, mesh=mesh, state_sharding=state_sharding)
        for i in range(3):
            batch = sharding.shard_batch(make_batch(40 + i, batch=8), mesh)
            state, metrics = step(state, batch, jax.random.key(5))
        facts[name]["batch_shards"] = len(batch["labels"].addressable_shards)
        facts[name]["emb_after_spec"] = list(state.params["shared"]["embedding"].sharding.spec)
        arrays |= run_arrays(name, metrics["loss"], state.params)
    save_runs(out, arrays, facts)


if __name__ == "__main__":
    main(sys.argv[1])
