"""The supervised masking policy: a PolicyNet trained to score a task's answer tokens highest.

Owns the training data layout (fixed-shape batches from token-level (context, answer) triples,
see data/contexts.py), the two objectives, the dev metric (span-F1 under the masking budget),
the training loop with early stopping, and a small driver from task examples to trained
parameters. The trained network is used through `net.LearnedScorer`, so at intermediate
pre-training time it masks under the same sampler and budget as every other policy.

Objectives (SupervisedConfig.objective), both over the maskable (`valid`) tokens only:
- "token": per-token binary cross-entropy of sigmoid(logit) against the answer labels, answer
  tokens weighted by `pos_weight` (answers are rare: auto = n_negative / n_positive), averaged
  over the valid tokens of the batch.
- "span": per sentence, the cross-entropy between the uniform distribution over its answer
  tokens (with `balance_targets`: half on the answers, half on the question's entities,
  `target_mass`) and q = softmax of the logits over its valid tokens, averaged over sentences.
  q is the distribution the sampler's Gumbel-top-k draws from (and the meta-learned policy's),
  so this trains exactly the quantity that decides the masks. With word units a k-token word
  appears k times in the softmax (its mass counts k-fold); the ranking of units is what
  matters.

Dev metric, `span_f1`: for each dev sentence the policy's mask is the shared sampler's output
(`sample_mask_np`) on the scorer's scores and units under the eval budget (mask_rate r: the
round(r * n_valid) top tokens, whole units; or num_units k: the top-k units) with ZERO noise,
i.e. the deterministic top of the ranking (ties go to the lower unit id); with `draws` > 0 it
is instead averaged over that many Gumbel draws of the sampler (what pre-training actually
masks; use it for flat-scored heuristics, whose zero-noise ties are positional). Per sentence,
token-level F1 = 2 |M & G| / (|M| + |G|) between the masked tokens M and the gold answer
tokens G (1 when both are empty); span-F1 is its mean over sentences (SQuAD-style macro F1).
`answer_precision` = answer tokens masked / tokens masked over the whole set (micro).

Batch order: step s takes positions [s*B, (s+1)*B) of an endless sequence of epoch
permutations, epoch e permuted by np.random.default_rng([seed, e]): a pure function of
(seed, step), so a run is reproducible and any step's batch can be rebuilt without replay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from meta_mask.batches import PolicyTrainBatch, TripleBatch
from meta_mask.config import SupervisedConfig, to_dict
from meta_mask.data.contexts import policy_triples
from meta_mask.policies.heuristic import collate, policy_units
from meta_mask.policies.net import LearnedScorer, PolicyNet
from meta_mask.policies.sampler import BatchRng, Scorer, sample_mask_np
from meta_mask.special_tokens import SpecialTokens
from meta_mask.training.loop import Learner, LoopOptions, patience_stop
from meta_mask.training.steps import TrainState

PyTree = Any

_NEG = -1e9  # stands in for the net's -inf on invalid tokens inside the losses (no inf - inf)


# ---------------------------------------------------------------------------------------------
# data


def prepare_triples(
    triples: Sequence[Mapping[str, Any]], *, max_triples: int = 0, seed: int = 0
) -> list[dict[str, Any]]:
    """Token-level triples without duplicates (the same sentence with the same answer tokens,
    e.g. one context shared by two question templates), capped at `max_triples` (a seeded
    subset, kept in input order; 0 = all)."""
    seen: set[tuple[bytes, bytes]] = set()
    out: list[dict[str, Any]] = []
    for t in triples:
        if "answer_labels" not in t:
            raise ValueError(
                "supervised policy triples need token labels: build them with "
                "data.contexts.policy_triples(..., tokenizer=...) or add_token_spans"
            )
        key = (
            np.asarray(t["input_ids"], np.int32).tobytes(),
            np.asarray(t["answer_labels"], np.int32).tobytes(),
        )
        if key not in seen:
            seen.add(key)
            out.append(dict(t))
    if max_triples and len(out) > max_triples:
        keep = np.sort(np.random.default_rng([seed, 0]).permutation(len(out))[:max_triples])
        out = [out[i] for i in keep]
    return out


def collate_triples(
    triples: Sequence[Mapping[str, Any]],
    length: int,
    *,
    special: SpecialTokens,
    example_ids: Sequence[int] | None = None,
) -> TripleBatch:
    """`heuristic.collate` of the triples plus their target "labels" (1 on every target token)
    and "label_kinds" (1 answer, 2 question entity): batches.TripleBatch."""
    batch = collate(triples, length, special=special, example_ids=example_ids)
    labels = np.zeros(batch["input_ids"].shape, np.int32)
    for i, t in enumerate(triples):
        lab = np.asarray(t["answer_labels"], np.int32)
        labels[i, : len(lab)] = lab
    batch["label_kinds"] = np.where(batch["valid"], labels, 0).astype(np.int32)
    batch["labels"] = (batch["label_kinds"] > 0).astype(np.int32)
    return batch


def target_mass(batch: TripleBatch, *, balance: bool) -> np.ndarray:
    """float32 [B, L]: the span objective's target distribution per row (uniform over the row's
    target tokens), or with `balance` half on the answer tokens and half on the question-entity
    tokens (all on one kind when the row has only that kind): the answer and the entity the
    question is about weigh the same, however often the entity is mentioned."""
    kinds = batch["label_kinds"]
    if not balance:
        return batch["labels"].astype(np.float32)
    mass = np.zeros(kinds.shape, np.float32)
    for kind in (1, 2):
        on = kinds == kind
        count = on.sum(axis=1, keepdims=True)
        mass += np.where(on, 1.0 / np.maximum(count, 1), 0.0).astype(np.float32)
    both = np.all([(kinds == k).any(axis=1) for k in (1, 2)], axis=0)
    return np.where(both[:, None], mass / 2, mass).astype(np.float32)


def step_indices(n: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
    """Indices of the triples in batch `step`: positions [step*B, (step+1)*B) of the endless
    concatenation of epoch permutations default_rng([seed, epoch]).permutation(n)."""
    if n < 1:
        raise ValueError("no training triples: the task's contexts hold none of its answers")
    pos = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(pos, n)
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        out[epochs == e] = perm[offsets[epochs == e]]
    return out


def make_policy_batches(
    triples: Sequence[Mapping[str, Any]],
    length: int,
    batch_size: int,
    *,
    special: SpecialTokens,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    units: str = "token",
    balance: bool = False,
) -> Iterator[PolicyTrainBatch]:
    """Fixed-shape training batches (batches.PolicyTrainBatch) for steps start_step,
    start_step + 1, ..., with "unit_ids" (heuristic.policy_units) unless units == "token" and
    "labels" = `target_mass` (balance). Order: `step_indices`."""
    step = start_step
    while num_steps is None or step < start_step + num_steps:
        idx = step_indices(len(triples), batch_size, seed=seed, step=step)
        host = collate_triples([triples[i] for i in idx], length, special=special)
        batch = {
            "input_ids": host["input_ids"],
            "valid": host["valid"],
            "labels": target_mass(host, balance=balance),
        }
        unit_ids = policy_units(host, units)
        if unit_ids is not None:
            batch["unit_ids"] = unit_ids
        yield batch
        step += 1


def auto_pos_weight(
    triples: Iterable[Mapping[str, Any]], length: int, *, special: SpecialTokens
) -> float:
    """n_negative / n_positive over the maskable tokens of the triples (1.0 without positives)."""
    triples = list(triples)
    batch = collate_triples(triples, length, special=special)
    valid = batch["valid"]
    pos = int(batch["labels"].sum())
    return float((int(valid.sum()) - pos) / pos) if pos else 1.0


# ---------------------------------------------------------------------------------------------
# losses (pure JAX)


def _token_bce_terms(logits, labels, valid, pos_weight):
    x = jnp.where(valid, logits, 0.0)
    y = labels.astype(x.dtype)
    per_token = -(pos_weight * y * jax.nn.log_sigmoid(x) + (1.0 - y) * jax.nn.log_sigmoid(-x))
    w = valid.astype(x.dtype)
    return jnp.sum(per_token * w), jnp.sum(w)


def _span_terms(logits, labels, valid):
    x = jnp.where(valid, logits, _NEG)
    logq = jax.nn.log_softmax(x, axis=-1)
    y = (labels * valid).astype(x.dtype)
    count = jnp.sum(y, axis=-1)
    per_sentence = -jnp.sum(jnp.where(y > 0, y * logq, 0.0), axis=-1) / jnp.maximum(count, 1.0)
    has = (count > 0).astype(x.dtype)
    return jnp.sum(per_sentence * has), jnp.sum(has)


def token_bce_loss(
    logits: jax.Array, labels: jax.Array, valid: jax.Array, pos_weight: float
) -> jax.Array:
    """Mean over valid tokens of -(w y log s + (1 - y) log(1 - s)), s = sigmoid(logit), w =
    pos_weight. logits float [B, L] (may be -inf off valid), labels {0,1} [B, L], valid bool."""
    total, count = _token_bce_terms(logits, labels, valid, pos_weight)
    return total / jnp.maximum(count, 1.0)


def span_softmax_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over sentences with an answer of -sum_i (y_i / |y|) log softmax(logits)_i, the
    softmax taken over the sentence's valid tokens."""
    total, count = _span_terms(logits, labels, valid)
    return total / jnp.maximum(count, 1.0)


def policy_loss_terms(
    net: PolicyNet,
    params: PyTree,
    batch: PolicyTrainBatch,
    *,
    objective: str,
    pos_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(sum of the objective's terms, their count) on a batch: tokens for "token", sentences
    with an answer for "span"; sums over batches give the exact mean over a whole set."""
    logits = net.apply(
        {"params": params}, batch["input_ids"], batch["valid"], batch.get("unit_ids")
    )
    if objective == "token":
        return _token_bce_terms(logits, batch["labels"], batch["valid"], pos_weight)
    if objective == "span":
        return _span_terms(logits, batch["labels"], batch["valid"])
    raise ValueError(f"SupervisedConfig.objective={objective!r}; valid: token, span")


def policy_loss(
    net: PolicyNet,
    params: PyTree,
    batch: PolicyTrainBatch,
    *,
    objective: str,
    pos_weight: float = 1.0,
) -> jax.Array:
    """The supervised objective of `params` on a training batch (make_policy_batches)."""
    total, count = policy_loss_terms(net, params, batch, objective=objective, pos_weight=pos_weight)
    return total / jnp.maximum(count, 1.0)


def make_optimizer(cfg: SupervisedConfig) -> optax.GradientTransformation:
    """Adam at cfg.learning_rate after global-norm clipping (cfg.clip_norm > 0)."""
    adam = optax.adam(cfg.learning_rate)
    return (
        optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam) if cfg.clip_norm > 0 else adam
    )


def make_supervised_step(
    net: PolicyNet, optimizer: optax.GradientTransformation, *, objective: str, pos_weight: float
) -> Callable[[PyTree, PyTree, PolicyTrainBatch], tuple[PyTree, PyTree, jax.Array]]:
    """Pure `step(params, opt_state, batch) -> (params, opt_state, loss)` (jit it)."""

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(
            lambda p: policy_loss(net, p, batch, objective=objective, pos_weight=pos_weight)
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


# ---------------------------------------------------------------------------------------------
# evaluation (host side, through the shared sampler)


def mask_f1(mask: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sentence token F1 [B] between boolean masks and gold labels [B, L]
    (2 |M & G| / (|M| + |G|); 1.0 where both are empty)."""
    m, g = np.asarray(mask, bool), np.asarray(labels) > 0
    tp = (m & g).sum(1)
    total = m.sum(1) + g.sum(1)
    return np.where(total > 0, 2.0 * tp / np.maximum(total, 1), 1.0)


def eval_batches(
    triples: Sequence[Mapping[str, Any]], length: int, batch_size: int, *, special: SpecialTokens
) -> list[TripleBatch]:
    """Host batches of `batch_size` rows (the last padded with empty rows, "rows" = real rows)
    so a jitted scorer sees one shape; example ids are the triples' positions."""
    out = []
    for lo in range(0, len(triples), batch_size):
        chunk = list(triples[lo : lo + batch_size])
        rows = len(chunk)
        # Empty filler rows: only specials, so nothing in them is maskable or gold.
        filler = {
            "input_ids": [special.bos, special.eos],
            "word_ids": [-1, -1],
            "answer_labels": [0, 0],
        }
        chunk += [filler] * (batch_size - rows)
        ids = range(lo, lo + batch_size)
        batch = collate_triples(chunk, length, special=special, example_ids=ids)
        batch["rows"] = rows
        out.append(batch)
    return out


def evaluate_scorer(
    scorer: Scorer,
    batches: Sequence[TripleBatch],
    budget: Mapping[str, Any],
    *,
    draws: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Dev metrics of a scorer's masks under `budget` (sampler kwargs): span_f1 (mean
    per-sentence token F1), answer_precision (micro), answer_recall (micro), mask_rate (masked /
    maskable). draws = 0: zero noise (deterministic top of the ranking); draws > 0: the mean
    over Gumbel draws d = 0..draws-1 (BatchRng(seed, d, example ids))."""
    f1_sum, n, tp, masked, gold, valid = 0.0, 0, 0, 0, 0, 0
    for batch in batches:
        rows = int(batch.get("rows", len(batch["input_ids"])))
        for d in range(max(draws, 1)):
            rng = BatchRng(seed, d, np.asarray(batch["example_ids"]))
            scores, unit_ids = scorer(batch, rng)
            noise = rng.noise(scores.shape[1]) if draws else np.zeros_like(scores)
            mask = sample_mask_np(scores, unit_ids, batch["valid"], noise, **budget)[:rows]
            labels = np.asarray(batch["labels"])[:rows] > 0
            f1_sum += float(mask_f1(mask, labels).sum())
            n += rows
            tp += int((mask & labels).sum())
            masked += int(mask.sum())
            gold += int(labels.sum())
            valid += int(np.asarray(batch["valid"])[:rows].sum())
    return {
        "span_f1": f1_sum / max(n, 1),
        "answer_precision": tp / max(masked, 1),
        "answer_recall": tp / max(gold, 1),
        "mask_rate": masked / max(valid, 1),
    }


# ---------------------------------------------------------------------------------------------
# training


def best_key(record: Mapping[str, float]) -> tuple:
    """Larger is better: span-F1, then the lower dev loss, then the earlier step.

    Span-F1 is a ranking metric that saturates (every answer on top); among equal F1s the
    lower dev loss has the larger margins, so its masks survive the sampler's noise more often.
    """
    return (record["span_f1"], -record["loss"], -record["step"])


def _pos_weight(
    cfg: SupervisedConfig, train: Sequence[Mapping[str, Any]], special: SpecialTokens
) -> float:
    """cfg.pos_weight, or `auto_pos_weight` of the training triples when it is not positive."""
    if cfg.pos_weight > 0:
        return cfg.pos_weight
    return auto_pos_weight(train, cfg.max_length, special=special)


def _train_step(
    update: Callable[[PyTree, PyTree, PolicyTrainBatch], tuple[PyTree, PyTree, jax.Array]],
) -> Callable[[TrainState, Mapping[str, Any], jax.Array], tuple[TrainState, dict[str, Any]]]:
    """`update` (make_supervised_step) as the loop's `step(state, batch, rng)`; the objective
    draws nothing, so rng is unused."""

    def step(state: TrainState, batch: Mapping[str, Any], rng: jax.Array):
        params, opt_state, loss = update(state.params, state.opt_state, batch)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), {"loss": loss}

    return step


def _dev_evaluator(
    net: PolicyNet,
    params: PyTree,
    dev: Sequence[Mapping[str, Any]],
    cfg: SupervisedConfig,
    *,
    special: SpecialTokens,
    budget: Mapping[str, Any],
    pos_weight: float,
) -> Callable[[TrainState], dict[str, float]]:
    """The learner's `evaluate(state)`: the objective ("loss", the exact mean over the dev set)
    and `evaluate_scorer`'s metrics under `budget` (zero noise) of the state's parameters."""
    terms_fn = jax.jit(
        lambda p, b: policy_loss_terms(net, p, b, objective=cfg.objective, pos_weight=pos_weight)
    )
    dev_batches = eval_batches(dev, cfg.max_length, cfg.eval_batch_size, special=special)
    dev_arrays = [
        {
            "input_ids": b["input_ids"],
            "valid": b["valid"],
            "labels": target_mass(b, balance=cfg.balance_targets),
            **({"unit_ids": policy_units(b, cfg.units)} if cfg.units != "token" else {}),
        }
        for b in dev_batches
    ]

    # One jitted forward for every eval; it ranks units as the intermediate stage will.
    scorer = LearnedScorer(net, params, units=cfg.units, scores=cfg.sample_scores)

    def evaluate(state: TrainState) -> dict[str, float]:
        terms = jax.device_get([terms_fn(state.params, b) for b in dev_arrays])
        loss = sum(float(t) for t, _ in terms) / max(sum(float(c) for _, c in terms), 1.0)
        scorer.params = state.params
        return {"loss": loss, **evaluate_scorer(scorer, dev_batches, budget)}

    return evaluate


def supervised_learner(
    net: PolicyNet,
    params: PyTree,
    train_triples: Sequence[Mapping[str, Any]],
    dev_triples: Sequence[Mapping[str, Any]],
    cfg: SupervisedConfig,
    *,
    special: SpecialTokens,
    budget: Mapping[str, Any],
    seed: int,
) -> tuple[Learner, LoopOptions]:
    """The supervised policy as a `loop.train` learner, on token-level triples.

    The dev set is evaluated before training (step 0), every cfg.eval_every steps and at the
    last step: span-F1 under `budget` (the intermediate stage's sampler budget, zero noise;
    module docstring) and the objective ("loss"). The best evaluation (`best_key`) is returned
    by the loop; training stops after cfg.patience evaluations that are not better (0 = never).
    The learner's metadata records pos_weight, num_train and num_dev.
    """
    train = prepare_triples(train_triples, max_triples=cfg.max_triples, seed=seed)
    dev = prepare_triples(dev_triples, max_triples=cfg.max_dev_triples, seed=seed + 1)
    if not dev:
        raise ValueError("no dev triples: span-F1 early stopping needs the dev split's contexts")
    if cfg.max_length > net.max_length:
        raise ValueError(
            f"SupervisedConfig.max_length={cfg.max_length} > the PolicyNet's max_length="
            f"{net.max_length} (MetaConfig.policy_max_length)"
        )
    pos_weight = _pos_weight(cfg, train, special)
    optimizer = make_optimizer(cfg)
    update = make_supervised_step(net, optimizer, objective=cfg.objective, pos_weight=pos_weight)
    evaluate = _dev_evaluator(
        net, params, dev, cfg, special=special, budget=budget, pos_weight=pos_weight
    )

    def init_state() -> TrainState:
        own = jax.tree.map(jnp.array, params)  # our own buffers: the caller's are not donated
        return TrainState(step=jnp.zeros((), jnp.int32), params=own, opt_state=optimizer.init(own))

    def batch_for_step(step: int) -> PolicyTrainBatch:
        return next(
            make_policy_batches(
                train, cfg.max_length, cfg.batch_size, seed=seed, start_step=step,
                num_steps=1, units=cfg.units, special=special, balance=cfg.balance_targets,
            )
        )  # fmt: skip

    learner = Learner(
        init_state=init_state,
        step=jax.jit(_train_step(update), donate_argnums=(0,)),
        batch_for_step=batch_for_step,
        rng=jax.random.key(seed),  # unused: the objective draws nothing
        metadata={
            "supervised": to_dict(cfg),
            "budget": dict(budget),
            "seed": seed,
            "pos_weight": pos_weight,
            "num_train": len(train),
            "num_dev": len(dev),
        },
        compare=("supervised", "budget"),
        defaults={"supervised": to_dict(SupervisedConfig())},
        evaluate=evaluate,
        eval_every=cfg.eval_every,
        best_key=best_key,
        should_stop=patience_stop(best_key, cfg.patience),
    )
    options = LoopOptions(
        num_steps=cfg.steps,
        checkpoint_every=cfg.eval_every,
        log_every=min(cfg.eval_every, 25),
        desc="supervised policy",
    )
    return learner, options


# ---------------------------------------------------------------------------------------------
# driver


def supervised_triples(
    examples: Sequence[Any],
    tokenizer: Any,
    cfg: SupervisedConfig,
    *,
    corpus_sentences: Iterable[str | dict] | None = None,
    ner_labels: Sequence[str] | None = None,
    **corpus_kw: Any,
) -> list[dict[str, Any]]:
    """Token-level triples of a split's examples (their contexts, cut into answer sentences
    unless cfg.sentence_level is False, plus corpus sentences that mention an answer when
    `corpus_sentences` is given), tokenized to cfg.max_length; `ner_labels`: NER entities for
    triples without gold ones (entity units); cfg.targets: whether the question's entities are
    labelled too; cfg.merge_contexts: one triple per text, labelled with every question's
    targets."""
    return policy_triples(
        examples,
        corpus_sentences=corpus_sentences,
        tokenizer=tokenizer,
        max_length=cfg.max_length,
        sentence_level=cfg.sentence_level,
        ner_labels=ner_labels,
        question_entities=cfg.targets == "answers_and_question_entities",
        merge_contexts=cfg.merge_contexts,
        **corpus_kw,
    )
