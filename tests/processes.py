"""Fresh Python processes for the tests: `python -m <module> args` from the repository root,
importing the tree under test (its root first on PYTHONPATH), jax on CPU unless the caller's
environment chose a platform, or on `devices` simulated CPU devices."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def python_env(devices: int | None = None, **overrides: str) -> dict[str, str]:
    """This process's environment for a child python: REPO first on PYTHONPATH (so the child
    imports this tree, not an installed copy), JAX_PLATFORMS=cpu unless already set, and with
    `devices` that many simulated CPU devices (forcing the CPU platform); then `overrides`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("JAX_PLATFORMS", "cpu")
    if devices is not None:
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
        )
        env["JAX_PLATFORMS"] = "cpu"
    env.update(overrides)
    return env


def module_command(module: str, *args: object) -> list[str]:
    """The command line `python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *map(str, args)]


def run_module(
    module: str,
    *args: object,
    devices: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    **kwargs,
) -> subprocess.CompletedProcess:
    """Run `python -m module args` from REPO in python_env(devices, **env) and wait for it;
    stdout and stderr are captured as text unless `kwargs` redirect them."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(
        module_command(module, *args),
        cwd=REPO,
        env=python_env(devices, **(env or {})),
        text=True,
        timeout=timeout,
        **kwargs,
    )
