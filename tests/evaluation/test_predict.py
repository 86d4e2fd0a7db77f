"""Scoring predictions (per example, per fact) and the predictions file, without a model."""

from __future__ import annotations

import json

import pytest

from meta_mask.data.task_spec import Example
from meta_mask.evaluation import predict

EXAMPLES = [
    Example("Where was Ada born?", ["Port Mora"], "test-0", fact="3:birth_city"),
    Example("In which city was Ada born?", ["Port Mora"], "test-1", fact="3:birth_city"),
    Example("Who employs Ada?", ["Kel Labs"], "test-2", fact="3:employer"),
    Example("What is two and two?", ["four"], "test-3"),  # its own fact
]
PREDICTIONS = ["Port Mora", "Port Mira", "Kel Labs", "five"]


def test_results_carry_each_facts_mean_of_the_main_metric():
    result, scores = predict.score_predictions("em_f1", PREDICTIONS, EXAMPLES)
    assert scores["em"] == [1.0, 0.0, 1.0, 0.0]
    assert result["em"] == 0.5 and result["n"] == 4
    assert result["facts"] == {
        "metric": "em",
        "scores": {"3:birth_city": 0.5, "3:employer": 1.0, "test-3": 0.0},
    }
    # Each task's main metric: accuracy for FEVER, rougeL for summaries.
    result, _ = predict.score_predictions(
        "accuracy", ["SUPPORTS"], [Example("c", ["SUPPORTS"], "0")]
    )
    assert result["facts"] == {"metric": "accuracy", "scores": {"0": 1.0}}
    result, scores = predict.score_predictions("rouge", ["a b c"], [Example("d", ["a b d"], "0")])
    assert result["facts"]["metric"] == "rougeL"
    assert result["facts"]["scores"]["0"] == pytest.approx(scores["rougeL"][0])


def test_prediction_rows_name_their_fact(tmp_path):
    _, scores = predict.score_predictions("em_f1", PREDICTIONS, EXAMPLES)
    predict.write_predictions(tmp_path, EXAMPLES, PREDICTIONS, scores, num_samples=2)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["fact"] for r in rows] == ["3:birth_city", "3:birth_city", "3:employer", "test-3"]
    assert rows[1] == {
        "id": "test-1",
        "fact": "3:birth_city",
        "source": "In which city was Ada born?",
        "prediction": "Port Mira",
        "targets": ["Port Mora"],
        "em": 0.0,
        "f1": 0.5,
    }
    assert len((tmp_path / "samples.md").read_text().splitlines()) == 2
