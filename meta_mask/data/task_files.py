"""A downstream task's local files (`data_dir=`): finding, validating and reading them.

`read_local(spec, split, data_dir)` is the local-file origin of `tasks.read_task`: it finds the
files of `split` (`find_local_files`; the first group of names that matches anything wins:
`<split>.jsonl|json|parquet|csv`, the hub's shard names `<split>-*.<ext>`, the parquet-export
layout `<split>/*.parquet`, then the dataset's own file names from `TaskSpec.local_names`),
validates them before `datasets` reads them, and returns the rows with a location for each
(file and line for JSON lines, file and record / row index otherwise) so that a row that does not
fit the task's schema is reported where it is. A malformed JSON line, or one that is not UTF-8,
is named by file and line (`validate_jsonl`); when pyarrow rejects a JSON file as a whole, the
first record the task's own mapping rejects is named instead of pyarrow's message.

`TaskSpec`, `Example` and the errors come from data/task_spec.py; this module knows nothing of
the registry (data/tasks.py imports it, not the other way round).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator, Sequence

from meta_mask.data.task_spec import RowError, TaskDataError, TaskFileNotFoundError, TaskSpec

LOCAL_EXTENSIONS = ("jsonl", "json", "parquet", "csv")
# The CLI flag (DataConfig.data_dir) that passes `data_dir`; error messages name it.
DATA_DIR_FLAG = "--data.data_dir"
_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}


def _candidate_patterns(spec: TaskSpec, split: str) -> list[list[str]]:
    """Groups of glob patterns tried in order; the first group that matches anything wins."""
    own = [file for s, file in spec.local_names if s == split]
    return [
        [f"{split}.{ext}" for ext in LOCAL_EXTENSIONS],
        [f"{split}-*.{ext}" for ext in LOCAL_EXTENSIONS],
        [f"{split}/*.parquet"],
        own,
    ]


def find_local_files(spec: TaskSpec, split: str, data_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The files holding `split` under `data_dir`; errors name what was looked for and found."""
    root = pathlib.Path(data_dir)
    if not root.is_dir():
        raise TaskFileNotFoundError(
            f"{DATA_DIR_FLAG}={root} is not a directory (task {spec.name!r}, split {split!r})"
        )
    tried: list[str] = []
    for group in _candidate_patterns(spec, split):
        found = sorted({p for pattern in group for p in root.glob(pattern) if p.is_file()})
        tried.extend(group)
        if not found:
            continue
        extensions = sorted({_extension(p) for p in found})
        if len(extensions) > 1:
            raise TaskDataError(
                f"split {split!r} of task {spec.name!r} has files in several formats in {root}: "
                f"{[p.name for p in found]}; keep one format"
            )
        return found
    present = sorted(p.name for p in root.iterdir())
    raise TaskFileNotFoundError(
        f"No file for split {split!r} of task {spec.name!r} in {root}: looked for "
        f"{', '.join(tried)}. Present: {present or 'nothing'}. Expected columns "
        f"({spec.schema_text()})."
    )


def _extension(path: pathlib.Path) -> str:
    suffix = path.suffix.lstrip(".").lower()
    if suffix not in _BUILDERS:
        raise TaskDataError(f"{path}: unsupported extension; valid: {', '.join(LOCAL_EXTENSIONS)}")
    return suffix


def _not_utf8(path: str | os.PathLike, lineno: int, line: bytes, start: int) -> TaskDataError:
    """The error for the byte at `start` of `line` (1-based `lineno`) that is not UTF-8."""
    return TaskDataError(
        f"{path}:{lineno}: not UTF-8 (byte 0x{line[start]:02x} at byte {start + 1} of the line); "
        "save the file as UTF-8"
    )


def _jsonl_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a bad line raises with file and line.

    Lines end at "\\n" only, as in pyarrow's reader: a JSON string may hold a raw U+2028,
    which Python's universal newlines would treat as a line break. Each line is decoded on its
    own, so a byte that is not UTF-8 is reported on its own line (a text-mode file decodes
    ahead of the line it returns).
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, lineno, raw, e.start) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                    "each line must be one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise TaskDataError(
                    f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}"
                )
            yield lineno, record


def _read_text(path: pathlib.Path) -> str:
    """The file's text; a byte that is not UTF-8 raises with file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        first = data.rfind(b"\n", 0, e.start) + 1  # where the bad byte's line starts
        lineno = data.count(b"\n", 0, e.start) + 1
        raise _not_utf8(path, lineno, data[first:], e.start - first) from None


def validate_jsonl(path: str | os.PathLike) -> list[int]:
    """Line numbers (1-based) of the records of a JSON-lines file; blank lines are allowed.

    Parses every line with json.loads so a bad line is reported with file and line number
    (datasets' own JSON error does not give the line).
    """
    return [lineno for lineno, _ in _jsonl_records(path)]


def _validate_json(path: pathlib.Path) -> list[str] | None:
    """Row locations of a .json file: a JSON array of objects, or JSON lines."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [f"{path}:{n}" for n in validate_jsonl(path)]  # JSON lines named .json
    if isinstance(data, dict):
        # A single record is valid JSON lines too; anything else is a wrapped dataset.
        if "\n" not in text.strip():
            return [f"{path}:1"]
        raise TaskDataError(
            f"{path}: top-level JSON object; expected a JSON array of records or one JSON "
            "object per line"
        )
    if not isinstance(data, list):
        raise TaskDataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise TaskDataError(f"{path}: element {i} is a {type(record).__name__}, not an object")
    return [f"{path} record {i}" for i in range(len(data))]


def _row_locations(files: Sequence[pathlib.Path], ext: str) -> list[str] | None:
    """A human-readable location for each row, in the order datasets reads them."""
    if ext == "jsonl":
        return [f"{p}:{n}" for p in files for n in validate_jsonl(p)]
    if ext == "json":
        return [loc for p in files for loc in (_validate_json(p) or [])]
    if ext == "parquet":
        import pyarrow.parquet as pq

        return [f"{p} row {i}" for p in files for i in range(pq.ParquetFile(p).metadata.num_rows)]
    return None  # csv: rows can span lines; locations are given as row indices


def _raise_first_bad_record(spec: TaskSpec, files: Sequence[pathlib.Path], split: str) -> None:
    """When pyarrow rejects a JSON file (e.g. a column's type differs between rows), find the
    first record our own mapping rejects and name its line; return if every record maps."""
    for path in files:
        text = _read_text(path)
        try:
            data = json.loads(text)
            data = [data] if isinstance(data, dict) else data
            records = [(f"{path} record {i}", r) for i, r in enumerate(data)]
        except json.JSONDecodeError:
            records = [(f"{path}:{n}", r) for n, r in _jsonl_records(path)]
        for where, record in records:
            try:
                spec.to_example(record, f"{split}-0")
            except RowError as e:
                raise TaskDataError(
                    f"{where}: {e} (task {spec.name!r} expects {spec.schema_text()})"
                ) from None


def read_local(spec: TaskSpec, split: str, data_dir: str | os.PathLike):
    """(rows, row index -> location, origin) of `split` of `spec` under `data_dir`."""
    import datasets

    files = find_local_files(spec, split, data_dir)
    ext = _extension(files[0])
    if ext == "csv" and any(kind != "str" for _, kind in spec.schema):
        raise TaskDataError(
            f"{files[0]}: CSV cannot hold the list/dict columns of task {spec.name!r} "
            f"({spec.schema_text()}); write {split}.jsonl or {split}.parquet instead"
        )
    locations = _row_locations(files, ext)
    if locations == []:
        raise TaskDataError(
            f"{', '.join(map(str, files))}: no rows for task {spec.name!r} split {split!r}"
        )
    try:
        ds = datasets.load_dataset(
            _BUILDERS[ext], data_files=[str(p) for p in files], split="train"
        )
    except Exception as e:  # pyarrow/datasets errors: wrap with the files and expected schema
        if ext in ("jsonl", "json"):
            _raise_first_bad_record(spec, files, split)  # names the line when it can
        raise TaskDataError(
            f"could not read {[str(p) for p in files]} as {ext} for task {spec.name!r} "
            f"(expected columns {spec.schema_text()}): {type(e).__name__}: {e}"
        ) from None
    missing = [c for c in spec.columns if c not in ds.column_names]
    if missing:
        raise TaskDataError(
            f"{files[0]}: missing column(s) {missing} required by task {spec.name!r}; "
            f"expected {spec.schema_text()}; found {ds.column_names}"
        )
    where = lambda r: locations[r] if locations and r < len(locations) else f"{files[0]} row {r}"
    return ds, where, ", ".join(str(p) for p in files)
