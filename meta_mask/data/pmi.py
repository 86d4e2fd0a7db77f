"""Corpus PMI n-grams for PMI-Masking (Levine et al., ICLR 2021, "PMI-Masking").

Owns: counting word n-grams (n = 1..max_n) over a tokenized corpus, the paper's PMI measure for
n-grams, the table of the top-K collocations, finding them in a sentence (units the PMI policy
masks whole), and saving/loading the table.

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

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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


def annotate_pmi(records: Iterable[Mapping[str, Any]], table: PmiTable) -> list[dict[str, Any]]:
    """Copies of the records with "pmi_spans" (int32 [P, 2] token spans) added."""
    return [
        {**rec, "pmi_spans": find_ngrams(rec["input_ids"], rec["word_ids"], table)}
        for rec in records
    ]


def save_pmi_table(table: PmiTable, path: str | os.PathLike) -> None:
    """Write the table as JSON (words as token-id lists)."""
    words = sorted(table.vocab, key=table.vocab.__getitem__)
    data = {
        "max_n": table.max_n,
        "words": [list(w) for w in words],
        "ngrams": [[list(g), s] for g, s in table.ngrams.items()],
    }
    with open(path, "w") as f:
        json.dump(data, f)


def load_pmi_table(path: str | os.PathLike) -> PmiTable:
    """Read a table written by `save_pmi_table`."""
    with open(path) as f:
        data = json.load(f)
    vocab = {tuple(w): i for i, w in enumerate(data["words"])}
    ngrams = {tuple(g): float(s) for g, s in data["ngrams"]}
    return PmiTable(vocab=vocab, ngrams=ngrams, max_n=int(data["max_n"]))
