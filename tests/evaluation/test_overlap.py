"""Tests for the Lewis et al. (2021) test/train overlap buckets, on hand-made sets."""

from __future__ import annotations

import random

import pytest

from meta_mask.data.tasks import Example
from meta_mask.evaluation import overlap
from meta_mask.evaluation.overlap import find_overlap, overlap_metrics

TRAIN = [
    Example(source="who wrote moby dick", targets=["Herman Melville"], id="t0"),
    Example(source="what is the capital of france", targets=["Paris"], id="t1"),
    Example(source="when was the eiffel tower built", targets=["1889"], id="t2"),
    Example(source="who played the joker", targets=["Heath Ledger", "Jack Nicholson"], id="t3"),
]
TEST = [
    # 0: the same question after normalization (case, punctuation) -> question + answer overlap.
    Example(source="Who wrote Moby Dick?", targets=["Herman Melville"], id="q0"),
    # 1: a different question whose answer is a training answer -> answer overlap only.
    Example(source="which city is the capital of france", targets=["Paris"], id="q1"),
    # 2: nothing in common.
    Example(source="how tall is the eiffel tower", targets=["330 metres"], id="q2"),
    # 3: equal once articles are dropped ("the capital" -> "capital").
    Example(source="what is capital of France", targets=["Paris, France", "Paris"], id="q3"),
    # 4: a near duplicate (Jaccard 5/6) with an answer found via its second alias.
    Example(source="when was eiffel tower built in", targets=["in 1889", "1889."], id="q4"),
    # 5: the answer matches only an alias of a training answer list ("the" is dropped).
    Example(source="who starred as the joker in 1989", targets=["the Jack Nicholson"], id="q5"),
    # 6: nothing in common.
    Example(source="who painted the mona lisa", targets=["Leonardo da Vinci"], id="q6"),
]


def test_buckets_with_normalized_exact_question_match():
    buckets = find_overlap(TEST, TRAIN)
    assert buckets.total == (0, 1, 2, 3, 4, 5, 6)
    assert buckets.question_overlap == (0, 3)
    assert buckets.question_match == {0: 0, 3: 1}
    assert buckets.answer_overlap == (0, 1, 3, 4, 5)
    assert buckets.answer_overlap_only == (1, 4, 5)
    assert buckets.no_overlap == (2, 6)


def test_jaccard_threshold_adds_near_duplicates():
    buckets = find_overlap(TEST, TRAIN, question_jaccard=0.8)
    assert buckets.question_overlap == (0, 3, 4)
    assert buckets.question_match[4] == 2
    assert buckets.answer_overlap_only == (1, 5)
    # Test 1 vs train 1: {which, city, is, capital, of, france} vs {what, is, capital, of,
    # france}: 4 shared of 7 -> 0.571: a duplicate at 0.5, not at 0.6.
    assert 1 in find_overlap(TEST, TRAIN, question_jaccard=0.5).question_overlap
    assert 1 not in find_overlap(TEST, TRAIN, question_jaccard=0.6).question_overlap
    with pytest.raises(ValueError, match=r"question_jaccard=1.5; must lie in \(0, 1\]"):
        find_overlap(TEST, TRAIN, question_jaccard=1.5)


def test_mappings_work_like_examples():
    test = [{"source": e.source, "targets": e.targets} for e in TEST]
    train = [{"source": e.source, "targets": e.targets} for e in TRAIN]
    assert find_overlap(test, train) == find_overlap(TEST, TRAIN)


def test_prefix_filtering_equals_brute_force():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(12)]
    make = lambda: frozenset(rng.sample(vocab, rng.randint(1, 7)))
    train = [make() for _ in range(300)]
    test = [make() for _ in range(200)] + [frozenset()]
    for threshold in (0.3, 0.5, 0.75, 0.8, 1.0):
        expected = {}
        for i, s in enumerate(test):
            for j, t in enumerate(train):
                if s and len(s & t) / len(s | t) >= threshold:
                    expected[i] = j
                    break
        assert overlap._jaccard_matches(test, train, threshold) == expected


def test_per_bucket_metrics():
    buckets = find_overlap(TEST, TRAIN)
    predictions = [
        "Herman Melville",
        "Paris",
        "300 metres",
        "London",
        "1889",
        "Heath Ledger",
        "Da Vinci",
    ]
    result = overlap_metrics("em_f1", predictions, TEST, buckets)
    assert result["total"]["n"] == 7
    assert result["total"]["em"] == pytest.approx(3 / 7)  # q0, q1, q4
    assert result["question_overlap"] == {"n": 2, "em": 0.5, "f1": 0.5}
    assert result["answer_overlap_only"]["em"] == pytest.approx(2 / 3)
    assert result["no_overlap"]["n"] == 2 and result["no_overlap"]["em"] == 0.0
    # "300 metres" vs "330 metres": P=R=1/2 -> 0.5; "Da Vinci" vs "Leonardo da Vinci": 0.8.
    assert result["no_overlap"]["f1"] == pytest.approx((0.5 + 0.8) / 2)
    empty = find_overlap(TEST[2:3], TRAIN)
    assert overlap_metrics("em_f1", ["x"], TEST[2:3], empty)["question_overlap"] == {"n": 0}
    with pytest.raises(ValueError, match="1 predictions for 7 test examples"):
        overlap_metrics("em_f1", ["x"], TEST, buckets)
