"""Reports a person reads: result tables (markdown), training curves (PNG), sweep aggregates.

Tables aggregate finished runs by (task, policy, output format) with mean +- std over seeds,
so a comparison of policies is one glance; curves plot each stage's loss from its
metrics.jsonl.
"""

from __future__ import annotations

import json
import pathlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from meta_mask.evaluation.writers import read_metrics

STAGES = ("intermediate", "finetune")


def _headline(metrics: dict) -> list[str]:
    """Metric names in a stable order, without the count and nested buckets."""
    order = ["em", "f1", "accuracy", "rouge1", "rouge2", "rougeL", "rougeLsum"]
    keys = [k for k in metrics if k != "n" and not isinstance(metrics[k], dict)]
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def plot_curves(workdir: str | pathlib.Path) -> pathlib.Path | None:
    """curves.png: training loss per step of each stage that ran; None when none did."""
    workdir = pathlib.Path(workdir)
    series = {s: read_metrics(workdir / s) for s in STAGES}
    series = {s: rows for s, rows in series.items() if rows}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (stage, rows) in zip(axes[0], series.items(), strict=True):
        steps = [r["step"] for r in rows if "loss" in r]
        ax.plot(steps, [r["loss"] for r in rows if "loss" in r], label="loss")
        if any("accuracy" in r for r in rows):
            ax2 = ax.twinx()
            ax2.plot(steps, [r.get("accuracy", np.nan) for r in rows if "loss" in r], "C1",
                     label="token accuracy")  # fmt: skip
            ax2.set_ylabel("token accuracy", color="C1")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
    fig.suptitle(workdir.name)
    fig.tight_layout()
    out = workdir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_run_report(workdir: str | pathlib.Path, results: dict) -> None:
    """results.md (one row) and curves.png for one run."""
    workdir = pathlib.Path(workdir)
    (workdir / "results.md").write_text(results_table([results]) + "\n", encoding="utf-8")
    plot_curves(workdir)


def results_table(results: Sequence[dict]) -> str:
    """Markdown table: one row per (task, policy, output format), mean +- std over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["task"], r["policy"], r.get("output_format", ""))].append(r)
    metric_names: list[str] = []
    for r in results:
        for k in _headline(r.get("metrics", {})):
            if k not in metric_names:
                metric_names.append(k)
    header = ["task", "policy", "format", "seeds", *metric_names, "minutes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (task, policy, fmt), runs in groups.items():
        cells = [task, policy, fmt, str(len(runs))]
        for m in metric_names:
            values = np.asarray([r["metrics"][m] for r in runs if m in r.get("metrics", {})])
            if len(values) == 0:
                cells.append("")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{values.mean():.3f} ± {values.std(ddof=1):.3f}")
        minutes = [sum(r.get("seconds", {}).values()) / 60 for r in runs]
        cells.append(f"{np.mean(minutes):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect_results(root: str | pathlib.Path) -> list[dict]:
    """Every finished run (a results.json) below `root`."""
    out = []
    for path in sorted(pathlib.Path(root).glob("**/results.json")):
        if path.parent == pathlib.Path(root):
            continue  # the sweep's own aggregate
        out.append(json.loads(path.read_text()))
    return out
