"""A sweep's runs in parallel processes (--sweep.workers=N).

Each run is the command `sweep.command_waves` gives it (the one `--sweep.print_commands`
prints), so a parallel sweep computes exactly what the sequential one does, run for run. The
waves run one after another (each seed's generic LM, then the runs, then the transfer runs);
within a wave at most N commands run at once, each writing its output to `<logs>/<run>.log`.
After a failure no further command starts; the running ones finish (they may be needed by a
rerun) and the sweep returns the failed command's exit status. SIGTERM is passed on to the
running commands, which checkpoint and stop as a single run does (exit status 143).

On a CPU host this uses the cores that one run leaves idle (tracing, compiling, host-side
batching are single-threaded): on 2 cores, two concurrent runs of the main job's salient-spans
cell finished in 195 s where one after the other took 2 x 124 s. Runs sharing one accelerator
would compete for its memory; there, keep one worker per device.
"""

from __future__ import annotations

import collections
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

Command = tuple[str, list[str]]  # (the run's folder relative to the sweep's workdir, argv)

_POLL_S = 0.2


class _Stop(Exception):
    """SIGTERM reached the sweep."""


def run_waves(
    waves: Sequence[Sequence[Command]],
    workers: int,
    logs: pathlib.Path,
    *,
    out: TextIO | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Run the waves' commands, at most `workers` at a time, each wave after the one before
    has finished; 0 when every command succeeded, else the first failure's exit status."""
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    out = out or sys.stdout
    env = {**os.environ, **(env or {})}
    # Processes that share an accelerator must not each claim most of its memory up front.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    total = sum(len(w) for w in waves)
    done = [0]
    running: dict[subprocess.Popen, tuple[str, float, pathlib.Path]] = {}

    def say(message: str) -> None:
        print(message, file=out, flush=True)

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        for wave in waves:
            status = _run_wave(wave, workers, logs, env, running, say, done, total)
            if status:
                return status
        return 0
    except (_Stop, KeyboardInterrupt):
        say(f"stopping: SIGTERM to the {len(running)} running command(s)")
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        for proc, (sub, _, log) in running.items():
            proc.wait()
            say(f"  {sub}: stopped (exit status {proc.returncode}; log {log})")
        return 143  # 128 + SIGTERM: not finished; rerun the command to resume
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_stop(signum, frame) -> None:
    raise _Stop()


def _run_wave(
    wave: Sequence[Command],
    workers: int,
    logs: pathlib.Path,
    env: dict[str, str],
    running: dict,
    say: Callable[[str], None],
    done: list[int],
    total: int,
) -> int:
    pending = collections.deque(wave)
    failure = 0
    while running or (pending and not failure):
        while pending and not failure and len(running) < workers:
            sub, argv = pending.popleft()
            log = logs / (sub.replace("/", "_") + ".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as f:  # appended: a rerun's output follows the killed one's
                proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
            running[proc] = (sub, time.time(), log)
            say(f"[{done[0] + len(running)}/{total}] {sub}: started (log {log})")
        time.sleep(_POLL_S)
        for proc in [p for p in running if p.poll() is not None]:
            sub, start, log = running.pop(proc)
            done[0] += 1
            if proc.returncode == 0:
                say(f"  {sub}: finished in {time.time() - start:.0f} s")
                continue
            failure = failure or proc.returncode
            say(f"  {sub}: FAILED (exit status {proc.returncode}); the end of {log}:")
            say(_tail(log))
    if failure and pending:
        say(f"{len(pending)} run(s) not started because of the failure")
    return failure


def _tail(path: pathlib.Path, lines: int = 15) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    return "\n".join("    " + line for line in text[-lines:])
