"""Three train steps of the tiny model on 4 simulated devices, as data=4 and as data=2 x fsdp=2,
for test_steps.py's comparison with one device.

    python -m tests.training.mesh_steps OUT

writes OUT.npz (each run's loss and params, helpers.run_arrays) and OUT.json (the embedding's
partition spec and the number of batch shards per run).
"""

from __future__ import annotations

import sys

import jax

from meta_mask.config import MeshConfig
from meta_mask.training import sharding, steps
from tests.training.helpers import make_batch, run_arrays, save_runs, tiny_setup


def main(out: str) -> None:
    assert jax.device_count() == 4, jax.devices()
    arrays, facts = {}, {}
    for name, mesh_cfg in (
        ("data4", MeshConfig(data=4, fsdp=1)),
        ("data2_fsdp2", MeshConfig(data=2, fsdp=2)),
    ):
        model, optim, state = tiny_setup()
        mesh = sharding.make_mesh(mesh_cfg)
        state_sharding = sharding.param_shardings(state, mesh, min_size=1024)
        state = jax.device_put(state, state_sharding)
        step = steps.make_train_step(model, optim, mesh=mesh, state_sharding=state_sharding)
        for i in range(3):
            batch = sharding.shard_batch(make_batch(40 + i), mesh)
            state, metrics = step(state, batch, jax.random.key(5))
        emb = state.params["shared"]["embedding"]
        facts[name] = {
            "emb_spec": list(emb.sharding.spec),
            "batch_shards": len(batch["labels"].addressable_shards),
        }
        arrays |= run_arrays(name, metrics["loss"], state.params)
    save_runs(out, arrays, facts)


if __name__ == "__main__":
    main(sys.argv[1])
