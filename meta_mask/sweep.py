"""Grids of runs: policies x seeds x tasks, one after another here, N at a time in their own
processes (--sweep.workers, sweep_workers.py), or one command each (--sweep.print_commands).

A grid (config.SweepConfig) with no axes is a single run in the workdir itself. Otherwise each
cell runs in `workdir/<task>/<policy>/seed<k>` (sharing one corpus cache in `workdir/cache`),
finished cells are skipped on rerun, and the finished runs are aggregated into
`workdir/summary.md`, which is also printed: mean +- std over seeds, and each policy's paired
difference from --sweep.reference with a bootstrap CI (evaluation/report.py, stats.py). A cell
is an ordinary Config: the grid it came from is not part of it (nor of its config.json).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import shlex
import sys
from collections.abc import Sequence

from meta_mask.config import LEARNED_POLICIES, Config, SweepConfig, to_dict

Cell = tuple[str, Config]  # (folder relative to the workdir, the run's config)


def _cell(cfg: Config, task: str, policy: str, seed: int, checkpoint: str = "") -> Config:
    return dataclasses.replace(
        cfg,
        seed=seed,
        data=dataclasses.replace(cfg.data, task=task),
        policy=dataclasses.replace(cfg.policy, name=policy, checkpoint=checkpoint),
    )


def waves(
    cfg: Config, grid: SweepConfig, root: pathlib.Path | None = None
) -> tuple[list[Cell], list[Cell]]:
    """The grid's runs in two waves, each in a fixed order: the cells, then (with
    `grid.transfer`) the transfer cells, which read policies that cells of the first wave learn.

    A transfer cell `<target>/<policy>-from-<source>/seed<k>` runs the target task with the
    policy that the source task's cell of the same seed learned (--policy.checkpoint, under
    `root`)."""
    if grid.is_single():
        return [("", cfg)], []
    tasks = grid.tasks or (cfg.data.task,)
    policies = grid.policies or (cfg.policy.name,)
    seeds = grid.seeds or (cfg.seed,)
    first = [
        (f"{task}/{policy}/seed{seed}", _cell(cfg, task, policy, seed))
        for task, policy, seed in itertools.product(tasks, policies, seeds)
    ]
    second = []
    if grid.transfer:
        root = pathlib.Path(".") if root is None else root
        for source, target, policy, seed in itertools.product(tasks, tasks, policies, seeds):
            if source == target or policy not in LEARNED_POLICIES:
                continue
            learned = root / source / policy / f"seed{seed}" / "learn_policy"
            sub = f"{target}/{policy}-from-{source}/seed{seed}"
            second.append((sub, _cell(cfg, target, policy, seed, str(learned))))
    return first, second


def cells(cfg: Config, grid: SweepConfig, root: pathlib.Path | None = None) -> list[Cell]:
    """(relative folder, config) of every run in the grid, in the order they run."""
    first, second = waves(cfg, grid, root)
    return first + second


GENERIC_WAVE = (
    "# The generic LM of each seed (the generic stage), which every run below starts from: "
    "start those once these have finished."
)
RUNS_WAVE = "# The runs."
TRANSFER_WAVE = (
    "# Transfer runs: each reads the policy that a run above learns (--policy.checkpoint), "
    "so start them once those have finished."
)


def generic_cells(cfg: Config, grid: SweepConfig) -> list[Cell]:
    """One run of the generic stage alone (--stages=generic) per seed of the grid, in
    `generic/seed<k>`, when the config trains one; [] otherwise."""
    if not cfg.generic.train.steps or grid.is_single():
        return []
    seeds = grid.seeds or (cfg.seed,)
    return [
        (f"generic/seed{seed}", dataclasses.replace(cfg, seed=seed, stages=("generic",)))
        for seed in seeds
    ]


def commands(
    cfg: Config,
    grid: SweepConfig,
    argv: Sequence[str],
    workdir: str,
    cache_dir: str | None = None,
) -> list[str]:
    """One shell command per cell of the grid (for a cluster scheduler), in the folders that
    `cells` gives, all sharing one --cache_dir (default <workdir>/cache); when the config trains
    a generic stage, one command per seed trains it first (GENERIC_WAVE), and the transfer cells
    come last (TRANSFER_WAVE): each wave after a comment line saying what it waits for."""
    out = []
    for note, wave in command_waves(cfg, grid, argv, workdir, cache_dir):
        if wave and note:
            out.append(note)
        out += [shlex.join(args) for _, args in wave]
    return out


def command_waves(
    cfg: Config,
    grid: SweepConfig,
    argv: Sequence[str],
    workdir: str,
    cache_dir: str | None = None,
) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """(what the wave waits for, [(cell folder, argv)]) for the waves of `commands`.

    Each command is this process's `argv` (without its --workdir, --cache_dir and --sweep.*
    flags), then the flags that turn `cfg` into the cell's config, then resets of the --sweep.*
    values (which a flagfile may set), the shared --cache_dir and the cell's --workdir."""
    root = pathlib.Path(workdir)
    cache = pathlib.Path(cache_dir) if cache_dir else root / "cache"
    kept, dropped = _split_sweep_and_workdir(argv[1:])
    base = [sys.executable, "-m", "meta_mask.train", *kept]
    # Each command is one run: every --sweep.* value that the kept arguments may still set (in
    # a flagfile: seen in `grid`, or overridden by a dropped flag) goes back to its default.
    empty = SweepConfig()
    resets = [
        f"--sweep.{f.name}={_flag_value(getattr(empty, f.name))}"
        for f in dataclasses.fields(SweepConfig)
        if getattr(grid, f.name) != getattr(empty, f.name) or f.name in dropped
    ]
    generic = generic_cells(cfg, grid)
    first, second = waves(cfg, grid, root)
    out = []
    for note, wave in ((GENERIC_WAVE, generic), (RUNS_WAVE if generic else "", first),
                       (TRANSFER_WAVE, second)):  # fmt: skip
        runs = []
        for sub, cell in wave:
            args = _flag_args(to_dict(cfg), to_dict(cell))
            shared = [f"--cache_dir={cache}", f"--workdir={root / sub}"]
            runs.append((sub, [*base, *args, *resets, *shared]))
        out.append((note, runs))
    return out


def _flag_args(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`--path=value` for every leaf of the nested dict `new` that differs from `old`."""
    out = []
    for key, value in new.items():
        if isinstance(value, dict):
            out += _flag_args(old[key], value, f"{prefix}{key}.")
        elif value != old[key]:
            out.append(f"--{prefix}{key}={_flag_value(value)}")
    return out


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


_SWEEP_BOOLS = {f.name for f in dataclasses.fields(SweepConfig) if isinstance(f.default, bool)}


def _split_sweep_and_workdir(args: Sequence[str]) -> tuple[list[str], set[str]]:
    """(`args` without its --workdir, --cache_dir and --sweep.* flags, the SweepConfig fields
    those set).

    Flags come as --flag=v, --flag v or --[no]flag (booleans); each command sets its own."""
    kept, dropped, skip_value = [], set(), False
    for arg in args:
        if skip_value:
            skip_value = False
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        field = name.removeprefix("no").removeprefix("sweep.")
        if not arg.startswith("-") or not (
            name in ("workdir", "cache_dir") or name.startswith(("sweep.", "nosweep."))
        ):
            kept.append(arg)
            continue
        if name not in ("workdir", "cache_dir"):
            dropped.add(field)
        # A value flag without "=" takes the next argument as its value.
        skip_value = "=" not in arg and field not in _SWEEP_BOOLS
    return kept, dropped


def _run_in_workers(
    cfg: Config,
    grid: SweepConfig,
    root: pathlib.Path,
    argv: Sequence[str] | None,
    cache_dir: str | None,
) -> int:
    """Every cell as its own command (`command_waves`), `grid.workers` at a time; exit status."""
    from meta_mask import sweep_workers

    if not argv:
        raise ValueError("--sweep.workers > 1 runs the grid's commands: pass the command line")
    grouped = []
    for _, wave in command_waves(cfg, grid, argv, str(root), cache_dir):
        # The learned policies' runs are the longest: started first, they finish with the rest.
        learned = [c for c in wave if any(f"/{p}/" in f"/{c[0]}" for p in LEARNED_POLICIES)]
        grouped.append(learned + [c for c in wave if c not in learned])
    return sweep_workers.run_waves(grouped, grid.workers, root / "logs")


def run(
    cfg: Config,
    grid: SweepConfig,
    workdir: str,
    *,
    argv: Sequence[str] | None = None,
    cache_dir: str | None = None,
) -> int:
    """Run every cell (skipping finished ones), then print the aggregate table; exit code.
    The cells share `cache_dir` (default <workdir>/cache): tokenized corpora and each seed's
    generic LM are computed once."""
    from meta_mask import pipeline
    from meta_mask.evaluation import report
    from meta_mask.training.loop import NonFiniteLoss, Preempted

    root = pathlib.Path(workdir)
    cache = pathlib.Path(cache_dir) if cache_dir else root / "cache"
    if not grid.aggregate_only and grid.workers > 1 and not grid.is_single():
        status = _run_in_workers(cfg, grid, root, argv, cache_dir)
        if status:
            return status
    elif not grid.aggregate_only:
        todo = cells(cfg, grid, root)
        for i, (sub, cell) in enumerate(todo):
            where = root / sub if sub else root
            if len(todo) > 1:
                print(f"[{i + 1}/{len(todo)}] {sub}", flush=True)
            try:
                pipeline.run(cell, where, cache_dir=cache, argv=list(argv) if argv else None)
            except Preempted as e:
                print(str(e), file=sys.stderr)
                return 143  # 128 + SIGTERM: the run is not finished; rerun to resume
            except NonFiniteLoss as e:  # the run diverged: its message names the step
                print(f"error: {e}", file=sys.stderr)
                return 1
    # The grid's own cells in grid order (as the command lists the policies); with
    # --sweep.aggregate_only, every finished run below the workdir.
    files = (
        [root / sub / "results.json" for sub, _ in cells(cfg, grid, root)]
        if not grid.aggregate_only
        else sorted(root.glob("**/results.json"))
    )
    results = [json.loads(f.read_text()) for f in files if f.exists()]
    if cfg.stages == ("generic",) and not grid.aggregate_only:
        print(f"the generic stage is done (under {cache / 'generic'})")
        return 0
    if not results:
        print(f"no finished runs under {root}")
        return 0
    table = report.results_table(results, reference=grid.reference)
    if grid.transfer:
        table += "\n\nTransfer (rows: the task the policy was learned on; columns: the task):\n\n"
        table += report.transfer_table(results)
    if not grid.is_single():
        (root / "summary.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0
