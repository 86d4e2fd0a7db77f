"""Test/train overlap buckets for open-domain QA (Lewis, Stenetorp & Riedel, EACL 2021).

"Question and Answer Test-Train Overlap in Open-Domain Question Answering Datasets" splits a
test set by what the training set already contains, and reports the metric on each part:

- answer overlap: some normalized gold answer (any alias) of the test question equals a
  normalized gold answer (any alias) of some training question. Normalization is SQuAD's
  (`metrics.normalize_answer`), the one the EM metric uses, so "overlap" means "a training
  answer would be scored correct".
- question overlap: the test question is a (near-)duplicate of a training question. Lewis et al.
  labelled paraphrases by hand; we detect them automatically: by default two questions are
  duplicates when their SQuAD-normalized strings are equal (conservative: no false positives,
  misses paraphrases). With `question_jaccard=t`, questions whose normalized token *sets* have
  Jaccard similarity >= t also count (t=0.8 catches reorderings and one-word edits in typical
  8-10 word questions). Candidate pairs come from prefix filtering (tokens ordered rarest
  first; two sets with Jaccard >= t must share a token within their first
  |x| - ceil(t|x|) + 1 tokens), so NQ-sized sets (88k train x 3.6k test) stay fast.
- answer overlap only: answer overlap without question overlap (the paper's middle column).
- no overlap: neither question nor answer overlap.

Buckets hold test-example indices; `overlap_metrics` evaluates `compute_metrics` on each.
Examples are `Example`-like objects (`.source`, `.targets`) or mappings with those keys.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from meta_mask.evaluation.metrics import compute_metrics, normalize_answer

BUCKETS = ("total", "question_overlap", "answer_overlap", "answer_overlap_only", "no_overlap")


@dataclass(frozen=True)
class OverlapBuckets:
    """Indices of test examples in each bucket, and for question overlap the matched train index."""

    total: tuple[int, ...]
    question_overlap: tuple[int, ...]
    answer_overlap: tuple[int, ...]
    answer_overlap_only: tuple[int, ...]
    no_overlap: tuple[int, ...]
    question_match: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, tuple[int, ...]]:
        return {name: getattr(self, name) for name in BUCKETS}


def _field(example: Any, name: str) -> Any:
    if isinstance(example, dict):
        return example[name]
    return getattr(example, name)


def _answers(example: Any) -> set[str]:
    targets = _field(example, "targets")
    if isinstance(targets, str):
        targets = [targets]
    return {norm for norm in (normalize_answer(t) for t in targets) if norm}


def _jaccard_matches(
    test_sets: Sequence[frozenset[str]], train_sets: Sequence[frozenset[str]], threshold: float
) -> dict[int, int]:
    """For each test set, one train index with Jaccard >= threshold (prefix-filtered search)."""
    frequency = Counter(tok for s in train_sets for tok in s)
    # Rarest tokens first: prefixes then hold selective tokens and candidate lists stay short.
    order = lambda s: sorted(s, key=lambda tok: (frequency[tok], tok))

    def prefix(tokens: list[str]) -> list[str]:
        # 1e-9 guards against t*n landing a hair above an integer; a longer prefix is still exact.
        need = math.ceil(threshold * len(tokens) - 1e-9)
        return tokens[: len(tokens) - need + 1]

    index: dict[str, list[int]] = defaultdict(list)
    for j, s in enumerate(train_sets):
        for tok in prefix(order(s)):
            index[tok].append(j)
    matches: dict[int, int] = {}
    for i, s in enumerate(test_sets):
        if not s:
            continue
        candidates = sorted({j for tok in prefix(order(s)) for j in index.get(tok, ())})
        for j in candidates:
            inter = len(s & train_sets[j])
            if inter / (len(s) + len(train_sets[j]) - inter) >= threshold:
                matches[i] = j
                break
    return matches


def find_overlap(
    test_examples: Sequence[Any],
    train_examples: Sequence[Any],
    *,
    question_jaccard: float | None = None,
) -> OverlapBuckets:
    """Assign every test example to the Lewis et al. buckets against `train_examples`."""
    if question_jaccard is not None and not 0.0 < question_jaccard <= 1.0:
        raise ValueError(f"question_jaccard={question_jaccard}; must lie in (0, 1] or be None")
    train_answers: set[str] = set()
    train_questions: dict[str, int] = {}
    for j, ex in enumerate(train_examples):
        train_answers |= _answers(ex)
        train_questions.setdefault(normalize_answer(_field(ex, "source")), j)

    test_norm = [normalize_answer(_field(ex, "source")) for ex in test_examples]
    question_match = {
        i: train_questions[q] for i, q in enumerate(test_norm) if q and q in train_questions
    }
    if question_jaccard is not None:
        near = _jaccard_matches(
            [frozenset(q.split()) for q in test_norm],
            [frozenset(q.split()) for q in train_questions],
            question_jaccard,
        )
        train_index = list(train_questions.values())
        for i, j in near.items():
            question_match.setdefault(i, train_index[j])

    answer = {i for i, ex in enumerate(test_examples) if _answers(ex) & train_answers}
    question = set(question_match)
    total = range(len(test_examples))
    return OverlapBuckets(
        total=tuple(total),
        question_overlap=tuple(sorted(question)),
        answer_overlap=tuple(sorted(answer)),
        answer_overlap_only=tuple(i for i in total if i in answer and i not in question),
        no_overlap=tuple(i for i in total if i not in answer and i not in question),
        question_match=question_match,
    )


def overlap_metrics(
    metric_name: str,
    predictions: Sequence[str],
    test_examples: Sequence[Any],
    buckets: OverlapBuckets,
) -> dict[str, dict[str, float]]:
    """`compute_metrics` on each bucket's examples (an empty bucket reports only n=0)."""
    if len(predictions) != len(test_examples):
        raise ValueError(
            f"{len(predictions)} predictions for {len(test_examples)} test examples; "
            "they must be aligned one to one"
        )
    return {
        name: compute_metrics(
            metric_name, [predictions[i] for i in idx], [test_examples[i] for i in idx]
        )
        for name, idx in buckets.as_dict().items()
    }
