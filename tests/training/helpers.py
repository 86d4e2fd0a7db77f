"""Shared helpers for the multi-device training tests: run a script on simulated CPU devices."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]


def run_on_devices(script: str, out: pathlib.Path, devices: int) -> subprocess.CompletedProcess:
    """Run `script out` in a fresh python with `devices` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    )
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def assert_runs_match(npz: pathlib.Path, names: Iterable[str], loss: Any, params: Any) -> None:
    """Each run `name` saved in `npz` ("name/loss", "name/<keystr path>") matches loss/params."""
    with np.load(npz) as multi:
        for name in names:
            np.testing.assert_allclose(multi[name + "/loss"], loss, rtol=1e-5)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
                np.testing.assert_allclose(
                    multi[name + "/" + jax.tree_util.keystr(path)],
                    leaf,
                    rtol=1e-4,
                    atol=1e-6,
                    err_msg=f"{name} {jax.tree_util.keystr(path)}",
                )
