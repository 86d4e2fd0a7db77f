"""What the meta-objective rewards: its value for reference masks made from gold labels.

A diagnostic of the objective, not of a policy. On dev meta batches (the contexts, their own
questions, the contrast questions, built as the meta-learner builds its dev batches), the
same inner step(s) and contrastive outer loss the meta-learner descends are evaluated with
hand-made masks instead of the policy's: each context's own answer, plus the same number of
further tokens (`fill`) of one kind in every variant, so that two variants differ in WHICH
tokens are masked, not how many:

    answer                  the answer's tokens alone (fewer tokens: not count-matched)
    answer+subject          + tokens of the question's entities (the subject's name mentions)
    answer+other_entities   + tokens of other entities (other values, other people's names)
    answer+other_words      + template words (tokens in no entity)
    subject                 the subject's tokens alone (as many as answer+subject masks)

Lower is better (the objective is a loss). A policy the meta-learner can learn is at best the
variant the objective ranks first; where the intermediate stage's result ranks the variants
differently, the objective, not its optimizer, is what limits the meta-learned policy. It
reads gold answers and question entities, so it is never a selector: the meta-learner never
calls it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meta_mask.policies import heuristic, meta, meta_train, supervised
from meta_mask.special_tokens import SpecialTokens

VARIANTS = ("answer", "answer+subject", "answer+other_entities", "answer+other_words", "subject")


def reference_masks(
    kinds: np.ndarray, valid: np.ndarray, entity: np.ndarray, fill: int, seed: int
) -> dict[str, np.ndarray]:
    """The VARIANTS' masks [B, L] of a batch: kinds (1 answer, 2 question entity, 0 else),
    valid and entity (token in a gold entity span) [B, L]. Each row adds the same count,
    min(fill, the smallest pool of the row), of seeded-random tokens of each kind."""
    valid = np.asarray(valid, bool)
    answer, subject = valid & (kinds == 1), valid & (kinds == 2)
    pools = {
        "answer+subject": subject,
        "answer+other_entities": valid & entity & (kinds == 0),
        "answer+other_words": valid & ~entity & (kinds == 0),
    }
    rng = np.random.default_rng([seed, 7])
    out = {name: answer.copy() for name in pools}
    out["answer"] = answer
    out["subject"] = np.zeros_like(answer)
    for b in range(valid.shape[0]):
        count = min([fill] + [int(p[b].sum()) for p in pools.values()])
        for name, pool in pools.items():
            take = rng.choice(np.flatnonzero(pool[b]), count, replace=False)
            out[name][b, take] = True
        out["subject"][b] = out["answer+subject"][b] & ~answer[b]
    return {name: out[name] for name in VARIANTS}


def probe_batches(
    triples: Sequence[Mapping[str, Any]],
    qa: Mapping[str, np.ndarray],
    cfg: Any,
    *,
    special: SpecialTokens,
    seed: int,
    length: int,
    fill: int,
    max_batches: int,
    qa_pool: tuple[Sequence[Mapping[str, Any]], Mapping[str, np.ndarray]] | None,
) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """Up to `max_batches` (meta batches, {variant: masks [K, B, L]}) of `triples` (token
    triples labelled with answers and question entities: kinds 1 and 2), built as the
    meta-learner's dev batches are (meta_train.meta_batch, seed + 1)."""
    out = []
    for step in range(min(max_batches, max(len(triples) // meta_train.distinct_contexts(cfg), 1))):
        batches = meta_train.meta_batch(
            triples, qa, step, cfg, special=special, seed=seed + 1, length=length, qa_pool=qa_pool
        )
        rows = meta_train.inner_rows(len(triples), cfg, seed=seed + 1, step=step)
        masks: dict[str, list[np.ndarray]] = {name: [] for name in VARIANTS}
        for k in range(cfg.inner_steps):
            part = rows[k * cfg.inner_batch_size : (k + 1) * cfg.inner_batch_size]
            col = supervised.collate_triples([triples[i] for i in part], length, special=special)
            entity = heuristic.span_units(np.asarray(col["entity_spans"]), col["valid"]) >= 0
            # A repeated context gets a fresh draw of its filler tokens at every step.
            draw = seed + step + 1000 * k * cfg.inner_repeat
            made = reference_masks(col["label_kinds"], col["valid"], entity, fill, draw)
            for name in VARIANTS:
                masks[name].append(made[name])
        out.append((batches, {name: np.stack(m) for name, m in masks.items()}))
    return out


def probe(
    setup: meta.MetaSetup,
    phi: Any,
    theta: Any,
    batches: Sequence[tuple[Mapping[str, Any], Mapping[str, np.ndarray]]],
) -> dict[str, Any]:
    """{"objective": {variant: mean}, "per_batch": {variant: [...]}, "diff": {variant:
    [mean, low, high]}}: the meta-objective of each variant's masks (phi only shapes the
    computation: with given masks every weight is 1 in value), and each variant's paired
    difference from answer+other_entities with a 95% bootstrap interval over batches."""

    @jax.jit
    def objective(batch, masks):
        inner = {k: batch["inner"][k] for k in ("input_ids", "valid")}
        noise = jnp.zeros(inner["input_ids"].shape, jnp.float32)
        _, metrics = meta.meta_loss(
            phi, theta, inner, batch["outer"], noise, setup, masks=masks,
            contrast=batch.get("contrast"), qa=batch.get("qa"),
        )  # fmt: skip
        return metrics["outer_loss"]

    per_batch = {name: [] for name in VARIANTS}
    for batch, masks in batches:
        arrays = jax.tree.map(jnp.asarray, dict(batch))
        for name in VARIANTS:
            per_batch[name].append(float(objective(arrays, jnp.asarray(masks[name]))))
    ref = np.asarray(per_batch["answer+other_entities"])
    rng = np.random.default_rng(0)
    diff = {}
    for name in VARIANTS:
        d = np.asarray(per_batch[name]) - ref
        boot = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(2000)]
        diff[name] = [float(d.mean()), *map(float, np.percentile(boot, [2.5, 97.5]))]
    means = {name: float(np.mean(v)) for name, v in per_batch.items()}
    return {"objective": means, "per_batch": per_batch, "diff": diff}
