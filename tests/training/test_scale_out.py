"""Scale-out on 8 simulated CPU devices: path-aware FSDP rules, sharded init, and the train
step under data parallelism (data=8) and FSDP (data=2 x fsdp=4) against one device."""

from __future__ import annotations

import json
import textwrap

import jax
from jax.sharding import PartitionSpec

from meta_mask.config import tiny_model_config
from meta_mask.model import bart
from meta_mask.training import sharding, steps
from tests.training.helpers import assert_runs_match, run_on_devices
from tests.training.test_steps import COMMON_OPTIM, host_params, make_batch


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


_EIGHT_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from meta_mask.config import MeshConfig
    from meta_mask.model import bart
    from meta_mask.training import sharding, steps
    from tests.training.test_steps import COMMON_OPTIM, host_params, make_batch
    from tests.training.test_scale_out import CFG, MIN_SIZE

    assert jax.device_count() == 8, jax.devices()
    out, facts = {}, {}
    for name, mesh_cfg in (("data8", MeshConfig(data=8, fsdp=1)),
                           ("data2_fsdp4", MeshConfig(data=2, fsdp=4))):
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
        start = sharding.place(host_params(CFG, 0), sharding.param_shardings(
            host_params(CFG, 0), mesh, min_size=MIN_SIZE))
        state = sharding.sharded_call(lambda p: steps.create_train_state(p, tx), start,
                                      mesh=mesh, min_size=MIN_SIZE)
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
        out[name + "/loss"] = np.asarray(metrics["loss"])
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
            out[name + "/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    np.savez(sys.argv[1] + ".npz", **out)
    json.dump(facts, open(sys.argv[1] + ".json", "w"))
    """
)

# One layer per side, vocab 128, d_model 32 (embedding 128 x 32, fc1 32 x 64); a low threshold
# so the tiny matrices are split as BART-base's would be.
CFG = tiny_model_config(encoder_layers=1, decoder_layers=1)
MIN_SIZE = 256


def test_eight_devices_data_parallel_and_fsdp_equal_one_device(tmp_path):
    model = bart.Bart(CFG.replace(dropout=0.1))
    state = steps.create_train_state(host_params(CFG, 0), steps.make_optimizer(COMMON_OPTIM))
    train_step = steps.make_train_step(model, COMMON_OPTIM, donate=False)
    for i in range(3):
        state, metrics = train_step(state, make_batch(40 + i, batch=8), jax.random.key(5))
    result = tmp_path / "eight"
    run_on_devices(_EIGHT_DEVICE_SCRIPT, result, devices=8)
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
