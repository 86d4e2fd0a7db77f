"""Meta-learning a masking policy against a task's downstream loss: the loop around meta.py.

Each meta step draws K x B (context sentence, question, answer) triples of the task's
training split, in an order that depends only on (seed, step): the K inner batches are the
context sentences (masked by the policy, then K differentiable MLM updates of the LM), and
the outer batch is the same triples' questions with their answers (the teacher-forced
answer cross-entropy of the updated LM). Pairing them is what makes the meta-gradient
informative: it asks which tokens of a context, when masked and learned, most reduce the
loss on the question about that context (the paper's figure). The LM parameters theta are
the run's initial ones, fixed for all meta steps (meta.py's convention). The policy is
evaluated every `eval_every` steps by its dev span-F1 against the answer tokens (the metric
the supervised policy is selected by) and the best evaluated parameters are kept: model
selection on dev data, as for the supervised policy. (With an untrained LM the meta-gradient
is dominated by how a token's MLM update aligns with the answers' output embeddings, so a
long run can collapse onto answer tokens shared by many answers, e.g. "Systems" in
"Vopor Systems"; the dev evaluation catches that.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from meta_mask.config import MetaConfig
from meta_mask.data import seq2seq
from meta_mask.policies import meta, supervised
from meta_mask.policies.heuristic import word_units
from meta_mask.policies.net import LearnedScorer, PolicyNet


def meta_batch(
    triples: Sequence[Mapping[str, Any]],
    qa: seq2seq.EncodedExamples,
    step: int,
    cfg: MetaConfig,
    *,
    seed: int,
    length: int,
    pad_id: int,
    decoder_start_token_id: int,
) -> dict[str, Any]:
    """The batches of meta step `step`: {"inner": [K, B, L] arrays, "outer": a QA batch}."""
    k, b = cfg.inner_steps, cfg.inner_batch_size
    rows = supervised.step_indices(len(triples), k * b, seed=seed, step=step)
    parts = [
        supervised.collate_triples(
            [triples[i] for i in rows[j * b : (j + 1) * b]], length, pad_id=pad_id,
            example_ids=rows[j * b : (j + 1) * b],
        )  # fmt: skip
        for j in range(k)
    ]
    inner = {
        "input_ids": np.stack([p["input_ids"] for p in parts]).astype(np.int32),
        "valid": np.stack([p["valid"] for p in parts]),
        "example_ids": np.stack([np.asarray(p["example_ids"]) for p in parts]).astype(np.int32),
    }
    if cfg.policy_units == "word":  # whole words, as LearnedScorer(units="word") masks them
        inner["unit_ids"] = np.stack(
            [word_units(p["word_ids"], p["valid"]) for p in parts]
        ).astype(np.int32)
    outer_rows = rows[: cfg.outer_batch_size]
    outer = seq2seq.train_batch(
        qa, outer_rows, pad_id=pad_id, decoder_start_token_id=decoder_start_token_id
    )
    return {"inner": inner, "outer": outer}


def learn_meta_policy(
    model: Any,
    theta: Any,
    net: PolicyNet,
    phi: Any,
    train_triples: Sequence[Mapping[str, Any]],
    dev_triples: Sequence[Mapping[str, Any]],
    *,
    tokenizer: Any,
    cfg: MetaConfig,
    seed: int,
    length: int,
    source_length: int,
    target_length: int,
    decoder_start_token_id: int,
    eval_every: int = 0,
    log_fn: Callable[[int, dict], None] | None = None,
) -> tuple[Any, dict]:
    """Meta-train `phi` for cfg.meta_steps; returns (phi, history with dev span-F1 curve).

    `train_triples` / `dev_triples` are token-level triples (data.contexts.add_token_spans:
    input_ids, word_ids, answer_labels, question, answer)."""
    if not train_triples:
        raise ValueError("meta-learning needs (context, question, answer) triples; found none")
    pad_id = tokenizer.pad_token_id
    qa = seq2seq.encode_examples(
        [SimpleNamespace(source=t["question"], targets=[t["answer"]]) for t in train_triples],
        tokenizer,
        source_length=source_length,
        target_length=target_length,
    )
    setup = meta.MetaSetup(
        cfg=cfg,
        policy_fn=meta.policy_fn_from_net(net),
        lm_loss=meta.bart_lm_loss(model),
        mask_id=tokenizer.mask_token_id,
        pad_id=pad_id,
        decoder_start_token_id=decoder_start_token_id,
    )
    step_fn = meta.make_meta_step(setup)
    state = meta.create_meta_state(phi, cfg)
    rng = jax.random.fold_in(jax.random.key(seed), 4)
    dev_batches = supervised.eval_batches(dev_triples, length, 256, pad_id=pad_id)
    budget = {"mask_rate": cfg.mask_rate}
    eval_every = eval_every or max(cfg.meta_steps // 10, 1)
    history: dict[str, Any] = {"evals": [], "train": []}

    best = {"span_f1": -1.0, "step": 0, "params": jax.device_get(phi)}

    def evaluate(step: int, params: Any) -> None:
        if not dev_batches:
            return
        host = jax.device_get(params)
        scorer = LearnedScorer(net, host, units=cfg.policy_units)
        result = supervised.evaluate_scorer(scorer, dev_batches, budget, draws=4, seed=seed)
        history["evals"].append({"step": step, **{k: float(v) for k, v in result.items()}})
        if result["span_f1"] > best["span_f1"]:
            best.update(span_f1=float(result["span_f1"]), step=step, params=host)
        if log_fn is not None:
            log_fn(step, {f"dev_{k}": v for k, v in result.items()})

    evaluate(0, state.params)
    for step in tqdm(range(cfg.meta_steps), desc="meta-learn policy", disable=None):
        batches = meta_batch(
            train_triples, qa, step, cfg, seed=seed, length=length, pad_id=pad_id,
            decoder_start_token_id=decoder_start_token_id,
        )  # fmt: skip
        batches = jax.tree.map(jnp.asarray, batches)
        state, metrics = step_fn(state, theta, batches, rng)
        done = step + 1
        if done % eval_every == 0 or done == cfg.meta_steps:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(host["loss"]):
                raise FloatingPointError(f"meta loss is {host['loss']} at meta step {done}")
            history["train"].append({"step": done, **host})
            if log_fn is not None:
                log_fn(done, host)
            evaluate(done, state.params)
    if not dev_batches:
        return jax.device_get(state.params), history
    history["best_step"], history["best_span_f1"] = best["step"], best["span_f1"]
    return best["params"], history
