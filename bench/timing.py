"""Timing: interleaved repeats and their medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def interleave(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every fn once per repeat, in turn (A, B, A, B, ...); each returns seconds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def timed(fn: Callable[[], Any], iters: int) -> float:
    """Seconds per call of `fn` (which must block until its work is done)."""
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters
