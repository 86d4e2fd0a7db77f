"""--sweep.workers: the waves' commands in parallel processes (meta_mask/sweep_workers.py), the
lock that lets runs sharing a cache train a shared stage once (workdir.exclusive), and a tiny
grid run by two workers giving the sequential sweep's results exactly."""

from __future__ import annotations

import io
import json
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from meta_mask import sweep_workers
from meta_mask import workdir as workdir_lib
from tests.helpers import parse_config
from tests.processes import REPO, python_env
from tests.tiny_run import TINY


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _rendezvous(me: pathlib.Path, other: pathlib.Path) -> list[str]:
    """A command that finishes only once `other`'s command has started too (or fails after
    60 s): two of them both succeed only when they run at the same time."""
    return _py(
        "import pathlib, sys, time\n"
        f"pathlib.Path({str(me)!r}).touch()\n"
        "for _ in range(600):\n"
        f"    if pathlib.Path({str(other)!r}).exists(): sys.exit(0)\n"
        "    time.sleep(0.1)\n"
        "sys.exit(1)\n"
    )


def test_commands_run_concurrently_within_a_wave_and_waves_in_order(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    after = _py(
        "import os, pathlib, sys\n"
        f"ok = pathlib.Path({str(a)!r}).exists() and pathlib.Path({str(b)!r}).exists()\n"
        f"pathlib.Path({str(c)!r}).write_text(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'])\n"
        "print('second wave ran')\n"
        "sys.exit(0 if ok else 3)\n"
    )
    out = io.StringIO()
    waves = [[("t/a/seed0", _rendezvous(a, b)), ("t/b/seed0", _rendezvous(b, a))],
             [("t/c/seed0", after)]]  # fmt: skip
    assert sweep_workers.run_waves(waves, 2, tmp_path / "logs", out=out) == 0
    assert c.read_text() == "false"  # runs sharing an accelerator do not preallocate it
    assert "second wave ran" in (tmp_path / "logs" / "t_c_seed0.log").read_text()
    printed = out.getvalue()
    assert "[3/3] t/c/seed0: started" in printed and printed.count("finished in") == 3


def test_a_failure_stops_new_commands_and_returns_its_status(tmp_path):
    out = io.StringIO()
    fail = _py("print('the reason it failed'); raise SystemExit(7)")
    never = _py(f"open({str(tmp_path / 'ran')!r}, 'w')")
    status = sweep_workers.run_waves(
        [[("x", fail), ("y", never)], [("z", never)]], 1, tmp_path / "logs", out=out
    )
    assert status == 7
    assert not (tmp_path / "ran").exists()
    printed = out.getvalue()
    assert "x: FAILED (exit status 7)" in printed and "the reason it failed" in printed
    assert "1 run(s) not started" in printed
    with pytest.raises(ValueError, match="workers=0"):
        sweep_workers.run_waves([], 0, tmp_path)


def test_sigterm_reaches_the_running_commands(tmp_path):
    marker = tmp_path / "child_stopped"
    child = _py(
        "import pathlib, signal, sys, time\n"
        "def stop(*_):\n"
        f"    pathlib.Path({str(marker)!r}).touch(); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    script = (
        "import pathlib, sys\n"
        "from meta_mask import sweep_workers\n"
        f"waves = [[('run', {child!r})]]\n"
        f"sys.exit(sweep_workers.run_waves(waves, 1, pathlib.Path({str(tmp_path)!r})))\n"
    )
    proc = subprocess.Popen(
        _py(script), env=python_env(), cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    log = tmp_path / "run.log"
    assert "started" in proc.stdout.readline()
    while "ready" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143 and marker.exists()
    assert "run: stopped (exit status 143" in rest


def test_a_shared_stage_lock_makes_the_second_process_wait(tmp_path):
    folder = tmp_path / "cache" / "generic" / "seed0-abc"
    holder = subprocess.Popen(
        _py(
            "import pathlib, sys\n"
            "from meta_mask import workdir\n"
            f"with workdir.exclusive(pathlib.Path({str(folder)!r})):\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.readline()\n"
        ),
        env=python_env(), cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    waited, entered = threading.Event(), threading.Event()

    def second():
        with workdir_lib.exclusive(folder, on_wait=waited.set):
            entered.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert waited.wait(60)
    assert not entered.is_set()
    holder.communicate("release\n", timeout=60)
    thread.join(60)
    assert entered.is_set()
    assert (folder.parent / ".seed0-abc.lock").exists()


@pytest.mark.slow
def test_two_workers_give_the_sequential_sweeps_results(tmp_path):
    from meta_mask import sweep
    from meta_mask.config import SweepConfig

    flags = [*TINY, "--intermediate.steps=4"]
    cfg = parse_config(flags)
    grid = SweepConfig(policies=("none", "random_tokens", "salient_spans"))
    assert sweep.run(cfg, grid, str(tmp_path / "one")) == 0
    argv = ["meta_mask.train", *flags, "--sweep.policies=none,random_tokens,salient_spans"]
    parallel = SweepConfig(policies=grid.policies, workers=2)
    assert sweep.run(cfg, parallel, str(tmp_path / "two"), argv=argv) == 0
    for policy in grid.policies:
        one, two = (
            json.loads((tmp_path / d / "world_qa" / policy / "seed0" / "results.json").read_text())
            for d in ("one", "two")
        )
        assert one["metrics"] == two["metrics"] and one["facts"] == two["facts"], policy
    assert (tmp_path / "two" / "logs" / "world_qa_salient_spans_seed0.log").exists()
    assert (tmp_path / "two" / "summary.md").exists()
