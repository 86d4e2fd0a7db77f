"""Mesh, FSDP rules and batch placement on 4 simulated devices, for test_sharding.py.

    python -m tests.training.four_device_mesh OUT.json

writes the data=2 x fsdp=2 mesh's shape, the partition specs of a few parameter shapes, each
device's rows of an 8-row batch, the error for a 6-row batch, and a 2-device mesh's shape.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from meta_mask.config import MeshConfig
from meta_mask.training import sharding


def main(out: str) -> None:
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2))
    tree = {
        "wide": jax.ShapeDtypeStruct((64, 512), np.float32),
        "tall": np.zeros((512, 64), np.float32),
        "odd_rows": np.zeros((33, 1000), np.float32),
        "indivisible": np.zeros((33, 999), np.float32),
        "small": np.zeros((4, 4), np.float32),
        "vector": np.zeros((100000,), np.float32),
    }
    specs = jax.tree.map(lambda s: list(s.spec), sharding.param_shardings(tree, mesh))
    placed = sharding.shard_batch({"x": np.arange(16).reshape(8, 2)}, mesh)
    shards = sorted(
        (int(s.device.id), np.asarray(s.data).tolist()) for s in placed["x"].addressable_shards
    )
    try:
        sharding.shard_batch({"x": np.zeros((6, 2))}, mesh)
        error = ""
    except ValueError as e:
        error = str(e)
    two = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:2])
    facts = {
        "mesh": dict(mesh.shape),
        "specs": specs,
        "shards": shards,
        "error": error,
        "two": dict(two.shape),
    }
    with open(out, "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main(sys.argv[1])
