"""Metric writers: one JSON-lines file and TensorBoard events per stage.

Only process 0 of a multi-host run writes (the others get a writer that drops everything),
so logs are never duplicated or interleaved.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    """Convert numpy/jax scalars to JSON-friendly Python values (NaN/Inf kept as strings)."""
    value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricWriter:
    """Appends `{"step": s, **metrics}` lines to `<dir>/metrics.jsonl` and TensorBoard scalars."""

    def __init__(self, directory: str | pathlib.Path, *, enabled: bool = True):
        self.enabled = enabled
        self.directory = pathlib.Path(directory)
        self._tb = None
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.directory / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def _board(self):
        # Imported lazily: tensorboardX pulls in protobuf, which only logging needs.
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.directory / "tb"))
        return self._tb

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{prefix + k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
        self._jsonl.flush()
        board = self._board()
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float):
                board.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(directory: str | pathlib.Path) -> list[dict]:
    """Read back a stage's metrics.jsonl; a resumed run keeps only the last value of a step."""
    path = pathlib.Path(directory) / "metrics.jsonl"
    if not path.exists():
        return []
    rows: dict[tuple, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[(row["step"], tuple(sorted(row)))] = row
    return sorted(rows.values(), key=lambda r: r["step"])
