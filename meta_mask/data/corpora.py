"""Pre-training corpora: reading, sentence records, filtering, tokenize-once caching.

This module owns the unlabeled text side of intermediate pre-training:

1. *Readers* yield documents ``{"text", "doc_id"[, "entities"]}`` from
   - English Wikipedia on the Hugging Face hub (``wikimedia/wikipedia``), streamed, or the same
     parquet schema (id, url, title, text) from local files (``data_files=...``);
   - a downstream task's own documents (summarization source articles, QA evidence / provenance
     passages) via ``meta_mask.data.tasks.load_task``;
   - local ``.txt`` (one document per line, or blank-line separated paragraphs) and ``.jsonl``
     files (a configurable text field, optional character entity spans carried through);
   - in-memory sentence records (the synthetic world), which are not split again.
2. *Sentences*: documents are cut into sentence records with the rule-based splitter of
   data/sentences.py (``sentence_spans``; why rules and not spaCy is explained there), entity
   spans shifted onto them, and kept by a length filter (``SentenceFilter``).
3. *Caching*: ``build_corpus`` tokenizes each sentence once with ``datasets`` and caches the
   result on disk under a fingerprint of (tokenizer content, source identity, every filtering
   setting, max length). An unchanged setting reloads the Arrow file without reading the source or
   tokenizing; a changed one rebuilds. Sentences are cached separately (fingerprint without the
   tokenizer), so switching tokenizers does not re-stream Wikipedia. Data computed from a
   corpus (its PMI n-grams, data/pmi.py) is cached beside it (``Corpus.derived_path``).

The seeded, resumable, multi-host batch order over a built corpus (``CorpusStream``) lives in
data/stream.py.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
import pathlib
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meta_mask.data.sentences import sentence_spans
from meta_mask.errors import UserError

logger = logging.getLogger(__name__)

WIKIPEDIA_DATASET = "wikimedia/wikipedia"
WIKIPEDIA_CONFIG = "20231101.en"
SOURCE_KINDS = ("wikipedia", "file", "task", "records")
TXT_UNITS = ("line", "paragraph")
TASK_FIELDS = ("auto", "contexts", "source")


class CorpusError(UserError, ValueError):
    """A corpus file, spec or source is unusable; the message names the file and line or the fix."""


class CorpusFileNotFoundError(CorpusError, FileNotFoundError):
    """A corpus file (or data_files pattern) does not exist."""


class CorpusOfflineError(UserError, ConnectionError):
    """Wikipedia cannot be streamed from the hub; the message says how to use local files."""


# Bump when the cached columns or the tokenization/truncation rules change, so old caches are
# never mistaken for new ones.
CACHE_FORMAT_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Sentence filtering and sentence records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentenceFilter:
    """Keep sentences whose length lies within [min, max] in both characters and words.

    Words are whitespace-separated tokens. The defaults drop headings, list fragments and
    run-on tables while keeping ordinary encyclopedic sentences.
    """

    min_chars: int = 20
    max_chars: int = 1000
    min_words: int = 5
    max_words: int = 128

    def __post_init__(self) -> None:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars={self.min_chars} > max_chars={self.max_chars}")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words={self.min_words} > max_words={self.max_words}")

    def reject_reason(self, text: str) -> str | None:
        """None when `text` passes, else which bound it violates."""
        if len(text) < self.min_chars:
            return "too_few_chars"
        if len(text) > self.max_chars:
            return "too_many_chars"
        n = len(text.split())
        if n < self.min_words:
            return "too_few_words"
        if n > self.max_words:
            return "too_many_words"
        return None


def document_sentences(doc: dict, counts: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Split one document into sentence records {"text", "doc_id", "entities"}.

    Entity char spans (tuples (start, end, label, ...)) are shifted to sentence offsets; an
    entity that crosses a sentence boundary is dropped (counted as "entities_crossing").
    """
    text = doc["text"]
    entities = sorted(doc.get("entities") or (), key=lambda e: (e[0], e[1]))
    records = []
    placed = 0
    for a, b in sentence_spans(text):
        inside = [(e[0] - a, e[1] - a, *e[2:]) for e in entities if a <= e[0] and e[1] <= b]
        placed += len(inside)
        records.append({"text": text[a:b], "doc_id": str(doc["doc_id"]), "entities": inside})
    if counts is not None:
        counts["entities_crossing"] = counts.get("entities_crossing", 0) + len(entities) - placed
    return records


def iter_sentences(
    documents: Iterable[dict],
    sentence_filter: SentenceFilter,
    *,
    max_sentences: int | None = None,
    presplit: bool = False,
    counts: dict[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Sentence records of `documents` that pass the filter, at most `max_sentences` of them.

    With `presplit`, each input record is already one sentence (the synthetic world) and is
    only filtered. `counts` (if given) accumulates documents, sentences seen, kept, and the
    number rejected for each reason.
    """
    counts = counts if counts is not None else {}
    kept = 0
    if max_sentences is not None and max_sentences <= 0:
        return
    for doc in documents:
        counts["documents"] = counts.get("documents", 0) + 1
        if presplit:
            sentences = [
                {
                    "text": doc["text"],
                    "doc_id": str(doc.get("doc_id", "")),
                    "entities": list(doc.get("entities") or ()),
                }
            ]
        else:
            sentences = document_sentences(doc, counts)
        for record in sentences:
            counts["sentences_seen"] = counts.get("sentences_seen", 0) + 1
            reason = sentence_filter.reject_reason(record["text"])
            if reason is not None:
                counts[reason] = counts.get(reason, 0) + 1
                continue
            kept += 1
            counts["sentences_kept"] = kept
            yield record
            if max_sentences is not None and kept >= max_sentences:
                return


# ---------------------------------------------------------------------------------------------
# Document readers
# ---------------------------------------------------------------------------------------------


def wikipedia_documents(
    config: str = WIKIPEDIA_CONFIG,
    *,
    data_files: str | Sequence[str] | None = None,
    split: str = "train",
    dataset: str = WIKIPEDIA_DATASET,
    revision: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream Wikipedia articles as documents {"text", "doc_id", "title"}.

    Without `data_files` the articles stream from the hub (`dataset`, `config`); with it, the
    same code streams local parquet files in the hub's schema (columns id, url, title, text).
    Nothing is downloaded in full: `datasets` streams record batches.
    """
    import datasets  # heavy; imported only when a corpus is actually read

    try:
        if data_files is not None:
            stream = datasets.load_dataset(
                "parquet", data_files=data_files, split=split, streaming=True
            )
        else:
            stream = datasets.load_dataset(
                dataset, config, split=split, streaming=True, revision=revision
            )
        for row in stream:
            if not isinstance(row.get("text"), str) or row.get("id") is None:
                raise CorpusError(
                    f"Wikipedia rows from {data_files or dataset} need columns id, url, title, "
                    f"text (text a string); got columns {sorted(row)}"
                )
            yield {"text": row["text"], "doc_id": str(row["id"]), "title": row.get("title", "")}
    except (ConnectionError, OSError) as err:
        if data_files is not None:
            raise
        raise CorpusOfflineError(
            f"Could not stream {dataset} (config {config!r}) from the Hugging Face hub: {err}. "
            "Without network access, download the parquet shards elsewhere (columns id, url, "
            "title, text) and pass them as local files: corpus source 'wikipedia' with "
            "data_files='/path/to/*.parquet' (CorpusSource(kind='wikipedia', "
            "data_files=...)), or use a local .txt/.jsonl corpus (kind='file', path=...)."
        ) from None


def _parse_jsonl_entities(value: Any, where: str, field_name: str) -> list[tuple]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise CorpusError(f"{where}: field {field_name!r} must be a list of [start, end, label]")
    out = []
    for ent in value:
        if (
            not isinstance(ent, (list, tuple))
            or len(ent) < 3
            or not all(isinstance(x, int) for x in ent[:2])
        ):
            raise CorpusError(
                f"{where}: each entry of {field_name!r} must be [start, end, label, ...] with "
                f"integer character offsets; got {ent!r}"
            )
        out.append(tuple(ent))
    return out


def file_documents(
    path: str | os.PathLike,
    *,
    text_field: str = "text",
    entities_field: str = "entities",
    txt_unit: str = "line",
) -> Iterator[dict[str, Any]]:
    """Documents from a local .txt or .jsonl file.

    - ``.jsonl``: one JSON object per line; the document text is `text_field`; optional
      `entities_field` is a list of [char_start, char_end, label, ...] (character offsets into
      the text) carried through to the sentences. Blank lines are skipped. A malformed line
      raises ValueError naming the file and the line number.
    - ``.txt`` with ``txt_unit="line"`` (default): every non-empty line is one document.
      With ``txt_unit="paragraph"``: blank-line separated blocks are documents and single
      newlines inside a block are joined by spaces (hard-wrapped prose).
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise CorpusError(f"{path}: unsupported corpus file type {suffix!r}; valid: .txt, .jsonl")
    if not path.is_file():
        raise CorpusFileNotFoundError(f"corpus file {path} does not exist")
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(f"{where}: malformed JSON ({err.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise CorpusError(
                        f"{where}: expected an object with a string field {text_field!r} "
                        "(set text_field to the field that holds the text)"
                    )
                yield {
                    "text": obj[text_field],
                    "doc_id": str(obj.get("id", f"{path.name}:{lineno}")),
                    "entities": _parse_jsonl_entities(
                        obj.get(entities_field), where, entities_field
                    ),
                }
    else:
        if txt_unit not in TXT_UNITS:
            raise ValueError(f"txt_unit={txt_unit!r}; valid: {TXT_UNITS}")
        with path.open(encoding="utf-8") as f:
            if txt_unit == "line":
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        yield {"text": line.strip(), "doc_id": f"{path.name}:{lineno}"}
            else:
                block: list[str] = []
                first = 0
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        first = first or lineno
                        block.append(line.strip())
                    elif block:
                        yield {"text": " ".join(block), "doc_id": f"{path.name}:{first}"}
                        block, first = [], 0
                if block:
                    yield {"text": " ".join(block), "doc_id": f"{path.name}:{first}"}


def task_documents(
    task: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    field: str = "auto",
) -> Iterator[dict[str, Any]]:
    """In-domain documents from a downstream task's own data (`tasks.load_task`).

    `field` picks the text: "contexts" (TriviaQA evidence, KILT provenance passages, world
    contexts: Example.contexts[*]["text"]), "source" (summarization articles: Example.source),
    or "auto": contexts where the task's examples carry any, else the sources of a
    summarization task; for a QA task without contexts (whose sources are only questions) it
    raises. Identical texts are yielded once (many questions share one evidence passage).
    """
    from meta_mask.data import tasks  # the task registry, imported on use

    if field not in TASK_FIELDS:
        raise ValueError(f"field={field!r}; valid: {TASK_FIELDS}")
    if data_dir is None and tasks.get_task(task).world_variant is not None:
        raise CorpusError(
            f"task {task!r} is made from the synthetic world, which a task corpus does not "
            "build: use the world's own sentences as the corpus (corpus 'world'), or give "
            "data_dir= holding the task's files"
        )
    examples = tasks.load_task(task, split, data_dir=data_dir)
    if field == "auto":
        if any(ex.contexts for ex in examples):
            field = "contexts"
        elif tasks.get_task(task).category == "summarization":
            field = "source"
        else:
            raise CorpusError(
                f"task {task!r} split {split!r} has no contexts (evidence / provenance "
                "passages) and is not a summarization task, so it has no in-domain documents; "
                "set the task field to 'source' to use its inputs (questions) anyway"
            )
    seen: set[str] = set()
    for ex in examples:
        texts = [c["text"] for c in ex.contexts] if field == "contexts" else [ex.source]
        for i, text in enumerate(texts):
            if not text or text in seen:
                continue
            seen.add(text)
            yield {"text": text, "doc_id": f"{ex.id}:{i}" if field == "contexts" else str(ex.id)}


# ---------------------------------------------------------------------------------------------
# Sources and their identity
# ---------------------------------------------------------------------------------------------


def _file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Identity of a local file for cache keys: absolute path, size, modification time."""
    p = pathlib.Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _jsonable(obj: Any) -> Any:
    """A JSON-serializable form of numpy values and other sequences in in-memory records."""
    return obj.tolist() if hasattr(obj, "tolist") else list(obj)


@dataclass(frozen=True)
class CorpusSource:
    """Where corpus text comes from. `kind` is one of SOURCE_KINDS:

    - "wikipedia": `config` (e.g. "20231101.en") from the hub `dataset`, or local parquet
      `data_files` in the same schema;
    - "file": a local .txt/.jsonl `path` (`text_field`, `entities_field`, `txt_unit`);
    - "task": the documents of task `task` / `split` (`data_dir`, `task_field`);
    - "records": in-memory sentence records (`records`, e.g. the synthetic world), named by
      `name`; they are filtered but not split again.
    """

    kind: str
    config: str = WIKIPEDIA_CONFIG
    dataset: str = WIKIPEDIA_DATASET
    data_files: tuple[str, ...] = ()
    path: str = ""
    text_field: str = "text"
    entities_field: str = "entities"
    txt_unit: str = "line"
    task: str = ""
    split: str = "train"
    data_dir: str = ""
    task_field: str = "auto"
    name: str = ""
    records: Sequence[dict] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"corpus source kind={self.kind!r}; valid: {SOURCE_KINDS}")
        if self.kind == "file" and not self.path:
            raise ValueError("corpus source kind='file' needs path=<.txt or .jsonl file>")
        if self.kind == "task" and not self.task:
            raise ValueError("corpus source kind='task' needs task=<task name>")
        if self.kind == "records" and self.records is None:
            raise ValueError("corpus source kind='records' needs records=[{'text', ...}, ...]")
        if self.txt_unit not in TXT_UNITS:
            raise ValueError(f"txt_unit={self.txt_unit!r}; valid: {TXT_UNITS}")
        if self.task_field not in TASK_FIELDS:
            raise ValueError(f"task_field={self.task_field!r}; valid: {TASK_FIELDS}")

    @classmethod
    def from_spec(cls, spec: str, **kw: Any) -> CorpusSource:
        """Parse a CLI corpus spec (`DataConfig.corpus`). Valid forms:

        - "wikipedia" or "wikipedia:CONFIG": streamed from the hub;
        - a path (or glob) ending in ".parquet": local files in Wikipedia's schema;
        - "file:PATH" or a path ending in ".txt" / ".jsonl";
        - "task:NAME[:SPLIT]", or "task" with task=NAME in `kw` (the run's own task).

        Other CorpusSource fields (text_field, data_dir, ...) come from `kw`. The synthetic
        world is not a spec: pass its sentences as CorpusSource(kind="records", ...).
        """
        kind, _, rest = spec.partition(":")
        if kind == "wikipedia":
            return cls(kind=kind, config=rest or WIKIPEDIA_CONFIG, **kw)
        if spec.endswith(".parquet"):
            return cls(kind="wikipedia", data_files=(spec,), **kw)
        if kind == "file":
            return cls(kind=kind, path=rest, **kw)
        if spec.endswith((".txt", ".jsonl")):
            return cls(kind="file", path=spec, **kw)
        if kind == "task":
            name, _, split = rest.partition(":")
            fields = {"task": name, "split": split or "train"} if name else {}
            return cls(kind=kind, **(kw | fields))
        raise CorpusError(
            f"corpus spec {spec!r}; valid forms: 'wikipedia[:CONFIG]', '<files>.parquet', "
            "'file:PATH', '<path>.txt', '<path>.jsonl', 'task[:NAME[:SPLIT]]' (in-memory "
            "records, e.g. the synthetic world, are passed as CorpusSource(kind='records'))"
        )

    @property
    def label(self) -> str:
        """A short readable name for cache folders and logs."""
        raw = {
            "wikipedia": f"wikipedia-{self.config}" if not self.data_files else "wikipedia-local",
            "file": pathlib.Path(self.path).stem,
            "task": f"task-{self.task}-{self.split}",
            "records": f"records-{self.name or 'anon'}",
        }[self.kind]
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)[:48]

    def identity(self) -> dict[str, Any]:
        """Everything that determines the documents this source yields (for cache keys)."""
        if self.kind == "wikipedia":
            if self.data_files:
                files = []
                for pattern in self.data_files:
                    matches = sorted(glob.glob(os.path.expanduser(pattern)))
                    if not matches:
                        raise CorpusFileNotFoundError(
                            f"corpus data_files pattern {pattern!r} matches no file"
                        )
                    files += [_file_identity(f) for f in matches]
                return {"kind": "wikipedia", "files": files}
            return {"kind": "wikipedia", "dataset": self.dataset, "config": self.config}
        if self.kind == "file":
            if not pathlib.Path(self.path).is_file():
                raise CorpusFileNotFoundError(f"corpus file {self.path} does not exist")
            return {
                "kind": "file",
                "file": _file_identity(self.path),
                "text_field": self.text_field,
                "entities_field": self.entities_field,
                "txt_unit": self.txt_unit,
            }
        if self.kind == "task":
            files = []
            if self.data_dir:
                root = pathlib.Path(self.data_dir)
                files = [_file_identity(p) for p in sorted(root.rglob("*")) if p.is_file()]
            return {
                "kind": "task",
                "task": self.task,
                "split": self.split,
                "field": self.task_field,
                "data_dir_files": files,
            }
        # In-memory records: their content is their identity.
        from datasets.fingerprint import Hasher

        blob = json.dumps(list(self.records), sort_keys=True, default=_jsonable).encode()
        return {"kind": "records", "name": self.name, "content": Hasher.hash_bytes(blob)}

    def documents(self) -> Iterator[dict[str, Any]]:
        """The documents (or, for "records", the sentence records) of this source."""
        if self.kind == "wikipedia":
            return wikipedia_documents(
                self.config,
                data_files=list(self.data_files) or None,
                dataset=self.dataset,
                split=self.split,
            )
        if self.kind == "file":
            return file_documents(
                self.path,
                text_field=self.text_field,
                entities_field=self.entities_field,
                txt_unit=self.txt_unit,
            )
        if self.kind == "task":
            return task_documents(
                self.task, self.split, data_dir=self.data_dir or None, field=self.task_field
            )
        return iter(self.records)


def source_for(
    corpus: str, *, task: str = "", data_dir: str = "", world: Any = None, population: str = "task"
):
    """The source `DataConfig.corpus` names: "world" (the rows of the run's synthetic world:
    its task people's, or with population="generic" its generic population's), "task" (the
    run's own task's documents) or a spec (`CorpusSource.from_spec`)."""
    if corpus == "world":
        if world is None:
            raise ValueError("data.corpus='world' needs the run's world")
        name = f"world-{world.config.seed}"
        if population != "task" or world.config.corpus_unit != "sentence":
            name += f"-{population}-{world.config.corpus_unit}"
        records = world.corpus_records(population)
        return CorpusSource(kind="records", records=records, name=name)
    if population != "task":
        raise ValueError(f"population={population!r} needs data.corpus='world'")
    if corpus == "task":
        return CorpusSource(kind="task", task=task, data_dir=data_dir)
    return CorpusSource.from_spec(corpus)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that determines how `tokenizer` maps text to ids.

    The fast tokenizer's serialized JSON holds the vocabulary, merges, normalizer,
    pre-tokenizer and post-processor (which adds <s> ... </s>), so two tokenizers with equal
    fingerprints tokenize identically wherever they were loaded from.
    """
    from datasets.fingerprint import Hasher

    backend = tokenizer.backend_tokenizer.to_str()
    return Hasher.hash_bytes([type(tokenizer).__name__.encode(), backend.encode()])


def _hash_json(obj: Any) -> str:
    from datasets.fingerprint import Hasher

    return Hasher.hash_bytes(json.dumps(obj, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------
# Tokenize once, cache on disk
# ---------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """A tokenized corpus: an Arrow-backed `datasets.Dataset` plus how it was built.

    Columns: text, doc_id, input_ids, word_ids, entity_spans ([E,2] token spans),
    entity_labels, entity_types (the 4th element of a char entity, e.g. the world's attribute
    type; "" when absent), length (tokens after truncation), truncated (bool).
    """

    dataset: Any
    fingerprint: str
    stats: dict[str, Any]
    files: list[pathlib.Path]  # the cached Arrow file(s); one per process with num_proc > 1
    from_cache: bool

    def __len__(self) -> int:
        return len(self.dataset)

    def derived_path(self, name: str) -> pathlib.Path:
        """Where to cache data computed from this corpus (e.g. its PMI n-grams): next to the
        corpus's Arrow file(s), named by its fingerprint, so that a changed corpus (another
        fingerprint) never reads data derived from another one."""
        return self.files[0].parent / f"{self.fingerprint}.{name}"


def _sentence_features() -> Any:
    import datasets

    return datasets.Features(
        {
            "text": datasets.Value("string"),
            "doc_id": datasets.Value("string"),
            "entity_char_spans": datasets.List(datasets.List(datasets.Value("int32"))),
            "entity_char_labels": datasets.List(datasets.Value("string")),
            "entity_char_types": datasets.List(datasets.Value("string")),
        }
    )


def _token_features() -> Any:
    import datasets

    return datasets.Features(
        {
            "text": datasets.Value("string"),
            "doc_id": datasets.Value("string"),
            "input_ids": datasets.List(datasets.Value("int32")),
            "word_ids": datasets.List(datasets.Value("int32")),
            "entity_spans": datasets.List(datasets.List(datasets.Value("int32"))),
            "entity_labels": datasets.List(datasets.Value("string")),
            "entity_types": datasets.List(datasets.Value("string")),
            "length": datasets.Value("int32"),
            "truncated": datasets.Value("bool"),
        }
    )


def _sentence_rows(
    source: CorpusSource,
    sentence_filter: SentenceFilter,
    max_sentences: int | None,
    counts_path: str,
) -> Iterator[dict[str, Any]]:
    """Generator for `Dataset.from_generator`: sentence records as flat Arrow rows.

    Counts are written to `counts_path` when the generator finishes, because the generator may
    run inside `datasets`' builder where return values are lost.
    """
    counts: dict[str, int] = {}
    sentences = iter_sentences(
        source.documents(),
        sentence_filter,
        max_sentences=max_sentences,
        presplit=source.kind == "records",
        counts=counts,
    )
    for rec in sentences:
        ents = rec["entities"]
        yield {
            "text": rec["text"],
            "doc_id": rec["doc_id"],
            "entity_char_spans": [[int(e[0]), int(e[1])] for e in ents],
            "entity_char_labels": [str(e[2]) for e in ents],
            "entity_char_types": [str(e[3]) if len(e) > 3 else "" for e in ents],
        }
    from meta_mask.workdir import write_text_atomic  # (imports jax: only when building)

    write_text_atomic(pathlib.Path(counts_path), json.dumps(counts))


def truncate_record(record: dict[str, Any], max_length: int, eos_id: int) -> tuple[dict, bool]:
    """Cut a tokenized record to `max_length` tokens, keeping the final </s>.

    Entity spans that no longer fit whole are dropped (a half entity is not an entity).
    Returns the record and whether it was truncated.
    """
    ids = np.asarray(record["input_ids"], np.int32)
    if len(ids) <= max_length:
        return record, False
    keep = max_length - 1
    spans = np.asarray(record["entity_spans"], np.int32).reshape(-1, 2)
    ok = spans[:, 1] <= keep
    out = dict(record)
    out["input_ids"] = np.concatenate([ids[:keep], [eos_id]]).astype(np.int32)
    out["word_ids"] = np.concatenate(
        [np.asarray(record["word_ids"], np.int32)[:keep], [-1]]
    ).astype(np.int32)
    out["entity_spans"] = spans[ok]
    out["entity_labels"] = [lab for lab, k in zip(record["entity_labels"], ok, strict=True) if k]
    if "entity_types" in record:
        out["entity_types"] = [t for t, k in zip(record["entity_types"], ok, strict=True) if k]
    return out, True


def _tokenize_batch(
    batch: dict[str, list],
    *,
    tokenizer: Any,
    max_length: int,
    tokenize_fn: Callable[[list[dict], Any], list[dict]],
    ner_labels: Sequence[str] | None = None,
) -> dict[str, list]:
    """`Dataset.map` function: sentence rows -> tokenized, truncated rows.

    With `ner_labels`, sentences that carry no entity spans of their own (real text, unlike
    the synthetic world's gold spans) are annotated with spaCy NER + dates first."""
    records = []
    for text, doc_id, spans, labels, types in zip(
        batch["text"],
        batch["doc_id"],
        batch["entity_char_spans"],
        batch["entity_char_labels"],
        batch["entity_char_types"],
        strict=True,
    ):
        ents = [(s[0], s[1], lab, typ) for s, lab, typ in zip(spans, labels, types, strict=True)]
        records.append({"text": text, "doc_id": doc_id, "entities": ents})
    if ner_labels is not None:
        _annotate_missing(records, ner_labels)
    tokenized = tokenize_fn(records, tokenizer)
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 2
    out: dict[str, list] = {k: [] for k in _token_features()}
    for rec, tok in zip(records, tokenized, strict=True):
        tok = dict(tok)
        # tokenize_sentences carries the 4th element of a char entity as "entity_attributes".
        attributes = tok.get("entity_attributes") or [None] * len(tok["entity_labels"])
        tok["entity_types"] = ["" if t is None else str(t) for t in attributes]
        tok, was_truncated = truncate_record(tok, max_length, eos_id)
        out["text"].append(rec["text"])
        out["doc_id"].append(rec["doc_id"])
        out["input_ids"].append(np.asarray(tok["input_ids"], np.int32))
        out["word_ids"].append(np.asarray(tok["word_ids"], np.int32))
        out["entity_spans"].append(np.asarray(tok["entity_spans"], np.int32).reshape(-1, 2))
        out["entity_labels"].append(list(tok["entity_labels"]))
        out["entity_types"].append(list(tok["entity_types"]))
        out["length"].append(len(tok["input_ids"]))
        out["truncated"].append(was_truncated)
    return out


@functools.lru_cache(maxsize=1)
def _spacy_nlp():
    from meta_mask.data import ner

    return ner.load_spacy()


def _annotate_missing(records: list[dict], labels: Sequence[str]) -> None:
    """Add NER "entities" (char spans, label, type "ner") to records that have none."""
    from meta_mask.data import ner

    todo = [r for r in records if not r["entities"]]
    if not todo:
        return
    result = ner.annotate_texts([r["text"] for r in todo], nlp=_spacy_nlp(), labels=labels)
    for record, spans in zip(todo, result.spans, strict=True):
        record["entities"] = [(s, e, label, "ner") for s, e, label in spans]


def _default_tokenize_fn() -> Callable[[list[dict], Any], list[dict]]:
    from meta_mask.data.tokenize import tokenize_sentences  # another helper's module

    return tokenize_sentences


def _cache_keys(
    source: CorpusSource,
    tokenizer: Any,
    sentence_filter: SentenceFilter,
    max_sentences: int | None,
    max_length: int,
    ner_labels: Sequence[str] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """build_corpus's cache keys: the sentences' (source, filter, max_sentences), and the
    tokens' (the sentences' fingerprint under "sentences", the tokenizer, max_length and any
    NER labels)."""
    sentence_key = {
        "version": CACHE_FORMAT_VERSION,
        "source": source.identity(),
        "filter": dataclasses.asdict(sentence_filter),
        "max_sentences": max_sentences,
    }
    token_key = {
        "sentences": _hash_json(sentence_key),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
    }
    if ner_labels is not None:
        token_key["ner_labels"] = sorted(ner_labels)
    return sentence_key, token_key


def _cached_corpus(
    cache_dir: pathlib.Path, stats_path: pathlib.Path, fp: str, label: str
) -> Corpus | None:
    """The corpus a complete earlier build left in `cache_dir`, or None if there is none."""
    import datasets

    # The stats file is written last, so its presence marks a complete build.
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    if stats is None or not all((cache_dir / f).exists() for f in stats["files"]):
        return None
    t0 = time.perf_counter()
    parts = [datasets.Dataset.from_file(str(cache_dir / f)) for f in stats["files"]]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    ds._fingerprint = fp  # `from_file` does not know the map's fingerprint
    logger.info(
        "corpus %s: loaded %d sentences (%d tokens, %d truncated) from cache %s in %.2fs",
        label,
        stats["sentences"],
        stats["tokens"],
        stats["truncated"],
        cache_dir / stats["files"][0],
        time.perf_counter() - t0,
    )
    return Corpus(ds, fp, stats, [cache_dir / f for f in stats["files"]], from_cache=True)


def _sentence_dataset(
    source: CorpusSource,
    sentence_filter: SentenceFilter,
    max_sentences: int | None,
    cache_dir: pathlib.Path,
    sentence_fp: str,
    counts_path: pathlib.Path,
) -> Any:
    """The filtered sentence records of `source` as a `datasets.Dataset`; the reader's counts
    go to `counts_path`."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    # `from_generator` caches the sentences under their own fingerprint (no tokenizer in it),
    # so a new tokenizer or max_length re-tokenizes without reading the source again.
    try:
        return datasets.Dataset.from_generator(
            _sentence_rows,
            features=_sentence_features(),
            cache_dir=str(cache_dir / "sentences"),
            gen_kwargs={
                "source": source,
                "sentence_filter": sentence_filter,
                "max_sentences": max_sentences,
                "counts_path": str(counts_path),
            },
            fingerprint=sentence_fp,
        )
    except DatasetGenerationError as err:
        # `datasets` wraps whatever the reader raised; the reader's own error (bad JSONL line,
        # no network, ...) is the one that tells the user what to fix.
        cause = err.__cause__
        if isinstance(cause, (ValueError, OSError, KeyError)):
            raise cause.with_traceback(cause.__traceback__) from None
        raise


def _build_stats(
    tokenized: Any,
    max_length: int,
    t_read: float,
    build_s: float,
    counts_path: pathlib.Path,
    key: dict[str, Any],
) -> dict[str, Any]:
    """The statistics a build stores beside its Arrow file(s) (which they also list)."""
    lengths = np.asarray(tokenized.data.column("length").to_numpy(), np.int64)
    truncated = int(np.asarray(tokenized.data.column("truncated").to_numpy()).sum())
    return {
        "sentences": len(tokenized),
        "tokens": int(lengths.sum()),
        "truncated": truncated,
        "max_length": max_length,
        "read_seconds": round(t_read, 3),
        "build_seconds": round(build_s, 3),
        "sentences_per_second": round(len(tokenized) / max(build_s, 1e-9), 1),
        "counts": json.loads(counts_path.read_text()) if counts_path.exists() else {},
        "key": key,
        # With num_proc > 1, `map` writes one Arrow file per process.
        "files": [pathlib.Path(f["filename"]).name for f in tokenized.cache_files],
    }


def _log_build(
    label: str,
    stats: dict[str, Any],
    max_length: int,
    t_read: float,
    build_s: float,
    cache_dir: pathlib.Path,
) -> None:
    """Log what a build made and how fast."""
    logger.info(
        "corpus %s: built %d sentences, %d tokens (%d truncated to %d) in %.1fs "
        "(%.0f sentences/s; reading+splitting %.1fs); cache %s",
        label,
        stats["sentences"],
        stats["tokens"],
        stats["truncated"],
        max_length,
        build_s,
        stats["sentences_per_second"],
        t_read,
        cache_dir / stats["files"][0],
    )


def build_corpus(
    source: CorpusSource,
    tokenizer: Any,
    cache_dir: str | os.PathLike,
    *,
    sentence_filter: SentenceFilter = SentenceFilter(),
    max_sentences: int | None = None,
    max_length: int = 128,
    num_proc: int | None = None,
    tokenize_fn: Callable[[list[dict], Any], list[dict]] | None = None,
    ner_labels: Sequence[str] | None = None,
) -> Corpus:
    """Read, split, filter and tokenize `source` once; later calls reload from `cache_dir`.

    The cache key is a fingerprint of (CACHE_FORMAT_VERSION, source identity, sentence filter,
    max_sentences, max_length, tokenizer content). The tokenized Arrow file is written by
    `Dataset.map(new_fingerprint=...)`; a JSON file with the build statistics is written last
    and marks the build complete. `tokenize_fn` defaults to
    `meta_mask.data.tokenize.tokenize_sentences`. With `ner_labels` (salient span masking on
    real text), sentences without entity spans get spaCy's entities with those labels plus
    dates, cached with the corpus (the labels are part of the fingerprint).
    """
    if max_length < 3:
        raise ValueError(f"max_length={max_length}: must leave room for <s>, a token and </s>")
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    sentence_key, token_key = _cache_keys(
        source, tokenizer, sentence_filter, max_sentences, max_length, ner_labels
    )
    sentence_fp, fp = token_key["sentences"], _hash_json(token_key)
    arrow_path = cache_dir / f"{source.label}-{fp}.arrow"
    stats_path = cache_dir / f"{source.label}-{fp}.json"
    cached = _cached_corpus(cache_dir, stats_path, fp, source.label)
    if cached is not None:
        return cached

    t0 = time.perf_counter()
    tokenize_fn = tokenize_fn or _default_tokenize_fn()
    counts_path = cache_dir / f"{source.label}-{sentence_fp}.counts.json"
    sentences = _sentence_dataset(
        source, sentence_filter, max_sentences, cache_dir, sentence_fp, counts_path
    )
    t_read = time.perf_counter() - t0
    tokenized = sentences.map(
        _tokenize_batch,
        batched=True,
        batch_size=1000,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "tokenize_fn": tokenize_fn,
            "ner_labels": None if ner_labels is None else tuple(ner_labels),
        },
        remove_columns=sentences.column_names,
        features=_token_features(),
        cache_file_name=str(arrow_path),
        load_from_cache_file=True,
        new_fingerprint=fp,
        num_proc=num_proc,
        desc=f"tokenizing {source.label}",
    )
    build_s = time.perf_counter() - t0
    key = token_key | {"sentence_key": sentence_key}
    stats = _build_stats(tokenized, max_length, t_read, build_s, counts_path, key)
    from meta_mask.workdir import write_text_atomic  # (imports jax: only when building)

    # Atomic: runs sharing the cache (a sweep's workers) read it as the mark of a finished build.
    write_text_atomic(stats_path, json.dumps(stats, indent=1))
    _log_build(source.label, stats, max_length, t_read, build_s, cache_dir)
    files = [cache_dir / f for f in stats["files"]]
    return Corpus(tokenized, fp, stats, files, from_cache=False)
