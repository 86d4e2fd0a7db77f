"""One of the two processes of test_distributed.py's jax.distributed run on localhost, and the
stage setup that the test's single-process reference shares with it.

    python -m tests.training.distributed_process OUT ADDRESS PROCESS_ID

joins the 2-process cluster at ADDRESS (2 simulated CPU devices per process), trains the tiny
model through stages.train_stage on a data=2 x fsdp=2 mesh with its host's rows of each batch,
restores the last checkpoint and reruns the finished stage; writes OUT/params<ID>.npz (the
gathered final params) and OUT/facts<ID>.json (the steps saved, the restored step, and the
largest differences of the restored and reloaded params from the trained ones).
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from meta_mask import stages
from meta_mask.config import Config, MeshConfig, StageConfig
from meta_mask.context import RunContext
from meta_mask.data import seq2seq
from meta_mask.model import bart
from meta_mask.training import checkpoint, distributed, sharding, steps
from tests.training.helpers import COMMON_OPTIM, host_params, make_batch, one_layer_config

STEPS = 3
GLOBAL_BATCH = 8
STAGE = StageConfig(
    steps=STEPS, batch_size=GLOBAL_BATCH, optim=COMMON_OPTIM, checkpoint_every=2, log_every=1
)

# Vocabulary 512 x d_model 32 = sharding.MIN_FSDP_SIZE: the pipeline's own rules split the
# embedding (and its Adam moments) over "fsdp", across the two processes.
CFG = one_layer_config(vocab_size=512)


def stage_context(workdir: pathlib.Path, mesh) -> RunContext:
    """The parts of a RunContext that train_stage reads (tiny model, dropout on)."""
    return RunContext(
        cfg=Config(seed=3),
        workdir=workdir,
        cache_dir=workdir / "cache",
        tokenizer=None,
        special=None,
        model_cfg=CFG,
        model=bart.Bart(CFG.replace(dropout=0.1)),
        init_params=None,
        mesh=mesh,
    )


def host_batch(step: int, process_index: int, process_count: int) -> dict:
    """This host's rows of the global batch of `step` (the same global batch on every host)."""
    rows = seq2seq.local_rows(np.arange(GLOBAL_BATCH), process_index, process_count)
    return {k: v[rows] for k, v in make_batch(40 + step, batch=GLOBAL_BATCH).items()}


def max_diff_from(whole, tree) -> float:
    """The largest difference between the gathered `tree` and the host array tree `whole`."""
    gathered = multihost_utils.process_allgather(tree, tiled=True)
    return max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(gathered), jax.tree.leaves(whole), strict=True)
    )


def main(out: pathlib.Path, address: str, pid: int) -> None:
    # Joins before any jax computation (imports alone start no backend).
    assert distributed.initialize(
        "on", distributed.DistributedArgs(address, num_processes=2, process_id=pid)
    )
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2))
    ctx = stage_context(out / "work", mesh)
    params = stages.train_stage(
        ctx,
        "finetune",
        host_params(CFG, 0),
        STAGE,
        lambda s: host_batch(s, jax.process_index(), jax.process_count()),
        rng_salt=2,
    )
    emb = params["shared"]["embedding"]
    assert not emb.is_fully_addressable and list(emb.sharding.spec) == ["fsdp", None]
    whole = multihost_utils.process_allgather(params, tiled=True)
    # Both hosts restore the last checkpoint into the sharded layout the step uses.
    tx = steps.make_optimizer(STAGE.optim)
    target = sharding.sharded_call(lambda p: steps.create_train_state(p, tx), params, mesh=mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, target)
    with checkpoint.CheckpointManager(out / "work" / "finetune" / "checkpoints") as ckpt:
        steps_saved = ckpt.all_steps()
        restored = ckpt.restore(jax.eval_shape(lambda: target), sharding=state_sharding)
    assert restored.params["shared"]["embedding"].sharding == emb.sharding
    restored_diff = max_diff_from(whole, restored.params)
    # A rerun skips the finished stage and loads its final params into the same layout.
    again = stages.train_stage(ctx, "finetune", params, STAGE, None, rng_salt=2)
    assert again["shared"]["embedding"].sharding == emb.sharding
    reload_diff = max_diff_from(whole, again)
    np.savez(
        out / f"params{pid}.npz",
        **{
            jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(whole)[0]
        },
    )
    facts = {
        "steps_saved": steps_saved,
        "restored_step": int(restored.step),
        "restored_diff": restored_diff,
        "reload_diff": reload_diff,
    }
    with open(out / f"facts{pid}.json", "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
