"""Scale-out on 8 simulated CPU devices: path-aware FSDP rules, sharded init, the train step
under data parallelism (data=8) and FSDP (data=2 x fsdp=4) against one device, and the meta
step with its batches split over data=2 x fsdp=4 and theta FSDP-sharded."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from meta_mask.config import MeshConfig
from meta_mask.model import bart
from meta_mask.training import sharding, steps
from tests.training import meta_steps
from tests.training.helpers import (
    COMMON_OPTIM,
    assert_runs_match,
    host_params,
    make_batch,
    run_on_devices,
)
from tests.training.scale_out_steps import CFG


def test_partition_rules_follow_the_parameter_path():
    # The shared embedding prefers its vocabulary dim even when d_model is the larger one...
    spec = sharding.partition_spec("shared/embedding", (64, 512), 4, min_size=1)
    assert spec == PartitionSpec("fsdp", None)
    # ... also as an Adam moment inside a TrainState ...
    path = "opt_state/1/0/mu/shared/embedding"
    assert sharding.partition_spec(path, (64, 512), 4, min_size=1) == PartitionSpec("fsdp", None)
    # ... and falls back to the shape rule when the fsdp size does not divide it (BART's 50265).
    spec = sharding.partition_spec("shared/embedding", (50265, 768), 4, min_size=1)
    assert spec == PartitionSpec(None, "fsdp")
    # Other matrices (positions, kernels) split their largest divisible dim; vectors replicate.
    spec = sharding.partition_spec("encoder/embed_positions/embedding", (64, 512), 4, min_size=1)
    assert spec == PartitionSpec(None, "fsdp")
    spec = sharding.partition_spec("encoder/layers_0/fc1/kernel", (768, 3072), 4, min_size=1)
    assert spec == PartitionSpec(None, "fsdp")
    assert sharding.partition_spec("decoder/layers_0/fc1/bias", (3072,), 4) == PartitionSpec()
    assert sharding.partition_spec("x/kernel", (32, 32), 4) == PartitionSpec()  # below min_size
    assert sharding.partition_spec("x/kernel", (768, 3072), 1) == PartitionSpec()  # no fsdp


def test_eight_devices_data_parallel_and_fsdp_equal_one_device(tmp_path):
    model = bart.Bart(CFG.replace(dropout=0.1))
    state = steps.create_train_state(host_params(CFG, 0), steps.make_optimizer(COMMON_OPTIM))
    train_step = steps.make_train_step(model, COMMON_OPTIM, donate=False)
    for i in range(3):
        state, metrics = train_step(state, make_batch(40 + i, batch=8), jax.random.key(5))
    result = tmp_path / "eight"
    run_on_devices("tests.training.scale_out_steps", result, devices=8)
    facts = json.loads(result.with_suffix(".json").read_text())
    # data=8: everything replicated, the batch in 8 pieces.
    assert facts["data8"]["emb_spec"] == [] and facts["data8"]["fc1_spec"] == []
    assert facts["data8"]["emb_shards"] == [[128, 32]]
    assert facts["data8"]["batch_shards"] == 8
    # data=2 x fsdp=4: the embedding split on its vocabulary, fc1 [32, 64] on its larger dim;
    # each device holds a quarter (never the whole matrix), vectors stay whole.
    fsdp = facts["data2_fsdp4"]
    assert fsdp["emb_spec"] == ["fsdp", None] and fsdp["emb_shards"] == [[32, 32]]
    assert fsdp["fc1_spec"] == [None, "fsdp"] and fsdp["fc1_shards"] == [[32, 16]]
    assert fsdp["bias_spec"] == []
    assert fsdp["mu_spec"] == ["fsdp", None]  # Adam's moment follows its parameter
    assert fsdp["emb_after_spec"] == ["fsdp", None]  # the step keeps the layout
    assert fsdp["batch_shards"] == 8
    for name in ("data8", "data2_fsdp4"):
        assert facts[name]["init_max_diff"] == 0.0, name  # sharded init = unsharded init
    assert_runs_match(
        result.with_suffix(".npz"), ("data8", "data2_fsdp4"), metrics["loss"], state.params
    )


@pytest.mark.parametrize(
    "name",
    [
        "quick",
        # K = 3 Adam steps, nested checkpointing and microbatches: ~75 s of tracing on 2 cores.
        pytest.param("full", marks=pytest.mark.slow),
    ],
)
def test_meta_step_on_eight_devices_equals_one_device(tmp_path, name):
    one = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    reference = meta_steps.run(one, cfg=meta_steps.CONFIGS[name])
    result = tmp_path / "meta"
    run_on_devices("tests.training.meta_steps", result, name, devices=8)
    with np.load(result.with_suffix(".npz")) as multi:
        multi = dict(multi)
    assert multi["inner_shard_rows"].tolist() == [1]  # 8 contexts: one per device
    assert bool(multi["theta_sharded"])  # the embedding split over fsdp
    meta_steps.assert_matches(multi, reference)
