"""How busy the machine was while a section ran, and whether its numbers can be trusted.

`measure(fn)` runs one section and records, around it, `os.getloadavg()` (1, 5, 15 minutes)
before and after, and the CPUs that OTHER processes kept busy meanwhile: busy CPU time from
/proc/stat (steal included: on a VM it is time the host gave to someone else) less this
process's own CPU time (its finished child processes' included: PyTorch's worker), over the
section's wall time. The load average alone cannot tell: this benchmark's own threads raise it
(a 2-thread section lifts the 1-minute average towards 2 on an otherwise idle machine), so a
section is marked unreliable when its background load, the 1-minute load average (mean of before
and after) less this process's own average busy CPUs, or the CPUs others used, exceeds
UNRELIABLE_LOAD.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import Any

UNRELIABLE_LOAD = 1.5


def _busy_cpu_seconds() -> float | None:
    """Machine-wide busy CPU seconds since boot (None where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of every thread of this process and of its finished child processes
    (PyTorch's worker, which a section waits for before it returns)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def measure(fn: Callable[[], Any]) -> tuple[Any, dict]:
    """(fn(), its load record: load averages, own / others' busy CPUs, reliable)."""
    before, busy0, own0 = os.getloadavg(), _busy_cpu_seconds(), _own_cpu_seconds()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    after, busy1, own = os.getloadavg(), _busy_cpu_seconds(), _own_cpu_seconds() - own0
    own_cpus = own / wall
    record: dict[str, Any] = {
        "load_average_before": list(before),
        "load_average_after": list(after),
        "wall_s": wall,
        "own_cpus": own_cpus,
    }
    background = (before[0] + after[0]) / 2 - own_cpus
    if busy0 is not None and busy1 is not None:
        record["others_cpus"] = max(busy1 - busy0 - own, 0.0) / wall
        background = max(background, record["others_cpus"])
    record["background_load"] = max(background, 0.0)
    record["reliable"] = record["background_load"] <= UNRELIABLE_LOAD
    return out, record


def describe(record: dict) -> str:
    """One table cell: the load averages and, when over the threshold, UNRELIABLE."""
    text = (
        f"load {record['load_average_before'][0]:.2f} -> {record['load_average_after'][0]:.2f}"
        f", background {record['background_load']:.2f}"
    )
    if not record["reliable"]:
        text = f"**UNRELIABLE** ({text} > {UNRELIABLE_LOAD})"
    return text
