"""The command line: the only module that reads flags.

    python -m meta_mask.train --flagfile=experiments/world.flags --workdir=runs/world

Every field of meta_mask.config.Config is a flag named by its path (`--model.d_model=64`,
`--policy.name=salient_spans`, `--intermediate.optim.learning_rate=3e-4`), so a flagfile is
a complete, typed description of an experiment and a misspelled flag fails at parse time.
`--sweep.*` flags turn one command into a grid of runs (policies x seeds x tasks) that runs
one after another here, or prints one command per run for a cluster (`--sweep.print_commands`).
An error that is the user's to fix (meta_mask.errors.UserError: a bad data file, an unknown
task, an unreachable hub) prints as one line `error: <message>` and exits with status 1.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

from absl import app, flags

from meta_mask import config as config_lib
from meta_mask.errors import UserError

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Folder for this run's stages, checkpoints and results.")
flags.DEFINE_list("sweep.policies", [], "Run one sub-run per policy name (overrides policy.name).")
flags.DEFINE_list("sweep.seeds", [], "Run one sub-run per seed (overrides seed).")
flags.DEFINE_list("sweep.tasks", [], "Run one sub-run per task (overrides data.task).")
flags.DEFINE_bool(
    "sweep.transfer",
    False,
    "With a learned policy and several --sweep.tasks: also run every task with the policy "
    "learned on every other task, and print the transfer matrix.",
)
flags.DEFINE_bool(
    "sweep.print_commands", False, "Print one command per sub-run (for a cluster) and exit."
)
flags.DEFINE_bool(
    "sweep.aggregate_only", False, "Only aggregate the finished sub-runs into one table."
)
flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Join a multi-process jax run (jax.distributed.initialize) before anything else: auto = "
    "when SLURM (>1 task), a TPU pod or --coordinator_address says so; on = always (values not "
    "given are detected by jax); off = never.",
)
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: detected by jax)."
)
flags.DEFINE_integer("num_processes", None, "Processes in the run (default: detected by jax).")
flags.DEFINE_integer("process_id", None, "This process's index (default: detected by jax).")


def _define(prefix: str, cls) -> list[str]:
    """Define one flag per (nested) dataclass field; returns the flag names."""
    names = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(default):
            names += _define(name + ".", type(default))
            continue
        help_ = f"{cls.__name__}.{f.name}"
        if isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, help_)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, [str(v) for v in default], help_ + " (comma-separated)")
        elif default is None or isinstance(default, str):
            # Optional ints (e.g. forced_bos_token_id) are strings here; "none" means None.
            flags.DEFINE_string(name, "none" if default is None else default, help_)
        else:  # pragma: no cover - a new field type must get a flag type here
            raise TypeError(f"no flag type for {name} (default {default!r})")
        names.append(name)
    return names


_CONFIG_FLAGS = _define("", config_lib.Config)


def _typed(value, default):
    """Convert a flag value back to the type of the config field's default."""
    if isinstance(default, tuple):
        kind = type(default[0]) if default else str
        return tuple(kind(v) for v in value)
    if default is None:
        return None if value in ("none", "None", "") else int(value)
    return value


def config_from_flags() -> config_lib.Config:
    """The resolved Config from the parsed flags (errors name the flag)."""
    nested: dict = {}
    defaults = dataclasses.asdict(config_lib.Config())
    for name in _CONFIG_FLAGS:
        *path, leaf = name.split(".")
        node, dnode = nested, defaults
        for part in path:
            node, dnode = node.setdefault(part, {}), dnode[part]
        default = dnode[leaf]
        if isinstance(default, list):  # asdict turned tuples of dataclass fields into lists
            default = tuple(default)
        node[leaf] = _typed(FLAGS[name].value, default)
    try:
        return config_lib.from_dict(config_lib.Config, nested)
    except (ValueError, TypeError) as e:
        raise app.UsageError(f"bad flag value: {e}") from e


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (the folder for this run's outputs)")
    cfg = config_from_flags()
    _quiet_libraries()
    _join_cluster()
    # Imported here so that `--help` and flag errors stay fast (no jax import).
    from meta_mask import sweep

    grid = sweep.Grid(
        policies=tuple(FLAGS["sweep.policies"].value),
        seeds=tuple(int(s) for s in FLAGS["sweep.seeds"].value),
        tasks=tuple(FLAGS["sweep.tasks"].value),
        transfer=FLAGS["sweep.transfer"].value,
    )
    if FLAGS["sweep.print_commands"].value:
        for line in sweep.commands(grid, sys.argv, FLAGS.workdir):
            print(line)
        return
    try:
        code = sweep.run(
            cfg,
            grid,
            FLAGS.workdir,
            argv=sys.argv,
            aggregate_only=FLAGS["sweep.aggregate_only"].value,
        )
    except UserError as e:
        # The message says what to fix; a traceback would only bury it. Anything else is a
        # bug and keeps its traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


def _join_cluster() -> None:
    """jax.distributed.initialize when --distributed asks for it (before any jax computation)."""
    from meta_mask.training import distributed

    args = distributed.DistributedArgs(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
    try:
        distributed.initialize(FLAGS.distributed, args)
    except ValueError as e:
        raise app.UsageError(str(e)) from e


def _quiet_libraries() -> None:
    """Our progress messages at INFO; orbax's and absl's chatter only from WARNING up
    (raise it with --verbosity=1)."""
    if not FLAGS["verbosity"].present:
        logging.getLogger("absl").setLevel(logging.WARNING)
    ours = logging.getLogger("meta_mask")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def run_main() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run_main()
