"""End-to-end tests of the pipeline on a tiny synthetic world: outputs, skip, refusal to
overwrite, NaN handling, learned policies and transfer, sweeps (kill -9 and SIGTERM are in
test_kill.py)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from tests.helpers import parse_config
from tests.processes import REPO, run_module
from tests.tiny_run import LEARNED, TINY


def _assert_trees_equal(a, b):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_every_flagfile_parses():
    files = sorted((REPO / "experiments").glob("*.flags"))
    assert files, "experiments/ has no flagfiles"
    for path in files:
        cfg = parse_config([f"--flagfile={path}"])
        assert cfg.data.task


def test_misspelled_flag_fails_at_parse_time(tmp_path):
    proc = run_module(
        "meta_mask.train", "--workdir", tmp_path, "--policy.nmae=x",
        stderr=subprocess.STDOUT, timeout=120,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode != 0
    assert "policy.nmae" in out and "policy.name" in out


def test_pipeline_end_to_end_outputs_skip_and_conflict(tmp_path):
    from meta_mask import pipeline
    from meta_mask.workdir import RunConflict

    cfg = parse_config([*TINY, "--intermediate.steps=6", "--intermediate.checkpoint_every=3"])
    workdir = tmp_path / "run"
    results = pipeline.run(cfg, workdir, argv=["test"])
    assert set(results["metrics"]) >= {"em", "f1", "n"}
    assert results["metrics"]["n"] == 16
    for name in ("config.json", "results.json", "results.md", "curves.png", "git_commit.txt"):
        assert (workdir / name).exists(), name
    for stage in ("intermediate", "finetune"):
        rows = [json.loads(x) for x in (workdir / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(np.isfinite(r["loss"]) for r in rows)
        assert list((workdir / stage / "tb").glob("events.*"))
    preds = (workdir / "evaluate" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 16
    # A finished run is returned as stored, without touching its stages.
    stamp = (workdir / "intermediate" / "done.json").stat().st_mtime_ns
    assert pipeline.run(cfg, workdir) == results
    assert (workdir / "intermediate" / "done.json").stat().st_mtime_ns == stamp
    # Another config in the same folder is refused, naming the difference; nothing changes.
    other = parse_config([*TINY, "--intermediate.steps=7", "--intermediate.checkpoint_every=3"])
    with pytest.raises(RunConflict, match="intermediate.steps: 6 .* 7"):
        pipeline.run(other, workdir)
    assert json.loads((workdir / "results.json").read_text()) == results


def test_nan_loss_stops_naming_step_and_last_good_checkpoint(tmp_path, capsys):
    from meta_mask import sweep
    from meta_mask.config import SweepConfig

    cfg = parse_config([*TINY, "--stages=intermediate", "--intermediate.steps=50",
                   "--intermediate.checkpoint_every=1", "--intermediate.optim.clip_norm=0",
                   "--intermediate.optim.learning_rate=1e30"])  # fmt: skip
    assert sweep.run(cfg, SweepConfig(), str(tmp_path)) == 1  # the CLI's exit status
    err = capsys.readouterr().err
    assert "loss is nan at step" in err or "loss is inf at step" in err, err
    assert "Last good checkpoint: step" in err
    # Nothing non-finite was saved: every checkpoint precedes the step named.
    bad_step = int(err.split(" at step ")[1].split(";")[0])
    steps = [int(p.name) for p in (tmp_path / "intermediate" / "checkpoints").iterdir()
             if p.name.isdigit()]  # fmt: skip
    assert steps and max(steps) < bad_step


# The supervised case also runs the options a world study uses: a policy net that sees how often
# a token recurs (saved with the policy, so the transferred run rebuilds the same net), one
# training example per context and units drawn by probability (also saved with the policy).
SUPERVISED_OPTIONS = (
    "--meta.policy_repeat_buckets=4",
    "--supervised.merge_contexts=true",
    "--supervised.sample_scores=log_probability",
)


@pytest.mark.parametrize("policy, options", [("supervised", SUPERVISED_OPTIONS), ("meta", ())])
def test_learned_policy_is_learned_used_and_transferred(tmp_path, policy, options):
    from meta_mask import pipeline
    from meta_mask.errors import UserError
    from meta_mask.policies import learned
    from meta_mask.training.checkpoint import load_params

    cfg = parse_config([*TINY, *LEARNED, f"--policy.name={policy}", *options])
    source = tmp_path / "source"
    pipeline.run(cfg, source)
    folder = source / "learn_policy"
    spec = json.loads((folder / "policy.json").read_text())
    assert spec["policy"] == policy and spec["task"] == "world_qa"
    assert spec["net"]["repeat_buckets"] == (4 if options else 0)
    assert spec["scores"] == ("log_probability" if options else "logits")
    history = json.loads((folder / "history.json").read_text())
    assert history["evals"], "the policy was never evaluated on dev"
    probe = folder / "mask_probe.json"  # the meta-objective of reference masks (world tasks)
    assert probe.exists() == (policy == "meta")
    if policy == "meta":
        found = json.loads(probe.read_text())
        assert set(found["objective"]) == set(found["diff"]) >= {"answer", "answer+subject"}
        assert all(np.isfinite(v) for v in found["objective"].values())
        assert found["diff"]["answer+other_entities"] == [0.0, 0.0, 0.0]
    assert (source / "intermediate" / "masks.html").exists()
    assert (source / "intermediate" / "masks.png").exists()
    # Transfer: a run on another task uses the policy learned on world_qa, learning nothing.
    target = tmp_path / "target"
    other = parse_config(
        [*TINY, *LEARNED, f"--policy.name={policy}", "--data.task=world_qa_dates",
         f"--policy.checkpoint={folder}"]
    )  # fmt: skip
    pipeline.run(other, target)
    assert not (target / "learn_policy").exists()
    assert (target / "intermediate" / "done.json").exists()
    scorer = learned.load_scorer(folder, spec["net"]["vocab_size"])
    _assert_trees_equal(scorer.params, load_params(folder / "policy"))
    assert scorer.scores == spec["scores"]
    missing = parse_config(
        [*TINY, *LEARNED, "--policy.name=meta", f"--policy.checkpoint={tmp_path}"]
    )
    with pytest.raises(UserError, match="no finished learned policy"):
        pipeline.run(missing, tmp_path / "missing")


def test_sweep_table_aggregates_seeds():
    from meta_mask.evaluation import report

    runs = [
        {"task": "t", "policy": "p", "output_format": "f", "seed": s, "metrics": {"em": v},
         "seconds": {"finetune": 60.0}}
        for s, v in ((0, 0.2), (1, 0.4))
    ]  # fmt: skip
    table = report.results_table(runs)
    assert "0.300 ± 0.141" in table and "| 2 |" in table


def test_sweep_summary_compares_policies_with_the_reference(tmp_path, capsys):
    from meta_mask import sweep
    from meta_mask.config import SweepConfig

    facts = [f"{p}:employer" for p in range(6)]
    for policy, shift in (("salient_spans", 0.0), ("meta", 0.5)):
        for seed in (0, 1):
            scores = {f: (i % 2) * 0.5 + shift for i, f in enumerate(facts)}
            result = {"task": "world_qa", "policy": policy, "policy_task": "",
                      "output_format": "masked_spans", "seed": seed, "seconds": {},
                      "metrics": {"em": float(np.mean(list(scores.values())))},
                      "facts": {"metric": "em", "scores": scores}}  # fmt: skip
            folder = tmp_path / "world_qa" / policy / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps(result))
    cfg = parse_config(TINY)
    grid = SweepConfig(policies=("salient_spans", "meta"), seeds=(0, 1), aggregate_only=True)
    assert sweep.run(cfg, grid, str(tmp_path)) == 0
    summary = (tmp_path / "summary.md").read_text()
    row = "| world_qa | meta | masked_spans | 2 | 0.750 ± 0.000 | 0.0 | +0.500 [+0.500, +0.500] * |"
    assert row in summary
    assert summary.strip() in capsys.readouterr().out
    other = SweepConfig(policies=("meta",), seeds=(0, 1), aggregate_only=True, reference="pmi")
    assert sweep.run(cfg, other, str(tmp_path)) == 0
    assert "No pmi runs among these" in (tmp_path / "summary.md").read_text()


def test_transfer_grid_cells_and_matrix(tmp_path):
    from meta_mask import sweep
    from meta_mask.config import SweepConfig
    from meta_mask.evaluation import report

    cfg = parse_config([*TINY, "--policy.name=meta"])
    grid = SweepConfig(policies=("meta",), seeds=(0,), tasks=("world_qa", "world_qa_dates"),
                       transfer=True)  # fmt: skip
    todo = dict(sweep.cells(cfg, grid, tmp_path))
    assert list(todo)[:2] == ["world_qa/meta/seed0", "world_qa_dates/meta/seed0"]
    cross = todo["world_qa_dates/meta-from-world_qa/seed0"]
    assert cross.data.task == "world_qa_dates"
    assert cross.policy.checkpoint == str(tmp_path / "world_qa/meta/seed0/learn_policy")
    assert len(todo) == 4
    runs = [
        {"task": t, "policy": "meta", "policy_task": s, "metrics": {"em": v}, "seconds": {}}
        for s, t, v in (("a", "a", 0.5), ("a", "b", 0.1), ("b", "a", 0.2), ("b", "b", 0.6))
    ]
    table = report.transfer_table(runs)
    assert "| a | 0.500 | 0.100 |" in table and "| b | 0.200 | 0.600 |" in table
    assert "meta (from a)" in report.results_table(runs)


def test_a_relative_cache_dir_is_shared_by_every_run_of_a_seed(tmp_path, monkeypatch):
    """The README's command uses a relative --workdir (so the sweep's cache is relative too):
    the generic stage is trained once per seed in <cache>/generic, not once per run inside
    each run's folder."""
    from meta_mask import pipeline

    flags = ["--flagfile=experiments/world_quick.flags", "--stages=generic"]
    configs = {p: parse_config([*flags, f"--policy.name={p}"]) for p in ("none", "random_tokens")}
    monkeypatch.chdir(tmp_path)
    for policy, cfg in configs.items():
        pipeline.run(cfg, f"runs/{policy}", cache_dir="runs/cache")
    assert len([p for p in (tmp_path / "runs/cache/generic").iterdir() if p.is_dir()]) == 1
    assert not list(tmp_path.glob("runs/*/runs"))


@pytest.mark.slow  # three pipeline runs (~33 s on 2 cores); the option is off in the main job
def test_mixed_generic_stage_alternates_padded_qa_steps_whose_loss_padding_leaves_unchanged(
    tmp_path, monkeypatch
):
    """--generic.qa_every=N: every N-th generic step is a batch of the generic population's
    questions, padded to the MLM batch's shape (so one compiled step takes both) without
    changing its loss; the shared folder (and the meta-learning LM's) is another recipe's."""
    import dataclasses

    import jax

    from meta_mask import pipeline, stages
    from meta_mask.context import build_context
    from meta_mask.data import seq2seq, tasks, world
    from meta_mask.policies import heuristic
    from meta_mask.training import steps

    flags = ["--flagfile=experiments/world_quick.flags", "--policy.name=none", "--stages=generic"]
    cfg = parse_config([*flags, "--generic.qa_every=3"])
    ctx = build_context(cfg, tmp_path / "run", tmp_path / "cache")
    with monkeypatch.context() as patch:
        patch.setattr(seq2seq, "pad_batch", lambda batch, like, pad: batch)
        mixed = stages.mixed_batches(lambda s: ("mlm", s), lambda s: ("qa", s), 3, ctx)
        order = [mixed(s) for s in range(7)]
    assert order == [("mlm", 0), ("mlm", 1), ("qa", 0), ("mlm", 2), ("mlm", 3), ("qa", 1),
                     ("mlm", 4)]  # fmt: skip
    # Padding keeps the loss: a real batch of the generic questions, padded longer.
    questions = tasks.load_task(world.GENERIC_QA_TASK, "train", world=ctx.world)
    real = stages.finetune_batches(ctx, questions, cfg.generic.train)(0)
    like = {k: np.zeros((v.shape[0], v.shape[1] + 5), v.dtype) for k, v in real.items()}
    padded = seq2seq.pad_batch(real, like, pad=ctx.special.pad)
    assert all(padded[k].shape == like[k].shape for k in real)

    def loss(batch):
        ce = steps.token_losses(ctx.model, ctx.init_params, batch)
        return float(jax.numpy.sum(ce * batch["weights"]) / np.sum(batch["weights"]))

    np.testing.assert_allclose(loss(padded), loss(real), rtol=1e-5)
    with pytest.raises(ValueError, match="cannot pad"):
        seq2seq.pad_batch(real, {**like, "extra": like["labels"]}, pad=ctx.special.pad)
    # The mixed recipe trains (one compiled step) into its own shared folder.
    pipeline.run(cfg, tmp_path / "mixed", cache_dir=tmp_path / "c")
    plain = dataclasses.replace(cfg, generic=dataclasses.replace(cfg.generic, qa_every=0))
    pipeline.run(plain, tmp_path / "plain", cache_dir=tmp_path / "c")
    assert len([p for p in (tmp_path / "c/generic").iterdir() if p.is_dir()]) == 2
    # The mixed intermediate stage: the same steps, every 2nd on the generic questions.
    mixed_intermediate = parse_config(
        ["--flagfile=experiments/world_quick.flags", "--policy.name=salient_spans",
         "--stages=generic,intermediate", "--generic.intermediate_qa_every=2"]
    )  # fmt: skip
    pipeline.run(mixed_intermediate, tmp_path / "inter", cache_dir=tmp_path / "c")
    done = json.loads((tmp_path / "inter/intermediate/done.json").read_text())
    assert done["steps"] == mixed_intermediate.intermediate.steps

    # Replay: every 3rd intermediate step is the generic stage's kind of batch (the generic
    # population's biographies, masked by generic.policy), composed with the QA mixing.
    replaying = parse_config(
        ["--flagfile=experiments/world_quick.flags", "--policy.name=salient_spans",
         "--generic.intermediate_qa_every=2", "--generic.intermediate_replay_every=3"]
    )  # fmt: skip
    ctx = build_context(replaying, tmp_path / "replay", tmp_path / "c")
    corpus = ctx.corpus()
    scorer = heuristic.corpus_scorer(replaying.policy, corpus)
    policy_batches, batch_for_step = stages.intermediate_batches(ctx, corpus, scorer)
    generic = stages._generic_biographies(ctx, replaying.intermediate.batch_size)
    questions = stages._generic_questions(ctx, replaying.intermediate)
    mlm0 = policy_batches(0)

    def same(a, b):
        return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)

    def qa(i):
        return seq2seq.pad_batch(questions(i), mlm0, pad=ctx.special.pad)

    expected = [mlm0, qa(0), generic(0), policy_batches(1), qa(1), generic(1)]
    assert [same(batch_for_step(s), e) for s, e in enumerate(expected)] == [True] * 6
    assert not same(generic(0), policy_batches(0))
