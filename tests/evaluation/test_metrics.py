"""Tests for EM/F1 (SQuAD), accuracy, KILT EM and ROUGE, with hand-computed values."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from meta_mask.data.tasks import Example
from meta_mask.evaluation import metrics
from meta_mask.evaluation.metrics import (
    compute_metrics,
    exact_match,
    normalize_answer,
    per_example_scores,
    token_f1,
)


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("Theatre of the Absurd", "theatre of absurd"),  # "the" inside a word stays
        ("an apple a day", "apple day"),
        ("Anathema", "anathema"),  # "an"/"a" inside a word stay
        ("  Paris,   France. ", "paris france"),
        ("New\tYork\nCity", "new york city"),
        ("U.S.A.", "usa"),
        ("rock'n'roll", "rocknroll"),
        ("a-ha", "aha"),  # punctuation goes first, so no standalone article is left
        ("the the", ""),
        ("A", ""),
        ("", ""),
        ("Beyoncé Knowles", "beyoncé knowles"),  # accents are kept
        ("“Paris”", "“paris”"),  # curly quotes are not ASCII punctuation: kept, as in SQuAD
        ("Hello—world", "hello—world"),  # so is the em dash
    ],
)
def test_normalize_answer_matches_official_squad(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_cases():
    assert exact_match("the Paris", "Paris") == 1.0
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("“Paris”", "Paris") == 0.0
    assert exact_match("Pari", "Paris") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("", "Paris") == 0.0


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        # [cat, sat, on, mat] vs [cat, on, mat]: 3 common, P=3/4, R=1 -> 6/7.
        ("the cat sat on the mat", "a cat on a mat", 6 / 7),
        # P=2/4, R=2/2 -> 2/3.
        ("Herman Melville wrote it", "Herman Melville", 2 / 3),
        # Counts are clipped: [new, new, york] vs [new, york] -> 2 common, P=2/3, R=1 -> 0.8.
        ("new new york", "new york", 0.8),
        ("July 1914", "28 July 1914", 0.8),  # P=1, R=2/3
        ("Paris", "London", 0.0),
        ("", "Paris", 0.0),
        ("", "", 0.0),  # SQuAD v1.1: no common token -> 0
        ("The", "a", 0.0),  # both normalize to nothing
    ],
)
def test_token_f1_hand_values(prediction, gold, expected):
    assert token_f1(prediction, gold) == pytest.approx(expected)


def test_em_f1_takes_the_max_over_aliases_and_the_mean_over_examples():
    examples = [
        Example(source="q0", targets=["28 July 1914", "1914"], id="0"),
        Example(source="q1", targets=["28 July 1914"], id="1"),
        Example(source="q2", targets=["Herman Melville", "Melville"], id="2"),
    ]
    predictions = ["1914", "July 1914", "herman melville wrote it"]
    scores = per_example_scores("em_f1", predictions, examples)
    assert scores["em"] == [1.0, 0.0, 0.0]
    # q2: vs "Herman Melville" 2/3; vs "Melville" P=1/4, R=1 -> 0.4; max 2/3.
    assert scores["f1"] == pytest.approx([1.0, 0.8, 2 / 3])
    result = compute_metrics("em_f1", predictions, examples)
    assert result["n"] == 3
    assert result["em"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx((1.0 + 0.8 + 2 / 3) / 3)
    # Plain lists of golds work too.
    assert compute_metrics("em_f1", ["x"], [["x", "y"]])["em"] == 1.0


def test_accuracy_compares_normalized_labels():
    examples = [["SUPPORTS"], ["SUPPORTS"], ["REFUTES"]]
    result = compute_metrics("accuracy", ["supports.", "REFUTES", " Refutes "], examples)
    assert result == {"n": 3, "accuracy": pytest.approx(2 / 3)}


def test_kilt_em_uses_every_output_answer():
    example = Example(source="Apple Inc. [SEP] headquarters location",
                      targets=["Cupertino", "Cupertino, California"], id="z")  # fmt: skip
    result = compute_metrics("kilt_em", ["cupertino california"], [example])
    assert result["em"] == 1.0 and result["f1"] == 1.0
    result = compute_metrics("kilt_em", ["California"], [example])
    # vs "Cupertino, California": P=1, R=1/2 -> 2/3.
    assert result["em"] == 0.0 and result["f1"] == pytest.approx(2 / 3)


def test_rouge_hand_values():
    scores = metrics.rouge_scores("the cat sat", ["the cat ran"])
    # Unigrams: 2 of 3 shared; bigrams: 1 of 2; LCS "the cat" = 2 of 3.
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(1 / 2)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    # Porter stemming: cats/cat and running/runs agree.
    assert metrics.rouge_scores("cats running", ["cat runs"])["rouge1"] == pytest.approx(1.0)


def test_rouge_matches_rouge_score_directly():
    predictions = [
        "The Eiffel Tower was repainted. It took sixty tonnes of paint.",
        "A spider was found in Paris",
    ]
    golds = [
        "The Eiffel Tower has been repainted with sixty tonnes of paint.\nWork took 18 months.",
        "A rare spider has been found in a Paris museum.",
    ]
    scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), use_stemmer=True)
    references = [
        scorer.score(g, metrics.split_sentences(p)) for p, g in zip(predictions, golds, strict=True)
    ]
    result = compute_metrics("rouge", predictions, [[g] for g in golds])
    for key in metrics.ROUGE_TYPES:
        expected = sum(r[key].fmeasure for r in references) / 2
        assert result[key] == pytest.approx(expected)
    # Summary-level LCS differs from plain LCS once there are several sentences.
    assert references[0]["rougeLsum"].fmeasure != references[0]["rougeL"].fmeasure


def test_rouge_takes_the_best_reference():
    best = metrics.rouge_scores("a b c", ["x y z", "a b c"])
    assert best == {key: pytest.approx(1.0) for key in metrics.ROUGE_TYPES}


def test_split_sentences():
    assert metrics.split_sentences("One. Two! Three? four") == "One.\nTwo!\nThree?\nfour"
    assert metrics.split_sentences("kept\nas is. yes") == "kept\nas is. yes"
    assert metrics.split_sentences("") == ""


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown metric 'bleu'; valid: em_f1, accuracy"):
        compute_metrics("bleu", ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        compute_metrics("em_f1", ["a", "b"], [["a"]])
    assert compute_metrics("em_f1", [], []) == {"n": 0}
