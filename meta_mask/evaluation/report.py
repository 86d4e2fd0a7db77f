"""Reports a person reads: result tables (markdown), training curves (PNG), sweep aggregates.

Tables aggregate finished runs by (task, policy, output format) with mean +- std over seeds
and, against a reference policy, the paired difference with its bootstrap CI (the statistics
are evaluation/stats.py's), so a comparison of policies is one glance; curves plot each
stage's loss from its metrics.jsonl.
"""

from __future__ import annotations

import pathlib
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from meta_mask.evaluation import stats
from meta_mask.evaluation.writers import read_metrics

if TYPE_CHECKING:
    from meta_mask.batches import PolicyBatch

STAGES = ("learn_policy", "intermediate", "finetune")
# The dev metric each stage's curve shows (what its loop selects by, when it evaluates).
DEV_METRICS = ("dev_objective", "dev_span_f1", "dev_em", "dev_rougeL", "dev_accuracy")


def _headline(metrics: dict) -> list[str]:
    """Metric names in a stable order, without the count and nested buckets."""
    order = ["em", "f1", "accuracy", "rouge1", "rouge2", "rougeL", "rougeLsum"]
    keys = [k for k in metrics if k != "n" and not isinstance(metrics[k], dict)]
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def plot_curves(workdir: str | pathlib.Path) -> pathlib.Path | None:
    """curves.png: training loss per step of each stage that ran, with its dev evaluations
    (what the stage selects by) on a second axis; None when no stage ran."""
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
        train = [r for r in rows if "loss" in r]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss")
        dev = next((m for m in DEV_METRICS if any(m in r for r in rows)), None)
        if dev is not None:  # the loop's dev evaluations (what the stage selects by)
            evals = [r for r in rows if dev in r]
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in evals], [r[dev] for r in evals], "C1o-", ms=3)
            ax2.set_ylabel(dev, color="C1")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        # The meta objective is a difference of losses (it can be negative): no log scale.
        if all(r["loss"] > 0 for r in train):
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


def mean_std(values: Sequence[float]) -> str:
    """ "0.300 ± 0.141" over seeds (sample std), the value alone for one seed, "" for none."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


Group = tuple[str, str, str]  # (task, policy as shown, output format)


def _groups(results: Sequence[dict]) -> dict[Group, list[dict]]:
    """The runs of each (task, policy, output format), in the order they first appear; a run
    of a policy learned on another task is its own policy, "<policy> (from <task>)"."""
    groups: dict[Group, list[dict]] = defaultdict(list)
    for r in results:
        policy = r["policy"]
        if r.get("policy_task") and r["policy_task"] != r["task"]:
            policy = f"{policy} (from {r['policy_task']})"
        groups[(r["task"], policy, r.get("output_format", ""))].append(r)
    return groups


def _row(group: Group, runs: Sequence[dict]) -> list[str]:
    return [*group, str(len(runs))]


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def results_table(results: Sequence[dict], *, reference: str | None = None) -> str:
    """Markdown: one row per (task, policy, output format) with its number of seeds and each
    headline metric's mean +- std over seeds.

    With `reference` (a policy name), also a column of each row's paired difference from the
    runs of that policy with the same task and output format (`_difference`) and a legend
    under the table; when the reference has no runs, a line that says so instead of both.
    Runs with "diagnostics" in their results add a second table (`diagnostics_table`)."""
    groups = _groups(results)
    metric_names: list[str] = []
    for r in results:
        for k in _headline(r.get("metrics", {})):
            if k not in metric_names:
                metric_names.append(k)
    compare = reference is not None and any(policy == reference for _, policy, _ in groups)
    header = ["task", "policy", "format", "seeds", *metric_names, "minutes"]
    if compare:
        header.append(f"Δ vs {reference} [{stats.CONFIDENCE:.0%} CI]")
    rows, compared = [], set()
    for group, runs in groups.items():
        cells = _row(group, runs)
        for m in metric_names:
            cells.append(mean_std([r["metrics"][m] for r in runs if m in r.get("metrics", {})]))
        minutes = [sum(r.get("seconds", {}).values()) / 60 for r in runs]
        cells.append(f"{np.mean(minutes):.1f}")
        task, policy, fmt = group
        if compare and policy == reference:
            cells.append("(reference)")
        elif compare:
            ref_group = (task, reference, fmt)
            cell, metric = _difference(group, runs, ref_group, groups.get(ref_group, []))
            cells.append(cell)
            compared |= {metric} - {""}
        rows.append(cells)
    table = _markdown(header, rows)
    if compare:
        table += "\n\n" + _legend(reference, sorted(compared))
    elif reference is not None:
        table += (
            f"\n\nNo {reference} runs among these, so no paired differences (--sweep.reference "
            "names the policy to compare against)."
        )
    diagnostics = diagnostics_table(results)
    if diagnostics:
        table += f"\n\nDiagnostics (mean over seeds):\n\n{diagnostics}"
    return table


def _legend(reference: str, metrics: Sequence[str]) -> str:
    return (
        f"Δ: the difference of the main metric ({', '.join(metrics) or 'none compared'}) from "
        f"{reference}, paired by seed (same task and format) and by fact, averaged over seeds "
        f"and facts, with the {stats.CONFIDENCE:.0%} CI of a two-way bootstrap (seeds and "
        f"facts resampled, {stats.REPLICATES:,} replicates); * the CI excludes 0; "
        "(k seeds) when fewer seeds than the row's are paired."
    )


def _difference(
    group: Group, runs: Sequence[dict], ref_group: Group, reference: Sequence[dict]
) -> tuple[str, str]:
    """(the cell, the metric compared): `runs` minus `reference`, the runs of the reference
    policy with the same task and output format (stats.paired_difference)."""
    if not reference:
        return "no reference runs", ""
    if any("facts" not in r for r in (*runs, *reference)):
        return "no per-fact scores", ""
    metrics = {r["facts"]["metric"] for r in (*runs, *reference)}
    if len(metrics) > 1:
        raise stats.PairingError(
            f"{_name(group)} vs {_name(ref_group)}: per-fact scores of different metrics "
            f"{sorted(metrics)} cannot be compared"
        )
    diff = stats.paired_difference(
        _scores_by_seed(group, runs),
        _scores_by_seed(ref_group, reference),
        names=(_name(group), _name(ref_group)),
    )
    if diff is None:
        return "no paired seeds", ""
    cell = f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]"
    cell += " *" if diff.excludes_zero else ""
    cell += f" ({diff.seeds} seeds)" if diff.seeds < len(runs) else ""
    return cell, metrics.pop()


def _name(group: Group) -> str:
    return " / ".join(part for part in group if part)


def _scores_by_seed(group: Group, runs: Sequence[dict]) -> dict[int, dict[str, float]]:
    """{seed: per-fact scores} of one group's runs; two runs of one seed are an error."""
    out: dict[int, dict[str, float]] = {}
    for r in runs:
        seed = r.get("seed")
        if seed in out:
            raise stats.PairingError(
                f"two runs of {_name(group)} with seed {seed}: which one to pair is ambiguous; "
                "keep one of their results.json"
            )
        out[seed] = r["facts"]["scores"]
    return out


def diagnostics_table(results: Sequence[dict]) -> str:
    """Markdown: the mean over seeds of each per-run diagnostic (results' "diagnostics", a
    flat {name: float}) per (task, policy, output format); "" when no run has any."""
    groups = {
        g: runs for g, runs in _groups(results).items() if any(r.get("diagnostics") for r in runs)
    }
    names: list[str] = []
    for runs in groups.values():
        for r in runs:
            names += [k for k in r.get("diagnostics", {}) if k not in names]
    if not names:
        return ""
    rows = []
    for group, runs in groups.items():
        cells = _row(group, runs)
        for name in names:
            values = [r["diagnostics"][name] for r in runs if name in r.get("diagnostics", {})]
            cells.append(f"{np.mean(values):.3f}" if values else "")
        rows.append(cells)
    return _markdown(["task", "policy", "format", "seeds", *names], rows)


def transfer_table(results: Sequence[dict], metric: str = "") -> str:
    """Markdown matrix: rows = the task a learned policy was learned on, columns = the task it
    was used for; cells = the headline metric, mean +- std over seeds."""
    learned = [r for r in results if r.get("policy_task")]
    if not learned:
        return "(no learned-policy runs)"
    metric = metric or _headline(learned[0]["metrics"])[0]
    sources = sorted({r["policy_task"] for r in learned})
    targets = sorted({r["task"] for r in learned})
    lines = ["| learned on \\ used for | " + " | ".join(targets) + " |",
             "|" + "---|" * (len(targets) + 1)]  # fmt: skip
    for source in sources:
        cells = []
        for target in targets:
            cells.append(mean_std([
                r["metrics"][metric] for r in learned
                if r["policy_task"] == source and r["task"] == target and metric in r["metrics"]
            ]))  # fmt: skip
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return f"{metric}:\n\n" + "\n".join(lines)


def mask_probabilities(
    scorer, batch: PolicyBatch, budget: dict, *, draws: int = 200, seed: int = 0
):
    """Each token's probability of being masked by `scorer` under `budget`, estimated over
    `draws` sampler draws (float [B, L]). Works for every policy, heuristic or learned."""
    from meta_mask.policies.sampler import BatchRng, mask_batch_np

    total = np.zeros(np.shape(batch["input_ids"]), np.float64)
    for d in range(draws):
        total += mask_batch_np(scorer, batch, BatchRng(seed, d, batch["example_ids"]), **budget)
    return total / draws


def _cell(token: str, p: float) -> str:
    import html

    shade = int(255 * (1 - p))
    text = html.escape(token.replace("Ġ", " ").replace("▁", " "))
    return (
        f'<span title="{p:.2f}" style="background: rgb(255,{shade},{shade}); '
        f'padding: 1px 2px; margin: 1px; border-radius: 3px">{text}</span>'
    )


def write_mask_heatmap(
    path: str | pathlib.Path,
    tokens: Sequence[Sequence[str]],
    probs: np.ndarray,
    valid: np.ndarray,
    *,
    title: str = "",
) -> None:
    """An HTML page and a PNG beside it: each sentence's tokens shaded by mask probability."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for toks, p, v in zip(tokens, probs, valid, strict=True):
        cells = [_cell(t, float(q)) for t, q, ok in zip(toks, p, v, strict=False) if ok]
        rows.append("<p style='font-family: monospace'>" + " ".join(cells) + "</p>")
    path.write_text(
        f"<html><body><h3>mask probability per token: {title}</h3>\n" + "\n".join(rows)
        + "\n</body></html>\n",
        encoding="utf-8",
    )  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Lines of (label, probability), wrapped at the figure's width; a blank line between rows.
    lines: list[list[tuple[str, float]]] = []
    for toks, p, v in zip(tokens, probs, valid, strict=True):
        if lines:
            lines.append([])
        line: list[tuple[str, float]] = []
        width = 0.0
        for t, q, ok in zip(toks, p, v, strict=False):
            if not ok:
                continue
            label = t.replace("Ġ", "").replace("▁", "")
            step = 0.0095 * (len(label) + 2)
            if line and width + step > 1.0:
                lines.append(line)
                line, width = [], 0.0
            line.append((label, float(q)))
            width += step
        lines.append(line)
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(lines) + 0.8))
    ax.set_axis_off()
    cmap = plt.get_cmap("Reds")
    for r, line in enumerate(lines):
        x = 0.0
        for label, q in line:
            ax.text(
                x, -r, label, fontsize=9, family="monospace", va="center",
                bbox=dict(boxstyle="round,pad=0.2", fc=cmap(0.85 * q), ec="none"),
            )  # fmt: skip
            x += 0.0095 * (len(label) + 2)
    ax.set_xlim(0, 1)
    ax.set_ylim(-len(lines) + 0.5, 0.5)
    ax.set_title(f"mask probability per token: {title}", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.4 / (0.3 * len(lines) + 0.8), bottom=0.01)
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)


def write_mask_examples(out: pathlib.Path, batches, tokenizer, policy, num: int = 4) -> None:
    """What the policy masks: a heatmap (out: .html, and .png beside it) of per-token mask
    probabilities for the first `num` sentences of the intermediate stage's first batch,
    estimated over many sampler draws, so heuristic and learned policies are shown alike.
    `batches` is a policies.mlm_batches.MlmBatches; `policy` the run's PolicyConfig."""
    batch, _ = batches.masked(0)
    rows = {k: v[:num] if hasattr(v, "__getitem__") else v for k, v in batch.items()}
    probs = mask_probabilities(batches.scorer, rows, policy.budget())
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in rows["input_ids"]]
    write_mask_heatmap(out, tokens, probs, rows["valid"], title=policy.name)
