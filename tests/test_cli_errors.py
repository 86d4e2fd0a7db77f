"""The command line reports a user's mistake (unknown task, bad data file, offline hub) as one
line `error: <message>` with exit status 1 and no traceback; a bug keeps its traceback."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from tests.processes import run_module

# The tiny world of world_quick.flags as one run (no sweep) that starts with fine-tuning, so a
# task's data is read seconds after start.
QUICK = [
    "--flagfile=experiments/world_quick.flags",
    "--sweep.policies=",
    "--policy.name=none",
    "--stages=finetune,evaluate",
]


def _cli(args: list[str], tmp_path: pathlib.Path, base: list[str] = QUICK) -> tuple[int, str]:
    proc = run_module(
        "meta_mask.train", *base, f"--workdir={tmp_path / 'run'}", *args,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        stderr=subprocess.STDOUT, timeout=600,
    )  # fmt: skip
    return proc.returncode, proc.stdout


def _assert_user_error(code: int, out: str, *expected: str) -> None:
    assert code == 1, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    for text in expected:
        assert text in errors[0], out


def _write_lines(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"question": "who wrote moby dick", "answer": ["Herman Melville"]})


def test_unknown_task(tmp_path):
    code, out = _cli(["--data.task=natural_questions"], tmp_path)
    _assert_user_error(code, out, "Unknown task 'natural_questions'", "valid tasks:", "nq", "wq")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = _write_lines(tmp_path / "nq" / "train.jsonl", [GOOD, '{"question": "q", "answer": '])
    code, out = _cli(["--data.task=nq", f"--data.data_dir={path.parent}"], tmp_path)
    _assert_user_error(code, out, f"{path}:2: malformed JSON")


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "wq" / "train.jsonl"
    path.parent.mkdir()
    path.write_bytes(
        b'{"question": "q1", "answers": ["a"]}\n{"question": "caf\xe9 \xff", "answers": ["b"]}\n'
    )
    code, out = _cli(["--data.task=wq", f"--data.data_dir={path.parent}"], tmp_path)
    _assert_user_error(code, out, f"{path}:2: not UTF-8")


def test_empty_file(tmp_path):
    path = _write_lines(tmp_path / "nq" / "train.jsonl", [])
    code, out = _cli(["--data.task=nq", f"--data.data_dir={path.parent}"], tmp_path)
    _assert_user_error(code, out, str(path), "no rows for task 'nq' split 'train'")


def test_missing_column(tmp_path):
    row = json.dumps({"query": "who wrote moby dick", "answer": ["Herman Melville"]})
    path = _write_lines(tmp_path / "nq" / "train.jsonl", [row])
    code, out = _cli(["--data.task=nq", f"--data.data_dir={path.parent}"], tmp_path)
    _assert_user_error(code, out, str(path), "missing column(s) ['question']", "found ['query'")


def test_offline_hub_checkpoint(tmp_path):
    # The README's real-task command on a machine without the hub: one line of advice, and
    # nothing written into the workdir (a corrected command must not meet a stored config).
    code, out = _cli(["--flagfile=experiments/nq.flags"], tmp_path, base=[])
    assert not (tmp_path / "run" / "config.json").exists()
    _assert_user_error(
        code,
        out,
        "--init='facebook/bart-base'",
        "Hugging Face hub",
        "hf download facebook/bart-base --local-dir DIR",
        "--init=DIR",
    )


@pytest.fixture
def main_with(monkeypatch, tmp_path):
    """train.main on parsed flags, with sweep.run replaced by `run`."""
    from absl import flags

    from meta_mask import sweep, train

    def call(run):
        monkeypatch.setattr(sweep, "run", run)
        flags.FLAGS(["prog", f"--workdir={tmp_path}", "--distributed=off"])
        try:
            train.main(["prog"])
        finally:
            flags.FLAGS.unparse_flags()

    return call


def test_main_prints_a_user_error_and_exits_1(main_with, capsys):
    from meta_mask.errors import UserError

    def run(*args, **kwargs):
        raise UserError("the file x.jsonl:3 is broken")

    with pytest.raises(SystemExit) as exit_:
        main_with(run)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "error: the file x.jsonl:3 is broken\n"


def test_main_lets_a_bug_raise_with_its_traceback(main_with):
    def run(*args, **kwargs):
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        main_with(run)
