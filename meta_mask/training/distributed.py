"""Multi-host start-up: when and how to call `jax.distributed.initialize`.

Owns the one decision the CLI delegates: whether this process is one of several (a TPU pod
slice, a SLURM job, or processes started by hand) and, if so, joining them before any other
jax call. "auto" joins only when the environment says there is a cluster (SLURM or a
multi-host TPU), and then lets jax detect coordinator, process count and id itself; "on"
always joins, with any explicit values given; "off" never does. On CPU the cross-process
collectives are jax's default, gloo, so the same code runs a two-process test on localhost.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import jax

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")

# Environment variables whose presence means a launcher started several cooperating processes.
# SLURM: jax's SlurmCluster reads SLURM_JOB_ID / SLURM_NTASKS / SLURM_PROCID / SLURM_STEP_NODELIST.
# TPU pods: each TPU VM worker sees the comma-separated worker list (multislice adds
# MEGASCALE_COORDINATOR_ADDRESS); jax's GCE TPU cluster detection then queries the metadata.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS")


@dataclass(frozen=True)
class DistributedArgs:
    """What to pass to `jax.distributed.initialize` (None = let jax detect it)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def cluster_in_environment(env: Mapping[str, str]) -> str | None:
    """ "slurm" or "tpu" when `env` shows a multi-process launch, else None.

    A SLURM allocation with one task, or a single-host TPU VM (one worker hostname), is a
    single process: nothing to join.
    """
    if all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "tpu"
    return None


def should_initialize(mode: str, args: DistributedArgs, env: Mapping[str, str]) -> bool:
    """Whether `mode` ("auto" | "on" | "off") asks this process to join a cluster."""
    if mode not in MODES:
        raise ValueError(f"--distributed={mode!r}; valid: {MODES}")
    if mode == "off":
        if args != DistributedArgs():
            raise ValueError(
                "--coordinator_address/--num_processes/--process_id were given with "
                "--distributed=off; use --distributed=on (or auto) to join them"
            )
        return False
    if mode == "on":
        return True
    explicit = args.coordinator_address is not None or "JAX_COORDINATOR_ADDRESS" in env
    return explicit or cluster_in_environment(env) is not None


def initialize(
    mode: str = "auto",
    args: DistributedArgs = DistributedArgs(),  # noqa: B008 - frozen, so a safe default
    env: Mapping[str, str] | None = None,
) -> bool:
    """Join the cluster when `mode` asks for it; True when this run is multi-process.

    Must run before any other jax computation (it fixes the device list). Explicit values
    in `args` win; those left None are detected by jax (SLURM variables, TPU metadata,
    JAX_COORDINATOR_ADDRESS). Returns False without touching jax when nothing is to be joined.
    """
    env = os.environ if env is None else env
    if not should_initialize(mode, args, env):
        return False
    if (args.num_processes is None) != (args.process_id is None):
        raise ValueError(
            "--num_processes and --process_id go together: give both, or neither (to let jax "
            "detect them from SLURM or the TPU environment)"
        )
    if args.process_id is not None and not 0 <= args.process_id < args.num_processes:
        raise ValueError(
            f"--process_id={args.process_id} must lie in [0, --num_processes={args.num_processes})"
        )
    jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    log.info(
        "joined %d processes as process %d: %d local of %d devices",
        jax.process_count(), jax.process_index(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip
    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes run-level files (configs, logs, results): process 0 only."""
    return jax.process_index() == 0
