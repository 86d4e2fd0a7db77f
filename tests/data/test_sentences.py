"""Tests for meta_mask.data.sentences: the rule-based sentence splitter."""

from __future__ import annotations

import pytest

from meta_mask.data.sentences import sentence_spans, split_sentences


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Dr. Smith went to Washington. He arrived at 3.15 p.m. on Monday.",
            ["Dr. Smith went to Washington.", "He arrived at 3.15 p.m. on Monday."],
        ),
        (
            "He lived in the U.S. The move was hard. The U.S. Army was there.",
            ["He lived in the U.S.", "The move was hard.", "The U.S. Army was there."],
        ),
        (
            "He moved to the U.S. in 1990. Later he left.",
            ["He moved to the U.S. in 1990.", "Later he left."],
        ),
        (
            "J. R. R. Tolkien wrote books. John F. Kennedy was president.",
            ["J. R. R. Tolkien wrote books.", "John F. Kennedy was president."],
        ),
        (
            'She said "Stop!" Then she left. Really? Yes.',
            ['She said "Stop!"', "Then she left.", "Really?", "Yes."],
        ),
        (
            "It cost $1.5 million. Pi is 3.14159 roughly.",
            ["It cost $1.5 million.", "Pi is 3.14159 roughly."],
        ),
        (
            "He founded Acme Inc. The firm grew. Acme Inc. shares rose.",
            ["He founded Acme Inc.", "The firm grew.", "Acme Inc. shares rose."],
        ),
        (
            "See e.g. Smith et al. for details. It was No. 5 on the chart.",
            ["See e.g. Smith et al. for details.", "It was No. 5 on the chart."],
        ),
        (
            "Mr. and Mrs. Jones met St. Louis officials in Jan. 1990. They agreed.",
            ["Mr. and Mrs. Jones met St. Louis officials in Jan. 1990.", "They agreed."],
        ),
        (
            "History\nThe city was founded in 1850. It grew fast.\n\nIn 1900 it had 10,000 people.",
            [
                "History",
                "The city was founded in 1850.",
                "It grew fast.",
                "In 1900 it had 10,000 people.",
            ],
        ),
        (
            "the end. lower case does not start a sentence.",
            ["the end. lower case does not start a sentence."],
        ),
        ("Wait... Then it rose (again.) Done.", ["Wait...", "Then it rose (again.)", "Done."]),
    ],
)
def test_split_sentences_tricky_cases(text, expected):
    assert split_sentences(text) == expected


def test_sentence_spans_index_the_original_text():
    text = "  First one here.   Second one, Dr. Who.\n\n  Third!  "
    spans = sentence_spans(text)
    got = [text[a:b] for a, b in spans]
    assert got == ["First one here.", "Second one, Dr. Who.", "Third!"]
    assert all(text[a:b] == text[a:b].strip() for a, b in spans)
    assert spans == sorted(spans) and all(
        b <= c for (_, b), (c, _) in zip(spans, spans[1:], strict=False)
    )
