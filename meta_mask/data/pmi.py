"""Corpus PMI n-grams for PMI-Masking (Levine et al., ICLR 2021, "PMI-Masking").

Owns: counting word n-grams (n = 1..max_n) over a tokenized corpus, the paper's PMI measure for
n-grams, the table of the top-K collocations, finding them in a sentence (units the PMI policy
masks whole), and a corpus's `CorpusPmi`: its table plus the n-gram spans of every row, found
once and cached next to the tokenized corpus (keyed by the corpus fingerprint and the PMI
parameters), so that masking a batch only gathers precomputed spans.

A word is a run of tokens with the same `word_ids` value (so a word is its tuple of token ids; a
BPE word at a sentence start and the same word mid-sentence may differ, as they do to the model).

The measure (the paper's PMI_n): for an n-gram w = w_1..w_n,

    PMI_n(w) = min over segmentations s of w into >= 2 contiguous parts of
               log p(w) - sum_{part in s} log p(part),

with p(g) = count(g) / (number of n-gram occurrences of g's length in the corpus). The min over
all segmentations (not only the split into single words) keeps an n-gram out when one of its
parts already explains it (e.g. "the united states of" ~ "the united states" + "of").
"""

from __future__ import annotations

import itertools
import math
import os
import pathlib
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from meta_mask.data.corpora import Corpus

Word = tuple[int, ...]


@dataclass(frozen=True)
class PmiTable:
    """The top-K PMI n-grams. `vocab` maps a word (its token ids) to an int; `ngrams` maps a
    tuple of those ints (2..max_n words) to its PMI."""

    vocab: dict[Word, int]
    ngrams: dict[tuple[int, ...], float]
    max_n: int


def record_words(input_ids: Sequence[int], word_ids: Sequence[int]) -> list[tuple[Word, int, int]]:
    """The words of one sentence as (token ids, token start, token end), special tokens skipped."""
    # Plain lists: this runs once per sentence in the host pipeline, where numpy's per-call
    # overhead would dominate.
    ids = input_ids.tolist() if isinstance(input_ids, np.ndarray) else list(input_ids)
    wids = word_ids.tolist() if isinstance(word_ids, np.ndarray) else list(word_ids)
    words = []
    i, n = 0, len(wids)
    while i < n:
        w = wids[i]
        if w < 0:
            i += 1
            continue
        j = i + 1
        while j < n and wids[j] == w:
            j += 1
        words.append((tuple(ids[i:j]), i, j))
        i = j
    return words


def count_ngrams(
    records: Iterable[Mapping[str, Any]], max_n: int = 5
) -> tuple[dict[Word, int], list[Counter]]:
    """Word vocabulary and n-gram counts: counts[n] is a Counter over tuples of n word ints."""
    vocab: dict[Word, int] = {}
    counts = [Counter() for _ in range(max_n + 1)]
    for rec in records:
        words = [
            vocab.setdefault(w, len(vocab))
            for w, _, _ in record_words(rec["input_ids"], rec["word_ids"])
        ]
        for n in range(1, max_n + 1):
            counts[n].update(zip(*(words[i:] for i in range(n)), strict=False))
    return vocab, counts


def ngram_pmi(gram: tuple[int, ...], logp: Callable[[tuple[int, ...]], float]) -> float:
    """PMI_n of `gram` (>= 2 words) given log-probabilities of it and all its sub-n-grams."""
    n = len(gram)
    # best[i][j]: the max over segmentations of gram[i:j] (including the 1-part one) of the sum
    # of log p(part); PMI_n = log p(gram) - max over segmentations with >= 2 parts.
    best = [[0.0] * (n + 1) for _ in range(n + 1)]
    for width in range(1, n + 1):
        for i in range(n - width + 1):
            j = i + width
            value = logp(gram[i:j]) if width < n else -math.inf
            for k in range(i + 1, j):
                value = max(value, best[i][k] + best[k][j])
            best[i][j] = value
    return logp(gram) - best[0][n]


def pmi_scores(counts: Sequence[Counter], min_count: int = 10) -> dict[tuple[int, ...], float]:
    """PMI_n of every n-gram (n >= 2) seen at least `min_count` times."""
    totals = [sum(c.values()) for c in counts]
    log_totals = [math.log(t) if t else 0.0 for t in totals]
    logp: dict[tuple[int, ...], float] = {}

    def lp(g: tuple[int, ...]) -> float:
        if g not in logp:
            logp[g] = math.log(counts[len(g)][g]) - log_totals[len(g)]
        return logp[g]

    out = {}
    for n in range(2, len(counts)):
        for gram, c in counts[n].items():
            if c >= min_count:
                out[gram] = ngram_pmi(gram, lp)
    return out


def build_pmi_table(
    records: Iterable[Mapping[str, Any]], max_n: int = 5, min_count: int = 10, top_k: int = 100_000
) -> PmiTable:
    """Count n-grams over the corpus and keep the `top_k` highest-PMI ones (all lengths ranked
    together; ties broken by higher count, then by the n-gram for determinism)."""
    if max_n < 2:
        raise ValueError(f"max_n={max_n}: PMI n-grams need max_n >= 2 (the paper uses 5)")
    vocab, counts = count_ngrams(records, max_n)
    scores = pmi_scores(counts, min_count)
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], -counts[len(kv[0])][kv[0]], kv[0]))
    kept = ranked[:top_k]
    # Keep only the words the kept n-grams use, renumbered, so the table stays small.
    words = sorted(vocab, key=vocab.__getitem__)
    used = sorted({w for gram, _ in kept for w in gram})
    renumber = {old: new for new, old in enumerate(used)}
    return PmiTable(
        vocab={words[old]: new for old, new in renumber.items()},
        ngrams={tuple(renumber[w] for w in gram): pmi for gram, pmi in kept},
        max_n=max_n,
    )


def find_ngrams(input_ids: Sequence[int], word_ids: Sequence[int], table: PmiTable) -> np.ndarray:
    """Token-level half-open spans [P, 2] of the table's n-grams in one sentence, longest first
    (all n-grams of length max_n, left to right, then max_n - 1, ...), never overlapping."""
    words = record_words(input_ids, word_ids)
    ints = [table.vocab.get(w, -1) for w, _, _ in words]
    used = [False] * len(ints)
    spans = []
    for n in range(min(table.max_n, len(ints)), 1, -1):
        for i in range(len(ints) - n + 1):
            if tuple(ints[i : i + n]) in table.ngrams and not any(used[i : i + n]):
                used[i : i + n] = [True] * n
                spans.append((words[i][1], words[i + n - 1][2]))
    spans.sort()
    return np.asarray(spans, np.int32).reshape(-1, 2)


# Bump when the table, its spans or the cache file change meaning, so old caches are not read.
PMI_CACHE_VERSION = 1


@dataclass(frozen=True, eq=False)
class CorpusPmi:
    """A corpus's PMI table and, for every corpus row, the token spans of the table's n-grams
    in it (`find_ngrams`), found once so that masking a batch of rows only gathers them."""

    table: PmiTable
    spans: np.ndarray  # int32 [S, 2]: every row's spans, row after row
    offsets: np.ndarray  # int64 [N + 1]: row r's spans are spans[offsets[r] : offsets[r + 1]]
    word_tokens: np.ndarray  # int64 [N]: tokens inside words (word_ids >= 0) per row

    def __len__(self) -> int:
        return len(self.word_tokens)

    def batch_spans(self, rows: Sequence[int], word_ids: np.ndarray) -> np.ndarray:
        """The spans of corpus `rows` as int32 [B, P, 2], padded with -1. `word_ids` [B, L] is
        the batch's: each row's number of word tokens must match the corpus's, so a batch whose
        rows are not rows of this corpus fails here instead of masking the wrong tokens."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(
                f"batch rows (example_ids) {rows.min()}..{rows.max()} are not rows of the "
                f"{len(self)}-sentence corpus whose PMI spans these are; the batch's "
                "example_ids must be corpus rows (as policies.mlm_batches.policy_batch sets them)"
            )
        counted = (np.asarray(word_ids) >= 0).sum(axis=1)
        wrong = np.flatnonzero(counted != self.word_tokens[rows])
        if wrong.size:
            i = int(wrong[0])
            raise ValueError(
                f"batch row {i} (example_id {rows[i]}) has {counted[i]} word tokens but corpus "
                f"row {rows[i]} has {self.word_tokens[rows[i]]}: the batch's example_ids must be "
                "rows of the corpus the PMI spans were found in"
            )
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        width = max(int((ends - starts).max(initial=0)), 1)
        index = starts[:, None] + np.arange(width)
        present = index < ends[:, None]
        gathered = self.spans[np.where(present, index, 0)] if len(self.spans) else None
        out = np.full((len(rows), width, 2), -1, np.int32)
        if gathered is not None:
            out[present] = gathered[present]
        return out


def build_corpus_pmi(
    records: Sequence[Mapping[str, Any]], max_n: int = 5, min_count: int = 10, top_k: int = 100_000
) -> CorpusPmi:
    """The PMI table of `records` (`build_pmi_table`) and every record's n-gram spans in it."""
    table = build_pmi_table(records, max_n, min_count, top_k)
    found = [find_ngrams(r["input_ids"], r["word_ids"], table) for r in records]
    return CorpusPmi(
        table=table,
        spans=np.concatenate([np.zeros((0, 2), np.int32), *found]).astype(np.int32),
        offsets=np.cumsum([0, *(len(f) for f in found)], dtype=np.int64),
        word_tokens=np.asarray(
            [int((np.asarray(r["word_ids"]) >= 0).sum()) for r in records], np.int64
        ),
    )


class DatasetRows(Sequence):
    """The rows of a tokenized corpus's Arrow table as records {"input_ids", "word_ids"} (numpy
    views of two columns read once), in the dataset's row order (the rows CorpusStream serves)."""

    def __init__(self, dataset: Any) -> None:
        self._ids, self._offsets = _ragged(dataset.data.column("input_ids"))
        self._word_ids, word_offsets = _ragged(dataset.data.column("word_ids"))
        if not np.array_equal(self._offsets, word_offsets):
            raise ValueError("corpus input_ids and word_ids columns differ in row lengths")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        a, z = self._offsets[i], self._offsets[i + 1]
        return {"input_ids": self._ids[a:z], "word_ids": self._word_ids[a:z]}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for a, z in zip(self._offsets[:-1], self._offsets[1:], strict=True):
            yield {"input_ids": self._ids[a:z], "word_ids": self._word_ids[a:z]}


def _ragged(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets from 0) of an Arrow list column."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


def corpus_pmi(corpus: Corpus, *, max_n: int, min_count: int, top_k: int) -> CorpusPmi:
    """The `CorpusPmi` of a tokenized corpus (data.corpora.build_corpus), computed once and
    cached next to the corpus, keyed by its fingerprint and the PMI parameters; later calls with
    the same corpus and parameters load it."""
    path = corpus.derived_path(f"pmi-v{PMI_CACHE_VERSION}-n{max_n}-c{min_count}-k{top_k}.npz")
    if path.exists():
        return load_corpus_pmi(path)
    pmi = build_corpus_pmi(DatasetRows(corpus.dataset), max_n, min_count, top_k)
    save_corpus_pmi(pmi, path)
    return pmi


def save_corpus_pmi(pmi: CorpusPmi, path: str | os.PathLike) -> None:
    """Write `pmi` as one .npz, atomically: into a temporary file in the same folder, renamed
    into place, so a reader never sees half a file (several hosts may write the same one)."""
    table = pmi.table
    words = sorted(table.vocab, key=table.vocab.__getitem__)
    grams = np.full((len(table.ngrams), table.max_n), -1, np.int32)
    for i, gram in enumerate(table.ngrams):
        grams[i, : len(gram)] = gram
    arrays = {
        "max_n": np.asarray(table.max_n, np.int64),
        "word_token_ids": np.asarray([t for w in words for t in w], np.int32),
        "word_offsets": np.cumsum([0, *(len(w) for w in words)], dtype=np.int64),
        "ngrams": grams,
        "ngram_pmi": np.asarray(list(table.ngrams.values()), np.float64),
        "spans": pmi.spans,
        "offsets": pmi.offsets,
        "word_tokens": pmi.word_tokens,
    }
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        np.savez(f, **arrays)
    os.replace(f.name, path)


def load_corpus_pmi(path: str | os.PathLike) -> CorpusPmi:
    """Read a `CorpusPmi` written by `save_corpus_pmi`."""
    with np.load(path, allow_pickle=False) as data:
        ids, offsets = data["word_token_ids"].tolist(), data["word_offsets"].tolist()
        vocab = {tuple(ids[a:z]): i for i, (a, z) in enumerate(itertools.pairwise(offsets))}
        ngrams = {
            tuple(w for w in gram if w >= 0): float(s)
            for gram, s in zip(data["ngrams"].tolist(), data["ngram_pmi"].tolist(), strict=True)
        }
        return CorpusPmi(
            table=PmiTable(vocab=vocab, ngrams=ngrams, max_n=int(data["max_n"])),
            spans=data["spans"].reshape(-1, 2),
            offsets=data["offsets"],
            word_tokens=data["word_tokens"],
        )
