"""A run's folder: its config record, its finished stages, atomic writes, one writer.

    workdir/config.json       the resolved config (which stages run may change between calls)
    workdir/command.txt       the command line; git_commit.txt: the source tree's commit
    workdir/<stage>/done.json a finished stage (then <stage>/final/ holds its parameters)
    workdir/results.json      a finished run: never overwritten

A folder that holds another config is refused (RunConflict, naming every differing field),
so a finished run's results are never silently replaced and stages never mix configs. An
option the stored record lacks (a folder written before the option existed) counts as set to
its default, so a new option does not orphan finished runs.
Only one process of a multi-host run writes these files (`is_writer`); every process reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from meta_mask import config as config_lib
from meta_mask.errors import UserError
from meta_mask.training.distributed import is_writer


class RunConflict(UserError):
    """The workdir holds a run with another config; nothing was changed."""


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it into place."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def git_commit() -> str:
    """The source tree's commit (with '+dirty' for uncommitted changes), or 'unknown'."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} (stored) vs {vb!r} (now)")
    return out


def _with_defaults(stored: dict, defaults: dict) -> dict:
    """`stored` with every key it lacks taken from `defaults` (recursively): a folder written
    before an option existed holds that option's default."""
    out = dict(stored)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _with_defaults(out[key], value)
    return out


def _resolved(cfg: config_lib.Config) -> dict:
    resolved = json.loads(json.dumps(config_lib.to_dict(cfg), default=str))
    # Which stages a command runs may change between invocations of the same run.
    resolved.pop("stages")
    return resolved


def stored_results(cfg: config_lib.Config, workdir: pathlib.Path) -> dict | None:
    """The results of the finished run of `cfg` in `workdir`, or None when it is not finished.

    Raises RunConflict when the folder holds a run with a different config; writes nothing.
    """
    stored_path = workdir / "config.json"
    if not stored_path.exists():
        return None
    stored = _with_defaults(json.loads(stored_path.read_text()), _resolved(config_lib.Config()))
    diff = _differences(stored, _resolved(cfg))
    if diff:
        raise RunConflict(
            f"{workdir} holds a run with a different config:\n  "
            + "\n  ".join(diff)
            + "\nUse another --workdir, or delete the folder to start over."
        )
    results = workdir / "results.json"
    return json.loads(results.read_text()) if results.exists() else None


def record_run(cfg: config_lib.Config, workdir: pathlib.Path, argv: list[str] | None) -> None:
    """Write config.json (once), command.txt and git_commit.txt into `workdir`."""
    if not is_writer():
        return
    if not (workdir / "config.json").exists():
        write_json_atomic(workdir / "config.json", _resolved(cfg))
    if argv is not None:
        write_text_atomic(workdir / "command.txt", " ".join(argv) + "\n")
    write_text_atomic(workdir / "git_commit.txt", git_commit() + "\n")


def write_json(path: pathlib.Path, obj: Any) -> None:
    """`write_json_atomic` from the writer process only (run-level files)."""
    if is_writer():
        write_json_atomic(path, obj)


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able value (e.g. the configs a shared stage depends on)."""
    import hashlib

    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@contextlib.contextmanager
def exclusive(folder: pathlib.Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock (flock on `.<folder>.lock` beside it) while the block runs, so
    that of the processes sharing a cache (a sweep's workers) one trains a shared stage and the
    others wait, then find it done. `on_wait()` is called once when another process holds the
    lock."""
    import fcntl

    lock = folder.with_name(f".{folder.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stage_done(stage_dir: pathlib.Path) -> dict | None:
    """The finished stage's done.json, or None."""
    done = stage_dir / "done.json"
    return json.loads(done.read_text()) if done.exists() else None
