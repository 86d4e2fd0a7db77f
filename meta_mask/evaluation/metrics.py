"""Task metrics: SQuAD exact match / token F1, accuracy, KILT slot-filling EM/F1, ROUGE.

What this module owns:

- `normalize_answer`: the official SQuAD v1.1 normalization (lowercase, drop ASCII punctuation
  (`string.punctuation`), drop the standalone words a/an/the, collapse whitespace). It is kept
  byte-for-byte faithful so that numbers are comparable with published ones, which means:
  non-ASCII punctuation such as curly quotes (“ ” ‘ ’) and accents are NOT removed, and
  "the" is only removed as a whole word ("theatre" keeps its "the").
- `exact_match` / `token_f1`: SQuAD's per-pair scores; the per-example score is the max over all
  gold aliases. F1 of an empty prediction (or an empty gold after normalization) is 0, as in
  SQuAD v1.1 (v2.0 would give 1 when both are empty; no task here has unanswerable questions).
- "accuracy" (FEVER): the prediction is correct when its normalized form equals the normalized
  gold label (SUPPORTS / REFUTES), so "supports." and "SUPPORTS" agree.
- "kilt_em" (zsRE, T-REx): KILT's downstream evaluation (kilt/eval_downstream.py) normalizes with
  the same SQuAD function and takes the max of EM and F1 over every answer string in the record's
  `output` list; that is what this computes. KILT's *KILT-EM* additionally requires the retrieved
  provenance to be right (R-precision 1); closed-book generation retrieves nothing, so it does not
  apply here and is not computed.
- "rouge": ROUGE-1/2/L/Lsum F-measures from the `rouge_score` package with the Porter stemmer.
  ROUGE-Lsum treats "\\n" as the sentence separator (CNN/DailyMail highlights are
  newline-separated); text without any newline is split after ., ! or ? followed by
  whitespace, the usual stand-in for nltk's sentence splitter (not installed) when generated
  summaries come as one line.

`compute_metrics(metric_name, predictions, examples)` averages `per_example_scores` over the
examples and returns fractions in [0, 1] plus `n`. Examples are anything with a `targets`
attribute (`meta_mask.data.tasks.Example`) or plain sequences of gold strings.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

METRICS = ("em_f1", "accuracy", "kilt_em", "rouge")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization: lower, remove punctuation, remove articles, fix whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalized strings are identical, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between the normalized bags of tokens."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def max_over_golds(score_fn, prediction: str, golds: Sequence[str]) -> float:
    """The best score of `prediction` against any gold alias (0.0 when there is none)."""
    return max((score_fn(prediction, gold) for gold in golds), default=0.0)


def split_sentences(text: str) -> str:
    """Newline-separated sentences for ROUGE-Lsum; text that already has newlines is kept."""
    if "\n" in text:
        return text
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


@lru_cache(maxsize=1)
def _rouge_scorer():
    # Imported lazily: only summarization needs it, and building the stemmer costs a little.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """ROUGE F-measures of one prediction, each the max over the gold summaries."""
    scorer = _rouge_scorer()
    pred = split_sentences(prediction)
    best = dict.fromkeys(ROUGE_TYPES, 0.0)
    for gold in golds:
        scores = scorer.score(split_sentences(gold), pred)
        for key in ROUGE_TYPES:
            best[key] = max(best[key], scores[key].fmeasure)
    return best


def _targets_of(example: Any) -> list[str]:
    targets = getattr(example, "targets", example)
    if isinstance(targets, str):
        return [targets]
    return list(targets)


def per_example_scores(
    metric_name: str, predictions: Sequence[str], examples: Sequence[Any]
) -> dict[str, list[float]]:
    """Each metric's score for every example, in order (used for overlap buckets and means)."""
    if metric_name not in METRICS:
        raise ValueError(f"Unknown metric {metric_name!r}; valid: {', '.join(METRICS)}")
    if len(predictions) != len(examples):
        raise ValueError(
            f"{len(predictions)} predictions for {len(examples)} examples; "
            "they must be aligned one to one"
        )
    golds = [_targets_of(ex) for ex in examples]
    if metric_name in ("em_f1", "kilt_em"):
        return {
            "em": [
                max_over_golds(exact_match, p, g) for p, g in zip(predictions, golds, strict=True)
            ],
            "f1": [max_over_golds(token_f1, p, g) for p, g in zip(predictions, golds, strict=True)],
        }
    if metric_name == "accuracy":
        return {
            "accuracy": [
                max_over_golds(exact_match, p, g) for p, g in zip(predictions, golds, strict=True)
            ]
        }
    out: dict[str, list[float]] = {key: [] for key in ROUGE_TYPES}
    for p, g in zip(predictions, golds, strict=True):
        for key, value in rouge_scores(p, g).items():
            out[key].append(value)
    return out


def compute_metrics(
    metric_name: str, predictions: Sequence[str], examples: Sequence[Any]
) -> dict[str, float]:
    """Mean of each score over the examples, plus `n` (an empty set gives only n=0)."""
    scores = per_example_scores(metric_name, predictions, examples)
    result: dict[str, float] = {"n": len(predictions)}
    if not predictions:
        return result
    for key, values in scores.items():
        result[key] = sum(values) / len(values)
    return result
