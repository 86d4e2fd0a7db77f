"""The command line: the only module that reads flags.

    python -m meta_mask.train --flagfile=experiments/world.flags --workdir=runs/world

Every field of meta_mask.config.Config is a flag named by its path (`--model.d_model=64`,
`--policy.name=salient_spans`, `--intermediate.optim.learning_rate=3e-4`), with the field's
help, and fields with a fixed set of values are checked against it: a flagfile is a complete,
typed description of an experiment, and a misspelled flag or a bad value fails at parse time.
The fields of meta_mask.config.SweepConfig are the `--sweep.*` flags: they turn one command into
a grid of runs (policies x seeds x tasks) that runs one after another here, or print one command
per run for a cluster (`--sweep.print_commands`).
An error that is the user's to fix (a bad flag or flag value, meta_mask.errors.UserError: a bad
data file, an unknown task, an unreachable hub) prints as one line `error: <message>` and exits
with status 2; `--debug` (or the environment variable META_MASK_DEBUG=1) shows its traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import typing

from absl import app, flags

from meta_mask import config as config_lib
from meta_mask.errors import UserError

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Folder for this run's stages, checkpoints and results.")
flags.DEFINE_bool(
    "debug",
    False,
    "Show the Python traceback of a user error (bad flag, data file, task, hub id) too; "
    "META_MASK_DEBUG=1 does the same.",
)
flags.DEFINE_string(
    "cache_dir",
    None,
    "Folder for what runs share: tokenized corpora and the generic LM of each seed (default: "
    "<workdir>/cache). Point several sweeps (e.g. variants of one policy) at one to share them.",
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
flags.DEFINE_bool(
    "keep_host_buffers",
    True,
    "Keep freed host memory (up to 1 GiB) in the process's heap, so that XLA's per-step "
    "temporaries are not unmapped and page-faulted back every step (glibc only; "
    "meta_mask/training/host_heap.py has the measurements). Results are the same either way.",
)

_OPTIONAL_INT = int | None


def _define(prefix: str, cls, defaults=None) -> list[str]:
    """Define one flag per (nested) dataclass field, with the field's help, and a parse-time
    check of its value (type and choices); returns the flag names. Defaults come from
    `defaults` (an instance of `cls`; the class's own defaults when None), so a section whose
    parent sets other defaults (e.g. the generic stage's policy) shows those."""
    names = []
    hints = typing.get_type_hints(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        name, kind = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(kind):
            names += _define(name + ".", kind, getattr(defaults, f.name))
            continue
        if not f.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with config.option")
        help_, choices = f.metadata["help"], f.metadata.get("choices")
        default = getattr(defaults, f.name)
        if kind is bool:
            flags.DEFINE_bool(name, default, help_)
        elif kind is int:
            flags.DEFINE_integer(name, default, help_)
        elif kind is float:
            flags.DEFINE_float(name, default, help_)
        elif kind is str and choices:
            flags.DEFINE_enum(name, default, choices, help_)
        elif kind is str:
            flags.DEFINE_string(name, default, help_)
        elif typing.get_origin(kind) is tuple:
            flags.DEFINE_list(name, [str(v) for v in default], help_ + " (comma-separated)")
        elif kind == _OPTIONAL_INT:
            flags.DEFINE_string(name, str(default).lower(), help_ + " (an integer or none)")
        else:  # pragma: no cover - a new field type must get a flag type here
            raise TypeError(f"no flag type for {name} ({kind})")
        flags.register_validator(name, _checker(kind, choices))
        names.append(name)
    return names


def _checker(kind, choices: tuple | None):
    """A flag validator: the value converts to the field's type and lies in its choices."""

    def check(value) -> bool:
        try:
            typed = _typed(value, kind)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        items = typed if isinstance(typed, tuple) else (typed,)
        bad = [v for v in items if choices is not None and v not in choices]
        if bad:
            raise flags.ValidationError(
                f"{bad[0]!r} is not valid; valid: {', '.join(map(str, choices))}"
            )
        return True

    return check


def _typed(value, kind):
    """A flag value as the config field's type (lists become tuples; "none" an optional None)."""
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return tuple(_parse(item, v) for v in value)
    if kind == _OPTIONAL_INT:
        return None if value in ("none", "None", "") else _parse(int, value)
    return value


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _parse(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {_KIND_NAMES[kind]}") from None


_CONFIG_FLAGS = _define("", config_lib.Config)
_SWEEP_FLAGS = _define("sweep.", config_lib.SweepConfig)
_MODEL_ARCHITECTURE_FLAGS = [
    n
    for n in _CONFIG_FLAGS
    if n.startswith("model.") and n.removeprefix("model.") not in config_lib.MODEL_COMPUTE_FIELDS
]


def _init_excludes_architecture(init: str) -> bool:
    """--init takes the architecture from the checkpoint, so a --model.* flag set with it (on the
    command line or in a flagfile) would be silently ignored: refuse it."""
    given = [n for n in _MODEL_ARCHITECTURE_FLAGS if init and FLAGS[n].present]
    if given:
        raise flags.ValidationError(
            "the checkpoint's config.json gives the architecture, so "
            + ", ".join(f"--{n}" for n in given)
            + " would be ignored: drop them, or drop --init to train from scratch (only "
            + ", ".join(f"--model.{n}" for n in config_lib.MODEL_COMPUTE_FIELDS)
            + " apply with --init)"
        )
    return True


flags.register_validator("init", _init_excludes_architecture)


def _nested_values(cls, prefix: str) -> dict:
    """The parsed flags of dataclass `cls` as a nested dict of typed values."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out[f.name] = _nested_values(kind, f"{prefix}{f.name}.")
        else:
            out[f.name] = _typed(FLAGS[f"{prefix}{f.name}"].value, kind)
    return out


def _from_flags(cls, prefix: str):
    try:
        return config_lib.from_dict(cls, _nested_values(cls, prefix))
    except (ValueError, TypeError) as e:
        raise app.UsageError(f"bad flag value: {e}") from e


def config_from_flags() -> config_lib.Config:
    """The resolved Config of one run from the parsed flags (errors name the flag)."""
    return _from_flags(config_lib.Config, "")


def sweep_from_flags() -> config_lib.SweepConfig:
    """The grid of runs (the --sweep.* flags) from the parsed flags."""
    return _from_flags(config_lib.SweepConfig, "sweep.")


def main(argv: list[str]) -> None:
    try:
        code = _main(argv)
    except (UserError, app.UsageError) as e:
        # The message says what to fix; a traceback would only bury it. Anything else is a
        # bug and keeps its traceback.
        if FLAGS.debug or os.environ.get("META_MASK_DEBUG") == "1":
            raise
        _exit_user_error(str(e))
    sys.exit(code)


def _main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (the folder for this run's outputs)")
    cfg = config_from_flags()
    grid = sweep_from_flags()
    # Imported here so that `--help` and flag errors stay fast (sweep imports no jax).
    from meta_mask import sweep

    if grid.print_commands:
        for line in sweep.commands(cfg, grid, sys.argv, FLAGS.workdir, FLAGS.cache_dir):
            print(line)
        return 0
    if FLAGS.keep_host_buffers:  # process-wide, so before any computation
        from meta_mask.training import host_heap

        host_heap.keep_freed_buffers()
    _quiet_libraries()
    _join_cluster()
    return sweep.run(cfg, grid, FLAGS.workdir, argv=sys.argv, cache_dir=FLAGS.cache_dir)


def _exit_user_error(message: str) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parse, with a bad flag (unknown, misspelled, bad value) as one `error:` line."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        if "--debug" in argv or os.environ.get("META_MASK_DEBUG") == "1":
            raise
        _exit_user_error(f"{e} (--helpfull lists every flag)")


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
        absl_logger = logging.getLogger("absl")
        absl_logger.setLevel(logging.WARNING)
        # Orbax warns on every checkpoint saved between evaluations (those carry no metrics
        # to rank by: by design, see training/loop.py).
        absl_logger.addFilter(lambda r: "did not provide metrics" not in r.getMessage())
    ours = logging.getLogger("meta_mask")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def run_main() -> None:
    """Console-script entry point."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_main()
