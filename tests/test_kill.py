"""kill -9 at a known step, then the same command again: every learner of the pipeline (the
LM stages, the supervised policy, the meta-learned policy) ends with the same parameters,
bit for bit, as a run that was never interrupted. And SIGTERM at a known step saves a
checkpoint and exits with 143. The signals come from tests/kill_at_step.py, not a race."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from tests.helpers import parse_config
from tests.processes import run_module
from tests.tiny_run import LEARNED, TINY


def cli_with_signal(desc: str, step: int, signal_name: str, args: list[str]):
    return run_module(
        "tests.kill_at_step", desc, step, signal_name, "--", *args,
        env={"JAX_PLATFORMS": "cpu"}, timeout=600,
    )  # fmt: skip


def params_of(folder: pathlib.Path):
    from meta_mask.training.checkpoint import load_params

    return [np.asarray(x) for x in jax.tree.leaves(load_params(folder))]


CASES = {
    # stage folder, progress-bar name, step to kill at, flags, what to compare
    "intermediate": (
        "intermediate", 13,
        ["--stages=intermediate", "--intermediate.steps=20", "--intermediate.checkpoint_every=5"],
        "intermediate/final",
    ),
    "supervised": (
        "supervised policy", 13,
        [*LEARNED, "--policy.name=supervised", "--stages=learn_policy"],
        "learn_policy/policy",
    ),
    "meta": (
        "meta-learn policy", 7,
        [*LEARNED, "--policy.name=meta", "--meta.meta_steps=10", "--stages=learn_policy"],
        "learn_policy/policy",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    "learner",
    # The learned policies (~25 s each on 2 cores) are slow: they resume through the same loop
    # (training/loop.py) as the intermediate stage, which stays in CI.
    [k if k == "intermediate" else pytest.param(k, marks=pytest.mark.slow) for k in sorted(CASES)],
)
def test_kill9_at_a_known_step_then_rerun_equals_an_uninterrupted_run(tmp_path, learner):
    from meta_mask import pipeline

    desc, step, flags, compare = CASES[learner]
    args = [*TINY, *flags]
    pipeline.run(parse_config(args), tmp_path / "ref")

    killed = [*args, f"--workdir={tmp_path / 'killed'}"]
    proc = cli_with_signal(desc, step, "SIGKILL", killed)
    assert proc.returncode == -9, proc.stderr
    stage = compare.split("/")[0]
    assert not (tmp_path / "killed" / stage / "done.json").exists()
    saved = [p.name for p in (tmp_path / "killed" / stage / "checkpoints").iterdir()]
    assert any(name.isdigit() and 0 < int(name) < step for name in saved), saved

    pipeline.run(parse_config(args), tmp_path / "killed")  # the same command again
    for a, b in zip(
        params_of(tmp_path / "ref" / compare), params_of(tmp_path / "killed" / compare), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    if stage == "learn_policy":
        history = [json.loads((tmp_path / r / stage / "history.json").read_text()) for r in
                   ("ref", "killed")]  # fmt: skip
        assert history[0]["evals"] == history[1]["evals"]


def test_sigterm_at_a_known_step_saves_a_checkpoint_and_exits_143(tmp_path):
    args = [*TINY, "--stages=intermediate", "--intermediate.steps=100000",
            "--intermediate.checkpoint_every=100000", f"--workdir={tmp_path}"]  # fmt: skip
    proc = cli_with_signal("intermediate", 7, "SIGTERM", args)
    assert proc.returncode == 143, proc.stderr
    assert "stopped by SIGTERM after step 8" in proc.stderr and "Traceback" not in proc.stderr
    steps = [int(p.name) for p in (tmp_path / "intermediate" / "checkpoints").iterdir()
             if p.name.isdigit()]  # fmt: skip
    assert steps == [8]
