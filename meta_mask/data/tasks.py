"""Downstream task registry: hub ids, raw column schemas, the mapping to `Example`, the metric.

Every task reads rows in the schema of its Hugging Face dataset and maps them to one common
`Example(source, targets, id, contexts, meta)`. The same mapping serves both origins:

- hub: `datasets.load_dataset(hub_id, hub_config, split=..., revision=..., data_dir=...)`;
- local files (`data_dir=`): `<split>.jsonl|json|parquet|csv`, the hub's own shard names
  (`<split>-00000-of-00001.parquet`), the parquet-export layout (`<split>/0000.parquet`), or the
  dataset's original file names (`NQ-open.dev.jsonl`, `fever-dev-kilt.jsonl`), read through
  `datasets.load_dataset("json" | "parquet" | "csv", data_files=...)` with the hub's columns
  (finding, validating and reading local files: data/task_files.py).

Hub ids and revisions (datasets 5 no longer runs loading scripts, so each must ship data files):

| task  | hub id                             | config               | revision             |
|-------|------------------------------------|----------------------|----------------------|
| nq    | google-research-datasets/nq_open   | nq_open              | main (parquet)       |
| tqa   | mandarjoshi/trivia_qa              | unfiltered.nocontext | main (parquet, 2024) |
| wq    | stanfordnlp/web_questions          | -                    | main (parquet)       |
| fever | facebook/kilt_tasks                | fever                | main (parquet)       |
| zsre  | facebook/kilt_tasks                | structured_zeroshot  | main (parquet)       |
| trex  | facebook/kilt_tasks                | trex                 | main (parquet)       |
| xsum  | EdinburghNLP/xsum                  | - (data_dir default) | refs/convert/parquet |
| cnndm | abisee/cnn_dailymail               | 3.0.0                | main (parquet)       |
| samsum| Samsung/samsum                     | - (data_dir samsum)  | refs/convert/parquet |

XSum's and SAMSum's main branches still hold a loading script (xsum.py + a tarball; samsum.py +
corpus.7z), which datasets 5 refuses; the hub's automatic parquet export (branch
`refs/convert/parquet`, files `<config>/<split>/0000.parquet`) carries the same columns.

The ninth task is SAMSum (dialogue summarization; columns id, dialogue, summary): its parquet
export exists, it is small (14.7k train / 818 validation / 819 test), so a full fine-tune plus
evaluation fits one GPU in minutes, and its inputs are short enough for BART without truncation.
It adds a second kind of summarization (dialogue, abstractive, multi-speaker) next to news.
Its licence is CC BY-NC-ND 4.0 (research use).

Split conventions: NQ-open has no public test set, so "validation" is the test set of closed-book
QA papers (Lee et al. 2019; Roberts et al. 2020); likewise TriviaQA unfiltered "validation" and
KILT "validation". TriviaQA's and KILT's "test" splits carry no answers: loading them raises an
error that says so.

Bad input never passes silently and nothing is lost without a report: a missing file names the
paths looked for; a malformed JSON line names file and line; a row whose columns have the wrong
type names file, line/row and the expected schema; rows without a usable answer (no answers,
only empty strings, TriviaQA's "<unk>") or with an empty source are skipped, counted and logged
(their ids are in `TaskData.skipped`), and if every row is bad the load raises. Over-long inputs
are kept, truncated at tokenization time to --data.source_length / --data.target_length tokens.

The world tasks (world_qa, world_qa_dates, world_qa_personal, world_summary) are registry
entries like the others: their rows are made by data/world.py from a `World` that the caller
builds once per run from its WorldConfig and passes as `load_task(..., world=world)` (or read
from local files in meta_mask's own schema: source, targets, [contexts, id, fact]).
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from meta_mask.data import world as world_lib
from meta_mask.data.task_files import DATA_DIR_FLAG, read_local
from meta_mask.data.task_spec import Example, RowConverter, RowError, TaskDataError, TaskSpec
from meta_mask.errors import UserError

log = logging.getLogger(__name__)


class TaskOfflineError(UserError, ConnectionError):
    """The hub is unreachable; the message says how to load the same task from local files."""


class UnknownNameError(UserError, KeyError):
    """An unknown task or split; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------------
# Row converters: raw hub rows -> Example. Wrong types raise RowError; missing answers give an
# Example with no targets, which the loader skips and counts.


def _string(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"column {column!r} must be a string, got {type(value).__name__}")
    return value


def _string_list(value: Any, column: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise RowError(f"column {column!r} must be a list of strings, got {type(value).__name__}")
    for item in value:
        if item is not None and not isinstance(item, str):
            raise RowError(
                f"column {column!r} must be a list of strings, has a {type(item).__name__}"
            )
    return [item for item in value if item is not None]


def _clean_targets(values: Sequence[str]) -> list[str]:
    """Strip, drop empty strings and exact duplicates, keep order (first = training target)."""
    seen: dict[str, None] = {}
    for value in values:
        value = value.strip()
        if value:
            seen.setdefault(value, None)
    return list(seen)


def _row_id(row: Mapping[str, Any], column: str, fallback: str) -> str:
    value = row.get(column)
    return str(value) if value not in (None, "") else fallback


def nq_example(row: Mapping[str, Any], fallback_id: str) -> Example:
    """google-research-datasets/nq_open: question, answer (list of strings)."""
    return Example(
        source=_string(row, "question"),
        targets=_clean_targets(_string_list(row.get("answer"), "answer")),
        id=fallback_id,
    )


def tqa_example(row: Mapping[str, Any], fallback_id: str) -> Example:
    """mandarjoshi/trivia_qa: question, question_id, answer {value, aliases, ...}.

    Targets are the answer's value then its aliases (normalized_aliases are lower-cased copies
    that SQuAD normalization makes redundant). The test split's placeholder "<unk>" is no answer.
    """
    answer = row.get("answer")
    if answer is None:
        answer = {}
    if not isinstance(answer, Mapping):
        raise RowError(
            "column 'answer' must be a dict {value, aliases, normalized_aliases, ...}, "
            f"got {type(answer).__name__}"
        )
    value = answer.get("value")
    if value is not None and not isinstance(value, str):
        raise RowError(f"answer.value must be a string, got {type(value).__name__}")
    golds = [value or ""] + _string_list(answer.get("aliases"), "answer.aliases")
    return Example(
        source=_string(row, "question"),
        targets=[t for t in _clean_targets(golds) if t != "<unk>"],
        id=_row_id(row, "question_id", fallback_id),
    )


def wq_example(row: Mapping[str, Any], fallback_id: str) -> Example:
    """stanfordnlp/web_questions: url, question, answers (list of strings)."""
    return Example(
        source=_string(row, "question"),
        targets=_clean_targets(_string_list(row.get("answers"), "answers")),
        id=fallback_id,
        meta={"url": row["url"]} if row.get("url") else {},
    )


def _provenance(output: Mapping[str, Any]) -> list[dict[str, Any]]:
    provenance = output.get("provenance") or []
    if not isinstance(provenance, Sequence) or isinstance(provenance, str):
        raise RowError("output[].provenance must be a list of dicts")
    return [dict(p) for p in provenance if isinstance(p, Mapping)]


def kilt_example(row: Mapping[str, Any], fallback_id: str) -> Example:
    """facebook/kilt_tasks: id, input, meta, output [{answer, meta, provenance [...]}].

    Targets are every non-empty `answer` of `output` (entries may carry only provenance); the
    provenance (wikipedia_id, title, paragraph and character offsets) goes to meta["provenance"]
    since the passage text lives in KILT's separate Wikipedia knowledge source.
    """
    outputs = row.get("output")
    if outputs is None:
        outputs = []
    if isinstance(outputs, str) or not isinstance(outputs, Sequence):
        raise RowError(
            f"column 'output' must be a list of {{answer, provenance}} dicts, "
            f"got {type(outputs).__name__}"
        )
    answers: list[str] = []
    provenance: list[dict[str, Any]] = []
    for output in outputs:
        if not isinstance(output, Mapping):
            raise RowError(f"output entries must be dicts, got {type(output).__name__}")
        answer = output.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise RowError(f"output[].answer must be a string, got {type(answer).__name__}")
        answers.append(answer or "")
        provenance.extend(_provenance(output))
    return Example(
        source=_string(row, "input"),
        targets=_clean_targets(answers),
        id=_row_id(row, "id", fallback_id),
        meta={"provenance": provenance} if provenance else {},
    )


def _summarization(source: str, target: str) -> RowConverter:
    def convert(row: Mapping[str, Any], fallback_id: str) -> Example:
        return Example(
            source=_string(row, source),
            targets=_clean_targets([_string(row, target)]),
            id=_row_id(row, "id", fallback_id),
        )

    convert.__doc__ = f"Summarization rows: {source} -> {target}, id."
    return convert


def _contexts(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise RowError("column 'contexts' must be a list of {text, answer_spans} dicts")
    contexts = []
    for ctx in value:
        if not isinstance(ctx, Mapping) or not isinstance(ctx.get("text"), str):
            raise RowError("each context must be a dict with a string 'text'")
        text = ctx["text"]
        spans = []
        for span in ctx.get("answer_spans") or []:
            if len(span) != 2 or not all(isinstance(x, numbers.Integral) for x in span):
                raise RowError(f"answer span {span!r} must be a pair of ints (start, end)")
            start, end = int(span[0]), int(span[1])
            if not 0 <= start <= end <= len(text):
                raise RowError(
                    f"answer span {span!r} lies outside its context text of {len(text)} chars"
                )
            spans.append((start, end))
        context: dict[str, Any] = {"text": text, "answer_spans": spans}
        if ctx.get("entities"):
            context["entities"] = [_entity(e, text) for e in ctx["entities"]]
        contexts.append(context)
    return contexts


def _entity(entity: Any, text: str) -> tuple:
    """A context's gold entity: (start, end, label[, type]) in characters of its text."""
    if not 3 <= len(entity) <= 4 or not all(isinstance(x, numbers.Integral) for x in entity[:2]):
        raise RowError(f"entity {entity!r} must be (start, end, label[, type])")
    start, end = int(entity[0]), int(entity[1])
    if not 0 <= start < end <= len(text):
        raise RowError(f"entity {entity!r} lies outside its context text of {len(text)} chars")
    return (start, end, *entity[2:])


_EXAMPLE_KEYS = ("source", "targets", "contexts", "id", "fact")


def example_from_dict(row: Mapping[str, Any], fallback_id: str) -> Example:
    """meta_mask's own schema (synthetic world, custom tasks): source, targets, [contexts, id,
    fact].

    Every other key (e.g. the world's person_id, attribute) is kept in `meta`.
    """
    return Example(
        source=_string(row, "source"),
        targets=_clean_targets(_string_list(row.get("targets"), "targets")),
        id=_row_id(row, "id", fallback_id),
        contexts=_contexts(row.get("contexts")),
        meta={k: v for k, v in row.items() if k not in _EXAMPLE_KEYS},
        fact=_string(row, "fact"),
    )


# ---------------------------------------------------------------------------------------------
# The registry.

_QA_SPLITS = ("train", "validation")
_KILT_SCHEMA = (("id", "str"), ("input", "str"), ("output", "list[{answer: str, provenance}]"))


def _kilt(name: str, config: str, metric: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        category="knowledge",
        metric=metric,
        schema=_KILT_SCHEMA,
        to_example=kilt_example,
        hub_id="facebook/kilt_tasks",
        hub_config=config,
        local_names=(
            ("train", f"{config}-train-kilt.jsonl"),
            ("validation", f"{config}-dev-kilt.jsonl"),
            ("test", f"{config}-test_without_answers-kilt.jsonl"),
        ),
    )


def _world(variant: str, metric: str, splits=world_lib.SPLITS, dev: str | None = "dev") -> TaskSpec:
    return TaskSpec(
        name=variant,
        category="synthetic",
        metric=metric,
        schema=(("source", "str"), ("targets", "list[str]")),
        to_example=example_from_dict,
        splits=splits,
        dev_split=dev,
        world_variant=variant,
    )


def builtin_tasks() -> dict[str, TaskSpec]:
    """The nine real-data tasks and the synthetic world's tasks, freshly built."""
    specs = [
        TaskSpec(
            name="nq",
            category="closed_book_qa",
            metric="em_f1",
            schema=(("question", "str"), ("answer", "list[str]")),
            to_example=nq_example,
            splits=_QA_SPLITS,
            hub_id="google-research-datasets/nq_open",
            hub_config="nq_open",
            local_names=(("train", "NQ-open.train.jsonl"), ("validation", "NQ-open.dev.jsonl")),
        ),
        TaskSpec(
            name="tqa",
            category="closed_book_qa",
            metric="em_f1",
            schema=(
                ("question", "str"),
                ("answer", "{value: str, aliases: list[str], normalized_aliases: list[str], ...}"),
            ),
            to_example=tqa_example,
            hub_id="mandarjoshi/trivia_qa",
            hub_config="unfiltered.nocontext",
        ),
        TaskSpec(
            name="wq",
            category="closed_book_qa",
            metric="em_f1",
            schema=(("question", "str"), ("answers", "list[str]")),
            to_example=wq_example,
            splits=("train", "test"),
            dev_split=None,
            hub_id="stanfordnlp/web_questions",
        ),
        _kilt("fever", "fever", "accuracy"),
        _kilt("zsre", "structured_zeroshot", "kilt_em"),
        _kilt("trex", "trex", "kilt_em"),
        TaskSpec(
            name="xsum",
            category="summarization",
            metric="rouge",
            schema=(("document", "str"), ("summary", "str")),
            to_example=_summarization("document", "summary"),
            hub_id="EdinburghNLP/xsum",
            revision="refs/convert/parquet",
            hub_data_dir="default",
        ),
        TaskSpec(
            name="cnndm",
            category="summarization",
            metric="rouge",
            schema=(("article", "str"), ("highlights", "str")),
            to_example=_summarization("article", "highlights"),
            hub_id="abisee/cnn_dailymail",
            hub_config="3.0.0",
        ),
        TaskSpec(
            name="samsum",
            category="summarization",
            metric="rouge",
            schema=(("dialogue", "str"), ("summary", "str")),
            to_example=_summarization("dialogue", "summary"),
            hub_id="Samsung/samsum",
            revision="refs/convert/parquet",
            hub_data_dir="samsum",
        ),
        *(_world(variant, "em_f1") for variant in world_lib.QA_VARIANTS),
        _world(world_lib.SUMMARY_TASK, "rouge"),
        _world(world_lib.GENERIC_QA_TASK, "em_f1", splits=("train",), dev=None),
    ]
    return {spec.name: spec for spec in specs}


# The one registry, read-only.
TASKS: Mapping[str, TaskSpec] = MappingProxyType(builtin_tasks())


def get_task(name: str) -> TaskSpec:
    """The registered task `name`; an unknown name lists the valid ones."""
    if name not in TASKS:
        raise UnknownNameError(f"Unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def dev_split(name: str) -> str:
    """The split of task `name` that tunes on it (e.g. a learned policy's dev loss)."""
    spec = get_task(name)
    if spec.dev_split is None:
        raise UnknownNameError(
            f"task {name!r} has no dev split (its splits: {', '.join(spec.splits)})"
        )
    return spec.dev_split


# ---------------------------------------------------------------------------------------------
# The hub.


def _is_network_error(error: BaseException) -> bool:
    names = {"OfflineModeIsEnabled", "ConnectError", "ConnectTimeout", "TimeoutException"}
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConnectionError) or type(error).__name__ in names:
            return True
        error = error.__cause__ or error.__context__
    return False


def offline_help(spec: TaskSpec, split: str) -> str:
    """How to run `spec` from local files instead of the hub."""
    own = [f for s, f in spec.local_names if s == split]
    names = (
        f"{split}.jsonl (or {split}.json / {split}.parquet / {split}-*.parquet / {split}/*.parquet"
    )
    names += f" / {', '.join(own)})" if own else ")"
    where = spec.hub_id + (f" config {spec.hub_config}" if spec.hub_config else "")
    if spec.revision:
        where += f" revision {spec.revision}"
    return (
        f"To use local files, pass {DATA_DIR_FLAG}=DIR (load_task(..., data_dir=DIR)) where DIR "
        f"holds {names} with the columns of {where}: {spec.schema_text()}. On a machine with "
        f"network access, datasets.load_dataset({spec.hub_id!r}, {spec.hub_config!r}, "
        f"revision={spec.revision!r}, data_dir={spec.hub_data_dir!r}, split={split!r})"
        f".to_json('DIR/{split}.jsonl') writes such a file."
    )


def _read_hub(spec: TaskSpec, split: str):
    import datasets

    try:
        ds = datasets.load_dataset(
            spec.hub_id,
            spec.hub_config,
            split=split,
            revision=spec.revision,
            data_dir=spec.hub_data_dir,
        )
    except Exception as e:
        if _is_network_error(e):
            offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
            reason = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else e
            raise TaskOfflineError(
                f"Cannot load task {spec.name!r} split {split!r} from the Hugging Face hub "
                f"({spec.hub_id}): {reason}. {offline_help(spec, split)}"
            ) from None
        raise
    return ds, (lambda r: f"{spec.hub_id} {split} row {r}"), spec.hub_id


# ---------------------------------------------------------------------------------------------
# Loading.


@dataclass(frozen=True)
class TaskData:
    """Loaded examples, the ids of skipped rows by reason, and where the rows came from."""

    examples: list[Example]
    skipped: dict[str, list[str]]
    origin: str


def _world_rows(spec: TaskSpec, split: str, world: world_lib.World | None):
    if world is None:
        raise ValueError(
            f"task {spec.name!r} is made from the synthetic world: pass world= (the run's "
            "world.build_world(WorldConfig)), or data_dir= holding its files"
        )
    rows = world_lib.world_task(world, spec.world_variant)[split]
    origin = f"{spec.name} (world of seed {world.config.seed})"
    return rows, (lambda r: f"{spec.name} {split} row {r}"), origin


def read_task(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
    world: world_lib.World | None = None,
) -> TaskData:
    """Read `split` of task `name`: local files when `data_dir` is given, else the hub, or for
    a world task (`TaskSpec.world_variant`) the rows that `world` makes."""
    spec = get_task(name)
    if split not in spec.splits:
        raise UnknownNameError(
            f"task {name!r} has no split {split!r}; valid: {', '.join(spec.splits)}"
        )
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples}; must be >= 1 or None")
    if data_dir is not None:
        rows, where, origin = read_local(spec, split, data_dir)
    elif spec.world_variant is not None:
        rows, where, origin = _world_rows(spec, split, world)
    else:
        rows, where, origin = _read_hub(spec, split)

    examples: list[Example] = []
    skipped: dict[str, list[str]] = {"no answer": [], "empty source": []}
    num_rows = 0
    for r, row in enumerate(rows):
        num_rows += 1
        try:
            example = spec.to_example(row, f"{split}-{r}")
        except RowError as e:
            raise TaskDataError(
                f"{where(r)}: {e} (task {name!r} expects {spec.schema_text()})"
            ) from None
        if not example.targets:
            skipped["no answer"].append(example.id)
        elif not example.source.strip():
            skipped["empty source"].append(example.id)
        else:
            examples.append(example)
            if max_examples is not None and len(examples) >= max_examples:
                break
    skipped = {reason: ids for reason, ids in skipped.items() if ids}
    if num_rows == 0:
        raise TaskDataError(f"{origin}: no rows for task {name!r} split {split!r}")
    if not examples:
        counts = ", ".join(f"{len(ids)} with {reason}" for reason, ids in skipped.items())
        raise TaskDataError(
            f"{origin}: none of the {num_rows} rows of task {name!r} split {split!r} is usable "
            f"({counts}; first: {where(0)}). Test splits of TriviaQA and KILT have no public "
            "answers: evaluate on 'validation'."
        )
    for reason, ids in skipped.items():
        log.warning(
            "task %s split %s: skipped %d of %d rows with %s (first ids: %s)",
            name, split, len(ids), num_rows, reason, ids[:5],
        )  # fmt: skip
    return TaskData(examples=examples, skipped=skipped, origin=origin)


def load_task(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
    world: world_lib.World | None = None,
) -> list[Example]:
    """The usable examples of `split` of task `name`, at most `max_examples` of them.

    Hub and local tasks and world tasks alike; a world task needs the run's `world` unless
    `data_dir` holds its files. Skipped rows are logged (see read_task).
    """
    return read_task(
        name, split, data_dir=data_dir, max_examples=max_examples, world=world
    ).examples
