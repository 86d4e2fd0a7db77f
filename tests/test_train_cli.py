"""The command line (meta_mask/train.py) and the commands a sweep prints (meta_mask/sweep.py):
flag help, parse-time checks, --init with --model.*, flagfiles resolving to the Config they
state, and sweep commands that reproduce the grid's cells folder for folder."""

from __future__ import annotations

import dataclasses
import pathlib
import shlex
import sys
import typing

import pytest
from absl import flags

from meta_mask import config as config_lib
from meta_mask import sweep, train
from tests.helpers import parse_config
from tests.processes import REPO, run_module

WORLD = REPO / "experiments" / "world.flags"
FLAGS = flags.FLAGS


def _parse(args: list[str]) -> tuple[config_lib.Config, config_lib.SweepConfig, str | None]:
    """(Config, SweepConfig, --workdir) that `meta_mask.train` builds from these arguments."""
    FLAGS.unparse_flags()
    FLAGS(["prog", *args])
    try:
        return train.config_from_flags(), train.sweep_from_flags(), FLAGS.workdir
    finally:
        FLAGS.unparse_flags()


def _parse_error(args: list[str]) -> str:
    FLAGS.unparse_flags()
    try:
        with pytest.raises(flags.Error) as err:
            FLAGS(["prog", *args])
    finally:
        FLAGS.unparse_flags()
    return str(err.value)


# ------------------------------------------------------------------------------------ help


def test_every_config_flag_has_a_real_help_line():
    names = train._CONFIG_FLAGS + train._SWEEP_FLAGS
    assert "model.d_model" in names and "sweep.reference" in names
    for name in names:
        help_ = FLAGS[name].help
        assert len(help_.split()) >= 3, (name, help_)
        # Not the old placeholder "<Class>.<field>".
        assert not help_.split()[0].endswith(f"Config.{name.rsplit('.', 1)[-1]}"), (name, help_)


def test_helpfull_shows_the_fields_help():
    out = run_module("meta_mask.train", "--helpfull", timeout=120).stdout
    assert "--data.corpus: Intermediate corpus" in out
    assert "DataConfig.corpus" not in out
    assert "--policy.name: <none|random_tokens|" in out  # an enum flag lists its choices


# ------------------------------------------------------------------------- parse-time checks


def _field(name: str) -> dataclasses.Field:
    """The config field behind flag `name`."""
    cls = config_lib.SweepConfig if name.startswith("sweep.") else config_lib.Config
    *path, leaf = name.removeprefix("sweep.").split(".")
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    return {f.name: f for f in dataclasses.fields(cls)}[leaf]


CHOICE_FLAGS = [
    name for name in train._CONFIG_FLAGS + train._SWEEP_FLAGS if "choices" in _field(name).metadata
]


def test_the_fields_with_fixed_values_are_checked():
    assert {"policy.name", "policy.output_format", "intermediate.optim.schedule", "meta.estimator",
            "supervised.objective", "model.activation_function", "model.dtype", "stages",
            "sweep.policies", "sweep.reference"} <= set(CHOICE_FLAGS)  # fmt: skip


@pytest.mark.parametrize("name", CHOICE_FLAGS)
def test_a_bad_choice_fails_at_parse_time_naming_the_valid_ones(name):
    valid = _field(name).metadata["choices"]
    error = _parse_error([f"--{name}={'bogus' if isinstance(valid[0], str) else 7}"])
    assert f"--{name}=" in error
    assert all(str(v) in error for v in valid), error


def test_enum_flags_take_their_values_from_the_config():
    assert FLAGS["policy.name"].parser.enum_values == list(config_lib.POLICIES)
    assert FLAGS["model.dtype"].parser.enum_values == list(config_lib.DTYPES)
    assert FLAGS["intermediate.optim.schedule"].parser.enum_values == list(config_lib.SCHEDULES)


def test_list_and_optional_int_flags_are_typed_at_parse_time():
    assert "'x' is not an integer" in _parse_error(["--sweep.seeds=0,x"])
    assert "'abc' is not an integer" in _parse_error(["--model.forced_bos_token_id=abc"])
    cfg, grid, _ = _parse(["--sweep.seeds=3,1", "--model.forced_eos_token_id=none",
                           "--world.split_fractions=0.6,0.2,0.2"])  # fmt: skip
    assert grid.seeds == (3, 1)
    assert cfg.model.forced_eos_token_id is None
    assert cfg.world.split_fractions == (0.6, 0.2, 0.2)


# -------------------------------------------------------------------------- --init, --model.*


def test_init_with_an_architecture_flag_is_a_parse_error_naming_both():
    error = _parse_error(["--init=facebook/bart-base", "--model.d_model=64"])
    assert "--init=facebook/bart-base" in error and "--model.d_model" in error
    # Set in a flagfile (world.flags sets the architecture) and --init on the command line.
    error = _parse_error([f"--flagfile={WORLD}", "--init=some/bart"])
    assert "--init=some/bart" in error and "--model.encoder_layers" in error


def test_init_honours_the_compute_fields():
    cfg, _, _ = _parse(["--init=facebook/bart-base", "--model.dtype=bfloat16", "--model.remat"])
    assert cfg.init == "facebook/bart-base"
    assert (cfg.model.dtype, cfg.model.remat) == ("bfloat16", True)
    assert set(config_lib.MODEL_COMPUTE_FIELDS) == {"dtype", "remat"}
    # An --init that a later flag clears leaves the flagfile's architecture in force.
    cfg, _, _ = _parse([f"--flagfile={WORLD}", "--init="])
    assert cfg.init == "" and cfg.model.d_model == 128


# -------------------------------------------------------------------------------- flagfiles


def _flagfile_values(path: pathlib.Path) -> dict[str, str]:
    """The `--name=value` lines of a flagfile and the flagfiles it includes (later lines win),
    read without absl."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.removeprefix("--").partition("=")
        if name == "flagfile":
            out.update(_flagfile_values(REPO / value))
        else:
            out[name] = value
    return out


def _expected_config(values: dict[str, str]) -> config_lib.Config:
    """The dataclass defaults with the flagfile's values set, typed from the defaults."""
    nested = config_lib.to_dict(config_lib.Config())
    for name, text in values.items():
        if name.startswith("sweep."):
            continue
        *path, leaf = name.split(".")
        node = nested
        for part in path:
            node = node[part]
        default = node[leaf]
        if isinstance(default, bool):
            node[leaf] = {"true": True, "false": False}[text.lower()]
        elif isinstance(default, tuple):
            node[leaf] = tuple(type(default[0])(v) for v in text.split(","))
        elif default is None:
            node[leaf] = None if text == "none" else int(text)
        else:
            node[leaf] = type(default)(text)
    return config_lib.from_dict(config_lib.Config, nested)


@pytest.mark.parametrize(
    "path", sorted((REPO / "experiments").glob("*.flags")), ids=lambda p: p.name
)
def test_a_flagfile_resolves_to_the_config_it_states(path, monkeypatch):
    monkeypatch.chdir(REPO)  # nested --flagfile paths are relative to the repository root
    values = _flagfile_values(path)
    cfg = parse_config([f"--flagfile={path}"])
    assert cfg == _expected_config(values)
    assert cfg != config_lib.Config()


# ---------------------------------------------------------------------------------- sweeps


def test_sweep_flags_do_not_change_a_runs_config():
    cfg, grid, _ = _parse([f"--flagfile={WORLD}"])
    assert grid.policies == (
        "none",
        "random_tokens",
        "salient_spans",
        "supervised",
        "meta",
        "oracle",
    )
    same, other_grid, _ = _parse(
        [f"--flagfile={WORLD}", "--sweep.policies=meta", "--sweep.seeds=4,5",
         "--sweep.tasks=world_qa_dates", "--sweep.transfer", "--sweep.reference=none",
         "--sweep.aggregate_only"]
    )  # fmt: skip
    assert same == cfg and other_grid != grid
    # A single run's cell is the config itself; a grid's cells differ only on their axes.
    assert sweep.cells(cfg, config_lib.SweepConfig()) == [("", cfg)]
    for _, cell in sweep.cells(cfg, other_grid):
        assert set(config_lib.to_dict(cell)) == set(config_lib.to_dict(cfg))
        assert dataclasses.replace(cell, seed=cfg.seed, data=cfg.data, policy=cfg.policy) == cfg


# name: (sweep flags after world.flags, number of cells, number of transfer cells)
GRIDS = {
    "no_axis": (["--sweep.policies="], 1, 0),
    "seeds": (["--sweep.policies=", "--sweep.seeds=1,2"], 2, 0),
    "tasks": (["--sweep.policies=", "--sweep.tasks=world_qa,world_qa_dates"], 2, 0),
    "policies_from_the_flagfile": ([], 6, 0),
    "policies_overridden": (["--sweep.policies=none,meta"], 2, 0),
    "all_axes": (["--sweep.policies=none,salient_spans", "--sweep.seeds=0,3",
                  "--sweep.tasks=world_qa,world_qa_personal"], 8, 0),
    # 3 x 2 (source, target) pairs x 2 seeds for the learned policy; none for salient_spans.
    "transfer": (["--sweep.policies=supervised,salient_spans", "--sweep.seeds=0,1",
                  "--sweep.tasks=world_qa,world_qa_dates,world_qa_personal", "--sweep.transfer"],
                 12, 12),
    "transfer_one_task": (["--sweep.policies=meta", "--sweep.transfer"], 1, 0),
}  # fmt: skip


@pytest.mark.parametrize(("extra", "n_cells", "n_transfer"), GRIDS.values(), ids=GRIDS.keys())
def test_sweep_commands_reproduce_the_cells(extra, n_cells, n_transfer):
    argv = ["prog", f"--flagfile={WORLD}", *extra, "--sweep.print_commands", "--sweep.reference",
            "none", "--workdir", "runs/w", "--finetune.steps=77"]  # fmt: skip
    cfg, grid, workdir = _parse(argv[1:])
    assert grid.print_commands and workdir == "runs/w"
    root = pathlib.Path(workdir)
    first, second = sweep.waves(cfg, grid, root)
    assert (len(first), len(second)) == (n_cells, n_transfer)
    lines = sweep.commands(cfg, grid, argv, workdir)
    generic = sweep.generic_cells(cfg, grid)  # world.flags trains a generic LM per seed
    assert len(generic) == (0 if grid.is_single() else len(grid.seeds or (cfg.seed,)))
    comments = [i for i, line in enumerate(lines) if line.startswith("#")]
    # Each wave that waits for the one before follows a comment line that says so.
    expected = []
    if generic:
        expected = [0, len(generic) + 1]
    if second:
        expected.append(len(generic) + len(first) + len(expected))
    assert comments == expected
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == len(generic) + len(first) + len(second)
    folders = []
    for line, (sub, cell) in zip(commands, generic + first + second, strict=True):
        args = shlex.split(line)
        assert args[:3] == [sys.executable, "-m", "meta_mask.train"]
        assert f"--cache_dir={root / 'cache'}" in args  # every run shares one cache
        run_cfg, run_grid, run_workdir = _parse(args[3:])
        assert run_cfg == cell, line
        assert run_grid == config_lib.SweepConfig(), line  # each command is one run
        folders.append(run_workdir)
        assert run_workdir == str(root / sub)
    folders = folders[len(generic) :]
    assert folders == [str(root / sub) for sub, _ in sweep.cells(cfg, grid, root)]
    assert len(set(folders)) == len(folders)
    first_folders = {str(root / sub) for sub, _ in first}
    for _, cell in second:
        assert str(pathlib.Path(cell.policy.checkpoint).parent) in first_folders


# ------------------------------------------------------------------------------ host memory


@pytest.mark.parametrize(("flag", "kept"), [([], True), (["--nokeep_host_buffers"], False)])
def test_a_run_keeps_freed_host_buffers_unless_told_not_to(flag, kept, monkeypatch, tmp_path):
    from meta_mask.training import host_heap

    calls = []
    monkeypatch.setattr(host_heap, "keep_freed_buffers", lambda: calls.append(1) or True)
    monkeypatch.setattr(sweep, "run", lambda *a, **k: 0)
    monkeypatch.setattr(train, "_join_cluster", lambda: None)
    monkeypatch.setattr(train, "_quiet_libraries", lambda: None)  # global loggers untouched
    FLAGS.unparse_flags()
    try:
        FLAGS(["prog", f"--flagfile={WORLD}", f"--workdir={tmp_path}", *flag])
        assert train._main(["prog"]) == 0
    finally:
        FLAGS.unparse_flags()
    assert calls == ([1] if kept else [])
