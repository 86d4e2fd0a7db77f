"""Evaluation by generation: predictions for a split, the task's metric, sample predictions.

Generation runs jitted on fixed-shape batches (the last one padded), so it compiles once;
the only host work is decoding token ids to text and scoring.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from meta_mask.config import EvalConfig, ModelConfig
from meta_mask.data import seq2seq
from meta_mask.evaluation import metrics as metrics_lib
from meta_mask.evaluation import stats
from meta_mask.special_tokens import SpecialTokens


def make_predictor(
    model,
    model_cfg: ModelConfig,
    tokenizer,
    examples: Sequence,
    *,
    special: SpecialTokens,
    source_length: int,
    max_length: int,
    eval_cfg: EvalConfig,
    progress: bool = True,
) -> Callable[[Any], list[str]]:
    """`predictor(params)` -> the generated text of every example, in order. The examples are
    encoded and the generation function jitted once, so calling it again (e.g. every dev
    evaluation of a stage) neither re-encodes nor re-traces."""
    from meta_mask.model.generate import make_generate_fn

    data = seq2seq.encode_examples(
        examples, tokenizer, special=special, source_length=source_length, target_length=max_length
    )
    generate = make_generate_fn(
        model,
        config=model_cfg,
        # +1: the decoder start token occupies the first position of the output.
        max_length=max_length + 1,
        num_beams=eval_cfg.num_beams,
        length_penalty=eval_cfg.length_penalty,
        min_length=eval_cfg.min_length,
    )
    batch_size = min(eval_cfg.batch_size, len(examples))
    total = -(-len(examples) // batch_size)

    def predictor(params: Any) -> list[str]:
        out: list[str] = []
        batches = seq2seq.eval_batches(data, batch_size, special=special)
        for input_ids, real in tqdm(
            batches, total=total, desc="generate", disable=None if progress else True
        ):
            tokens = np.asarray(generate(params, input_ids))[:real]
            out += tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [text.strip() for text in out]

    return predictor


def main_metric(metric: str) -> str:
    """The score a task's runs are compared (and dev-selected) by: em, accuracy or rougeL."""
    return {"em_f1": "em", "kilt_em": "em", "accuracy": "accuracy", "rouge": "rougeL"}[metric]


def dev_scorer(
    model,
    model_cfg: ModelConfig,
    tokenizer,
    examples: Sequence,
    *,
    special: SpecialTokens,
    metric: str,
    source_length: int,
    max_length: int,
    eval_cfg: EvalConfig,
) -> Callable[[Any], dict[str, float]]:
    """`score(params)` -> the task's metrics on `examples` (a dev split), for model selection."""
    predictor = make_predictor(
        model,
        model_cfg,
        tokenizer,
        examples,
        special=special,
        source_length=source_length,
        max_length=max_length,
        eval_cfg=eval_cfg,
        progress=False,
    )

    def score(params: Any) -> dict[str, float]:
        return metrics_lib.compute_metrics(metric, predictor(params), examples)

    return score


def evaluate(
    model,
    params: Any,
    model_cfg: ModelConfig,
    tokenizer,
    examples: Sequence,
    *,
    special: SpecialTokens,
    metric: str,
    source_length: int,
    max_length: int,
    eval_cfg: EvalConfig,
    out_dir: str | pathlib.Path,
    train_examples: Sequence | None = None,
) -> dict:
    """Metrics of the model's predictions on `examples` (`score_predictions`); writes
    predictions.jsonl and samples.md into `out_dir` (`write_predictions`)."""
    predictions = make_predictor(
        model,
        model_cfg,
        tokenizer,
        examples,
        special=special,
        source_length=source_length,
        max_length=max_length,
        eval_cfg=eval_cfg,
    )(params)
    result, scores = score_predictions(metric, predictions, examples, train_examples)
    write_predictions(out_dir, examples, predictions, scores, num_samples=eval_cfg.num_samples)
    return result


def score_predictions(
    metric: str,
    predictions: Sequence[str],
    examples: Sequence,
    train_examples: Sequence | None = None,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """(the run's results, each metric's per-example scores) of `predictions` for `examples`.

    The results are the task's metrics (metrics.compute_metrics) and the per-fact scores that
    paired comparisons of runs resample (evaluation/stats.py) under "facts": {"metric": the
    task's main metric, "scores": {fact id: the mean of that metric over the fact's examples}}.
    With `train_examples` (closed-book QA), also the metrics per test-train overlap bucket
    (Lewis et al. 2021) under "overlap"."""
    scores = metrics_lib.per_example_scores(metric, predictions, examples)
    result: dict[str, Any] = metrics_lib.compute_metrics(metric, predictions, examples)
    main = main_metric(metric)
    result["facts"] = {
        "metric": main,
        "scores": stats.fact_scores([ex.fact_id for ex in examples], scores[main]),
    }
    if train_examples is not None:
        from meta_mask.evaluation import overlap

        buckets = overlap.find_overlap(examples, train_examples)
        result["overlap"] = overlap.overlap_metrics(metric, predictions, examples, buckets)
    return result, scores


def write_predictions(
    out_dir: str | pathlib.Path,
    examples: Sequence,
    predictions: Sequence[str],
    scores: dict[str, list[float]],
    *,
    num_samples: int,
) -> None:
    """predictions.jsonl (a row per example: id, fact id, source, prediction, targets and its
    scores) and samples.md (the first `num_samples` predictions) in `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i, (ex, pred) in enumerate(zip(examples, predictions, strict=True)):
            row = {
                "id": ex.id,
                "fact": ex.fact_id,
                "source": ex.source,
                "prediction": pred,
                "targets": ex.targets,
                **{k: v[i] for k, v in scores.items()},
            }
            f.write(json.dumps(row) + "\n")
    samples = [
        f"- `{ex.source}` -> **{pred}** (gold: {ex.targets[0]})"
        for ex, pred in list(zip(examples, predictions, strict=True))[:num_samples]
    ]
    (out_dir / "samples.md").write_text("\n".join(samples) + "\n", encoding="utf-8")
