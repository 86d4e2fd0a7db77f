"""Tests for meta_mask.training.sharding: mesh shapes, batch placement, FSDP rules."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from meta_mask.config import MeshConfig
from meta_mask.training import sharding
from tests.training.helpers import run_on_devices


def test_mesh_shape_resolves_and_validates():
    assert sharding.mesh_shape(MeshConfig(), 4) == (4, 1)
    assert sharding.mesh_shape(MeshConfig(fsdp=2), 8) == (4, 2)
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=2), 4) == (2, 2)
    with pytest.raises(ValueError, match=r"data=3 x fsdp=1 = 3 devices, but 4"):
        sharding.mesh_shape(MeshConfig(data=3), 4)
    with pytest.raises(ValueError, match="fsdp=3 does not divide the 4 devices"):
        sharding.mesh_shape(MeshConfig(fsdp=3), 4)
    with pytest.raises(ValueError, match="fsdp=0"):
        sharding.mesh_shape(MeshConfig(fsdp=0), 4)


def test_single_device_mesh_is_a_mesh_of_one_with_auto_axes():
    mesh = sharding.make_mesh(MeshConfig())
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
    assert tuple(mesh.axis_types) == (AxisType.Auto, AxisType.Auto)
    assert sharding.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    assert sharding.replicated(mesh).spec == PartitionSpec()


def test_shard_batch_places_values_unchanged():
    mesh = sharding.make_mesh(MeshConfig())
    batch = {"input_ids": np.arange(24, dtype=np.int32).reshape(4, 6), "w": np.ones((4, 6))}
    placed = sharding.shard_batch(batch, mesh)
    for key, value in batch.items():
        assert placed[key].sharding == sharding.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(placed[key]), value)
    with pytest.raises(ValueError, match=r"batch\['step'\] is a scalar"):
        sharding.shard_batch({"step": np.int32(3)}, mesh)


def test_param_shardings_replicate_everything_without_fsdp():
    mesh = sharding.make_mesh(MeshConfig())
    tree = {"big": np.zeros((256, 512), np.float32), "bias": np.zeros(512, np.float32)}
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(tree, mesh))
    assert specs == {"big": PartitionSpec(), "bias": PartitionSpec()}


def test_four_device_mesh_batch_and_fsdp_rules(tmp_path):
    out = tmp_path / "facts.json"
    run_on_devices("tests.training.four_device_mesh", out, devices=4)
    facts = json.loads(out.read_text())
    assert facts["mesh"] == {"data": 2, "fsdp": 2}
    assert facts["two"] == {"data": 2, "fsdp": 1}
    assert facts["specs"] == {
        "wide": [None, "fsdp"],  # the largest dim
        "tall": ["fsdp", None],
        "odd_rows": [None, "fsdp"],
        "indivisible": [],  # no dim divisible by 2: replicated
        "small": [],  # below min_size
        "vector": [],  # 1-D (biases, layer norms) stay replicated
    }
    # 8 rows over 4 devices: 2 consecutive rows each, every row exactly once.
    rows = [row for _, data in facts["shards"] for row in data]
    assert sorted(map(tuple, rows)) == [(2 * i, 2 * i + 1) for i in range(8)]
    assert all(len(data) == 2 for _, data in facts["shards"])
    assert "batch size 6, not a multiple of the 4 devices" in facts["error"]
