"""What a downstream task is: `Example`, `TaskSpec`, and the errors its data raises.

The vocabulary shared by the registry (data/tasks.py) and the local-file reader
(data/task_files.py), which both import this module and not each other's internals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meta_mask.errors import UserError

CATEGORIES = ("closed_book_qa", "knowledge", "summarization", "synthetic")
# Must match meta_mask.evaluation.metrics.METRICS (data/ does not import evaluation/).
METRIC_NAMES = ("em_f1", "accuracy", "kilt_em", "rouge")


class TaskDataError(UserError, ValueError):
    """A task's files or rows are unusable; the message names the file, line/row and the fix."""


class TaskFileNotFoundError(TaskDataError, FileNotFoundError):
    """No file holds the split (or `data_dir` is no folder); the message names what was sought."""


class RowError(Exception):
    """A raw row does not fit the schema (the loader adds its file and line: TaskDataError)."""


@dataclass(frozen=True)
class Example:
    """One downstream example.

    source: the encoder input (question, claim, "subject [SEP] relation", document).
    targets: every gold answer / alias / reference summary (first one is the training target).
    id: the dataset's id, or "<split>-<row>" when it has none.
    contexts: optional passages [{"text": str, "answer_spans": [(start, end), ...]}] with
        character-level half-open spans of the answer inside `text`.
    meta: anything else kept from the row (KILT provenance, world person_id/attribute).
    fact: the fact the example asks about, shared by paraphrased questions of one fact (the
        world's "<person_id>:<attribute>"); "" when the example is its own fact. Results are
        scored per fact (evaluation/stats.py), since paraphrases are not independent.
    """

    source: str
    targets: list[str]
    id: str
    contexts: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    fact: str = ""

    @property
    def fact_id(self) -> str:
        """The fact this example counts toward: `fact`, or its own id."""
        return self.fact or self.id


RowConverter = Callable[[Mapping[str, Any], str], Example]


@dataclass(frozen=True)
class TaskSpec:
    """How to get one task: where it lives, its raw columns, its mapping and its metric.

    schema: the required raw columns and their types, as on the hub (also used in errors).
    to_example: maps one raw row (and a fallback id) to an `Example`; raises RowError on a
        wrong type.
    splits: the split names the dataset has.
    dev_split: the split that tunes on the task (a learned policy's dev loss); None when the
        dataset has only train and test.
    hub_id, hub_config, revision, hub_data_dir: the Hugging Face dataset (hub tasks).
    world_variant: the synthetic world's task variant (data/world.py) that makes the rows
        from a built world (world tasks). Exactly one of hub_id and world_variant is set.
    local_names: (split, file name) pairs of the dataset's own file names, e.g. KILT's
        ("validation", "fever-dev-kilt.jsonl").
    """

    name: str
    category: str
    metric: str
    schema: tuple[tuple[str, str], ...]
    to_example: RowConverter
    splits: tuple[str, ...] = ("train", "validation", "test")
    dev_split: str | None = "validation"
    hub_id: str | None = None
    hub_config: str | None = None
    revision: str | None = None
    hub_data_dir: str | None = None
    world_variant: str | None = None
    local_names: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TaskSpec.name must be non-empty")
        if self.category not in CATEGORIES:
            raise ValueError(
                f"task {self.name!r}: category={self.category!r}; valid: {', '.join(CATEGORIES)}"
            )
        if self.metric not in METRIC_NAMES:
            raise ValueError(
                f"task {self.name!r}: metric={self.metric!r}; valid: {', '.join(METRIC_NAMES)}"
            )
        if (self.hub_id is None) == (self.world_variant is None):
            raise ValueError(f"task {self.name!r}: give exactly one of hub_id and world_variant")
        if self.dev_split is not None and self.dev_split not in self.splits:
            raise ValueError(
                f"task {self.name!r}: dev_split={self.dev_split!r} is not one of its splits "
                f"{self.splits}"
            )

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.schema)

    def schema_text(self) -> str:
        return ", ".join(f"{name}: {kind}" for name, kind in self.schema)
