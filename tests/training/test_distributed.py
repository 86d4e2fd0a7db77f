"""Multi-host training: when the CLI joins a cluster, and a real two-process jax.distributed run
on localhost (gloo CPU collectives) that trains through stages.train_stage on host-local batch
shards and must match one process, with orbax checkpoints saved and restored by both hosts and
logs written by process 0 only; the meta step likewise, each host giving its rows of the meta
batches."""

from __future__ import annotations

import json
import socket
import subprocess

import jax
import numpy as np
import pytest

from meta_mask import stages
from meta_mask.config import MeshConfig, PolicyConfig
from meta_mask.data import seq2seq
from meta_mask.training import distributed, sharding
from tests.processes import REPO, module_command, python_env, run_module
from tests.training import meta_steps
from tests.training.distributed_process import CFG, STAGE, STEPS, host_batch, stage_context
from tests.training.helpers import host_params

DA = distributed.DistributedArgs


# ----------------------------------------------------------------------------- when to join


def run_two_processes(module: str, out) -> None:
    """`python -m module out address pid` for pid 0 and 1, two jax.distributed processes of
    two simulated devices each on localhost; fails with a process's log if it fails."""
    address = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            module_command(module, out, address, pid),
            cwd=REPO,
            env=python_env(devices=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for pid, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {pid}:\n{logs[pid][-4000:]}"


def test_auto_joins_only_when_the_environment_shows_a_cluster():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "1"}
    assert distributed.cluster_in_environment(slurm) == "slurm"
    assert distributed.cluster_in_environment({**slurm, "SLURM_NTASKS": "1"}) is None
    assert distributed.cluster_in_environment({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == "tpu"
    assert distributed.cluster_in_environment({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert distributed.cluster_in_environment({}) is None
    assert distributed.should_initialize("auto", DA(), slurm)
    assert not distributed.should_initialize("auto", DA(), {})
    assert distributed.should_initialize("auto", DA(coordinator_address="h:1"), {})
    assert distributed.should_initialize("auto", DA(), {"JAX_COORDINATOR_ADDRESS": "h:1"})
    assert distributed.should_initialize("on", DA(), {})
    assert not distributed.should_initialize("off", DA(), slurm)


def test_bad_distributed_arguments_name_the_flag():
    with pytest.raises(ValueError, match=r"--distributed='maybe'; valid"):
        distributed.should_initialize("maybe", DA(), {})
    with pytest.raises(ValueError, match="with --distributed=off"):
        distributed.should_initialize("off", DA(num_processes=2, process_id=0), {})
    with pytest.raises(ValueError, match="--num_processes and --process_id go together"):
        distributed.initialize("on", DA(coordinator_address="127.0.0.1:1", num_processes=2), {})
    with pytest.raises(ValueError, match=r"--process_id=2 must lie in \[0, --num_processes=2\)"):
        distributed.initialize("on", DA("127.0.0.1:1", num_processes=2, process_id=2), {})
    # Nothing to join: jax is left untouched and the run is single-process.
    assert distributed.initialize("auto", DA(), {}) is False
    assert distributed.initialize("off", DA(), {}) is False


def test_cli_rejects_contradictory_distributed_flags(tmp_path):
    flags = ["--distributed=off", "--num_processes=2", "--process_id=0"]
    proc = run_module("meta_mask.train", f"--workdir={tmp_path}", *flags, timeout=120)
    assert proc.returncode != 0
    assert "with --distributed=off" in proc.stderr
    assert not (tmp_path / "config.json").exists()  # refused before any run started


def test_local_rows_split_a_global_batch_into_contiguous_host_blocks():
    rows = np.arange(8) * 10
    parts = [seq2seq.local_rows(rows, i, 4) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), rows)
    assert all(len(p) == 2 for p in parts)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        seq2seq.local_rows(rows, 0, 3)


# ----------------------------------------------------------------------------- two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_matches_one_process(tmp_path):
    # The reference: the same stage in this (single-device) process on the whole global batch.
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    reference = stages.train_stage(
        stage_context(tmp_path / "single", mesh),
        "finetune",
        host_params(CFG, 0),
        STAGE,
        lambda s: host_batch(s, 0, 1),
        rng_salt=2,
    )
    single_rows = [json.loads(x) for x in (tmp_path / "single/finetune/metrics.jsonl").open()]

    out = tmp_path / "multi"
    out.mkdir()
    run_two_processes("tests.training.distributed_process", out)

    for pid in range(2):
        facts = json.loads((out / f"facts{pid}.json").read_text())
        assert facts["steps_saved"] == [2, 3]
        assert facts["restored_step"] == STEPS and facts["restored_diff"] == 0.0
        assert facts["reload_diff"] == 0.0
        with np.load(out / f"params{pid}.npz") as multi:
            for path, leaf in jax.tree_util.tree_flatten_with_path(reference)[0]:
                np.testing.assert_allclose(
                    multi[jax.tree_util.keystr(path)],
                    np.asarray(leaf),
                    rtol=1e-4,
                    atol=1e-6,
                    err_msg=f"process {pid} {jax.tree_util.keystr(path)}",
                )
    # Process 0 alone wrote the logs: one row per step (two writers would duplicate them),
    # with the single process's losses.
    rows = [json.loads(x) for x in (out / "work/finetune/metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [r["loss"] for r in rows], [r["loss"] for r in single_rows], rtol=1e-5
    )
    assert (out / "work/finetune/done.json").exists()


@pytest.mark.slow  # two processes compiling a meta step (~80 s idle); 8 simulated devices in CI
def test_two_process_meta_step_matches_one_process(tmp_path):
    """Each host contributes its rows of the meta batches (meta_train.host_rows), theta is
    FSDP-sharded across the two processes: the meta-gradient and metrics match one process."""
    reference = meta_steps.run(sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    run_two_processes("tests.training.meta_steps", tmp_path)
    for pid in range(2):
        with np.load(tmp_path / f"meta{pid}.npz") as multi:
            multi = dict(multi)
        assert multi["inner_shard_rows"].tolist() == [2]  # 8 contexts over 4 devices
        assert bool(multi["theta_sharded"])
        meta_steps.assert_matches(multi, reference)


# ----------------------------------------------------------------------------- host data


@pytest.mark.parametrize(
    "policy",
    [
        PolicyConfig(name="salient_spans", spans_per_sentence=1),
        PolicyConfig(name="random_spans", output_format="full_sentence"),
    ],
)
def test_intermediate_batches_of_hosts_concatenate_to_the_global_batch(
    records_corpus, sentence_tokenizer, policy
):
    """Each host masks only its rows, and the masks depend on (seed, step, row) alone: the
    hosts' batches stacked are exactly the single process's batch."""
    from meta_mask.config import DataConfig
    from meta_mask.data.stream import CorpusStream
    from meta_mask.policies import corrupt, heuristic, mlm_batches
    from meta_mask.special_tokens import SpecialTokens

    labels = records_corpus.dataset.data.column("entity_labels")
    special = SpecialTokens.of(sentence_tokenizer, decoder_start_token_id=2)

    def batches(process_index: int, process_count: int) -> mlm_batches.MlmBatches:
        stream = CorpusStream(
            records_corpus.dataset, batch_size=8, max_length=16, seed=4, special=special,
            process_index=process_index, process_count=process_count,
        )  # fmt: skip
        return mlm_batches.MlmBatches(
            stream=stream,
            scorer=heuristic.make_scorer(policy, None),
            policy=policy,
            data=DataConfig(mlm_length=16, mlm_target_length=8),
            seed=4,
            special=special,
            labels_of=lambda rows: labels.take(rows).to_pylist(),
            types_of=lambda rows: [[] for _ in rows],
            random_ids=corrupt.non_special_ids(sentence_tokenizer),
        )

    whole, hosts = batches(0, 1), [batches(i, 2) for i in range(2)]
    for step in (0, 1, 5):
        expected = whole(step)
        parts = [h(step) for h in hosts]
        assert all(len(p["input_ids"]) == 4 for p in parts)
        for key, value in expected.items():
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, key)


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_two_processes_run_the_whole_pipeline_like_one(tmp_path):
    """`python -m meta_mask.train --distributed=on ...` in two processes (one CPU device each):
    every stage, resumable files written once, and the same fine-tuned params as one process."""
    from meta_mask.training.checkpoint import load_params
    from tests.tiny_run import TINY

    args = [*TINY, "--intermediate.steps=4", "--intermediate.checkpoint_every=2"]
    env = python_env(JAX_PLATFORMS="cpu")

    def cli(workdir, *extra):
        return subprocess.Popen(
            module_command("meta_mask.train", f"--workdir={workdir}", *args, *extra),
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    address = f"127.0.0.1:{free_port()}"
    procs = [
        cli(tmp_path / "multi", "--distributed=on", f"--coordinator_address={address}",
            "--num_processes=2", f"--process_id={pid}")
        for pid in range(2)
    ]  # fmt: skip
    single = cli(tmp_path / "single", "--distributed=off")
    try:
        logs = [p.communicate(timeout=900)[0] for p in [*procs, single]]
    finally:
        for p in [*procs, single]:
            if p.poll() is None:
                p.kill()
    for p, log in zip([*procs, single], logs, strict=True):
        assert p.returncode == 0, log[-4000:]

    multi, one = tmp_path / "multi", tmp_path / "single"
    for stage in ("intermediate", "finetune"):
        rows = [json.loads(x) for x in (multi / stage / "metrics.jsonl").open()]
        steps_logged = [r["step"] for r in rows]
        assert steps_logged == sorted(set(steps_logged)), stage  # one writer: no duplicates
        want = [json.loads(x) for x in (one / stage / "metrics.jsonl").open()]
        np.testing.assert_allclose(
            [r["loss"] for r in rows], [r["loss"] for r in want], rtol=1e-4, err_msg=stage
        )
    want = load_params(one / "finetune" / "final")
    # Saved by two processes: read back here into a one-device target of the same tree.
    got = load_params(multi / "finetune" / "final", jax.eval_shape(lambda: want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
    results = json.loads((multi / "results.json").read_text())
    assert results["metrics"]["n"] == 16
    assert len((multi / "evaluate" / "predictions.jsonl").read_text().splitlines()) == 16
