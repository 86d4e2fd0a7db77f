"""Grids of runs: policies x seeds x tasks, one after another here or one command each.

A grid with no axes is a single run in the workdir itself. Otherwise each cell runs in
`workdir/<task>/<policy>/seed<k>` (sharing one corpus cache in `workdir/cache`), finished
cells are skipped on rerun, and the finished runs are aggregated into `workdir/summary.md`
(mean +- std over seeds), which is also printed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import pathlib
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from meta_mask.config import Config

log = logging.getLogger(__name__)

_SWEEP_FLAGS = (
    "--sweep.policies", "--sweep.seeds", "--sweep.tasks", "--sweep.print_commands",
    "--sweep.transfer",
)  # fmt: skip


@dataclass(frozen=True)
class Grid:
    policies: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    tasks: tuple[str, ...] = ()
    # Learned policies only: also run every task with the policy learned on every other task.
    transfer: bool = False

    def is_single(self) -> bool:
        return not (self.policies or self.seeds or self.tasks)


def _cell(cfg: Config, task: str, policy: str, seed: int, checkpoint: str = "") -> Config:
    return dataclasses.replace(
        cfg,
        seed=seed,
        data=dataclasses.replace(cfg.data, task=task),
        policy=dataclasses.replace(cfg.policy, name=policy, checkpoint=checkpoint),
    )


def cells(cfg: Config, grid: Grid, root: pathlib.Path | None = None) -> list[tuple[str, Config]]:
    """(relative folder, config) of every run in the grid, in a fixed order.

    With `grid.transfer`, after the ordinary cells (each learns its task's policy) come the
    transfer cells `<target>/<policy>-from-<source>/seed<k>`, which read the policy that the
    source task's cell of the same seed learned (--policy.checkpoint)."""
    if grid.is_single():
        return [("", cfg)]
    out = []
    tasks = grid.tasks or (cfg.data.task,)
    policies = grid.policies or (cfg.policy.name,)
    seeds = grid.seeds or (cfg.seed,)
    for task, policy, seed in itertools.product(tasks, policies, seeds):
        out.append((f"{task}/{policy}/seed{seed}", _cell(cfg, task, policy, seed)))
    if grid.transfer:
        from meta_mask.config import LEARNED_POLICIES

        root = pathlib.Path(".") if root is None else root
        for source, target, policy, seed in itertools.product(tasks, tasks, policies, seeds):
            if source == target or policy not in LEARNED_POLICIES:
                continue
            learned = root / source / policy / f"seed{seed}" / "learn_policy"
            sub = f"{target}/{policy}-from-{source}/seed{seed}"
            out.append((sub, _cell(cfg, target, policy, seed, str(learned))))
    return out


def commands(grid: Grid, argv: Sequence[str], workdir: str) -> list[str]:
    """One shell command per cell, for a cluster scheduler (argv: this process's)."""
    keep = [a for a in argv[1:] if not a.startswith(_SWEEP_FLAGS) and not a.startswith("--workdir")]
    base = [sys.executable, "-m", "meta_mask.train", *keep]
    out = []
    tasks, policies, seeds = grid.tasks or (None,), grid.policies or (None,), grid.seeds or (None,)
    for task, policy, seed in itertools.product(tasks, policies, seeds):
        extra = ["--sweep.policies=", "--sweep.seeds=", "--sweep.tasks="]  # override flagfiles
        parts = []
        if task is not None:
            extra.append(f"--data.task={task}")
        parts.append(task)
        if policy is not None:
            extra.append(f"--policy.name={policy}")
        parts.append(policy)
        if seed is not None:
            extra.append(f"--seed={seed}")
        parts.append(f"seed{seed}" if seed is not None else None)
        sub = "/".join(p for p in parts if p is not None)
        out.append(shlex.join([*base, *extra, f"--workdir={pathlib.Path(workdir) / sub}"]))
    return out


def run(
    cfg: Config,
    grid: Grid,
    workdir: str,
    *,
    argv: Sequence[str] | None = None,
    aggregate_only: bool = False,
) -> int:
    """Run every cell (skipping finished ones), then print the aggregate table; exit code."""
    from meta_mask import pipeline
    from meta_mask.evaluation import report
    from meta_mask.training.loop import NonFiniteLoss, Preempted
    from meta_mask.workdir import RunConflict

    root = pathlib.Path(workdir)
    if not aggregate_only:
        todo = cells(cfg, grid, root)
        for i, (sub, cell) in enumerate(todo):
            where = root / sub if sub else root
            if len(todo) > 1:
                print(f"[{i + 1}/{len(todo)}] {sub}", flush=True)
            try:
                pipeline.run(
                    cell, where, cache_dir=root / "cache", argv=list(argv) if argv else None
                )
            except Preempted as e:
                print(str(e), file=sys.stderr)
                return 143  # 128 + SIGTERM: the run is not finished; rerun to resume
            except (NonFiniteLoss, RunConflict) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
    # The grid's own cells in grid order (as the command lists the policies); with
    # --sweep.aggregate_only, every finished run below the workdir.
    files = (
        [root / sub / "results.json" for sub, _ in cells(cfg, grid, root)]
        if not aggregate_only
        else sorted(root.glob("**/results.json"))
    )
    results = [json.loads(f.read_text()) for f in files if f.exists()]
    if not results:
        print(f"no finished runs under {root}")
        return 0
    table = report.results_table(results)
    if grid.transfer:
        table += "\n\nTransfer (rows: the task the policy was learned on; columns: the task):\n\n"
        table += report.transfer_table(results)
    if not grid.is_single():
        (root / "summary.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0
