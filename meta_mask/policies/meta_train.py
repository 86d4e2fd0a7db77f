"""Meta-learning a masking policy against a task's downstream loss: the loop around meta.py.

Each meta step draws K x B (context, question, answer) triples of the task's training split,
in an order that depends only on (seed, step). The K inner batches are the contexts (masked
by the policy at the exploration rate, corrupted exactly as the intermediate stage corrupts
its corpus, then K differentiable MLM updates of the LM); the outer loss is the same triples'
questions with their answers (teacher-forced cross-entropy of the updated LM) minus that of
questions about other contexts (contrastive). Pairing asks which tokens of a context, when
masked and learned, most help to answer the questions about that context (the paper's
figure); the contrast cancels what an MLM step does for every question alike.

The LM theta is fixed for all meta steps: a warm one that answers questions but knows
nothing of the task's facts (the synthetic world's generic LM fine-tuned on its generic
population's questions; a pre-trained checkpoint on real tasks). With a random LM the
meta-gradient only aligns output embeddings (it then favours tokens shared by many answers,
e.g. "Systems" in "Vopor Systems"). The policy is selected by its dev meta-objective alone.

Data parallel: each meta step's batches are split over the mesh's devices (every host builds
the step's global batch, which depends only on (seed, step), and contributes its own rows;
`host_rows`), theta is laid out by `sharding.param_shardings` (FSDP when the mesh has
fsdp > 1) and the policy's state is replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from meta_mask.batches import MetaBatches
from meta_mask.config import MeshConfig, MetaConfig, to_dict
from meta_mask.data import seq2seq
from meta_mask.errors import UserError
from meta_mask.policies import heuristic, meta, meta_step, supervised, unroll
from meta_mask.policies.net import LearnedScorer, PolicyNet
from meta_mask.special_tokens import SpecialTokens
from meta_mask.training import sharding
from meta_mask.training.loop import Learner, LoopOptions
from meta_mask.training.steps import TrainState


def _others(
    triples: Sequence[Mapping[str, Any]],
    contexts: str,
    skip: set[int],
    count: int,
    order: np.ndarray,
) -> np.ndarray:
    """`count` rows of `triples` in `order`, not in `skip`, whose answers appear nowhere in
    `contexts` (case-folded): questions the inner steps' contexts cannot teach."""
    skip = set(skip)
    out = []
    for i in order:
        if int(i) not in skip and str(triples[i]["answer"]).casefold() not in contexts:
            out.append(int(i))
            skip.add(int(i))
            if len(out) == count:
                return np.asarray(out)
    raise UserError(
        f"meta-learning needs {count} questions whose answers are not in the step's "
        f"contexts; only {len(out)} of {len(triples)} qualify: lower "
        "--meta.inner_batch_size / --meta.outer_batch_size"
    )


def inner_rows(n: int, cfg: MetaConfig, *, seed: int, step: int) -> np.ndarray:
    """The triples of meta step `step`'s K inner batches, [K * B] (batch k = rows [kB, (k+1)B)):
    K consecutive batches of the seeded data order, or with cfg.inner_repeat one batch K times."""
    k, b = cfg.inner_steps, cfg.inner_batch_size
    if cfg.inner_repeat:
        return np.tile(supervised.step_indices(n, b, seed=seed, step=step), k)
    return supervised.step_indices(n, k * b, seed=seed, step=step)


def distinct_contexts(cfg: MetaConfig) -> int:
    """How many different contexts one meta step's inner batches hold."""
    return cfg.inner_batch_size * (1 if cfg.inner_repeat else cfg.inner_steps)


def meta_batch(
    triples: Sequence[Mapping[str, Any]],
    qa: seq2seq.EncodedExamples,
    step: int,
    cfg: MetaConfig,
    *,
    special: SpecialTokens,
    seed: int,
    length: int,
    qa_pool: tuple[Sequence[Mapping[str, Any]], seq2seq.EncodedExamples] | None = None,
) -> MetaBatches:
    """The batches of meta step `step` (batches.MetaBatches), a pure function of (seed, step):
    K inner batches of B contexts [K, B, L] (with the policy's units), the first
    outer_batch_size of them's own questions ("outer"), with `cfg.contrastive` as many
    questions about other contexts ("contrast"), and with downstream_steps = N > 0 N *
    outer_batch_size yet other questions ("qa", the N QA steps' batches one after another),
    drawn from `qa_pool` (triples, encoded) when given: the dev batches take their QA steps'
    questions from the training split, as fine-tuning would."""
    k, b = cfg.inner_steps, cfg.inner_batch_size
    rows = inner_rows(len(triples), cfg, seed=seed, step=step)
    parts = [
        supervised.collate_triples(
            [triples[i] for i in rows[j * b : (j + 1) * b]],
            length,
            special=special,
            example_ids=rows[j * b : (j + 1) * b],
        )  # fmt: skip
        for j in range(k)
    ]
    inner = {
        "input_ids": np.stack([p["input_ids"] for p in parts]).astype(np.int32),
        "valid": np.stack([p["valid"] for p in parts]),
        "example_ids": np.stack([np.asarray(p["example_ids"]) for p in parts]).astype(np.int32),
    }
    if cfg.policy_units != "token":  # as LearnedScorer(units=...) pools them
        units = [heuristic.policy_units(p, cfg.policy_units) for p in parts]
        inner["unit_ids"] = np.stack(units).astype(np.int32)
    n_out = cfg.outer_batch_size
    out: MetaBatches = {
        "inner": inner,
        "outer": seq2seq.train_batch(qa, rows[:n_out], special=special),
    }
    order = np.random.default_rng([seed, step, 1]).permutation(len(triples))
    taken = [int(i) for i in rows]
    if cfg.contrastive:
        contexts = " ".join(str(triples[i]["text"]).casefold() for i in taken)
        contrast = _others(triples, contexts, set(taken), n_out, order)
        out["contrast"] = seq2seq.train_batch(qa, contrast, special=special)
        taken += [int(i) for i in contrast]
    if cfg.downstream_steps:
        contexts = " ".join(str(triples[i]["text"]).casefold() for i in taken)
        if qa_pool is None:
            pool, pool_qa, skip, pool_order = triples, qa, set(taken), order
        else:
            pool, pool_qa = qa_pool
            skip, pool_order = set(), np.random.default_rng([seed, step, 2]).permutation(len(pool))
        rows_qa = _others(pool, contexts, skip, cfg.downstream_steps * n_out, pool_order)
        out["qa"] = seq2seq.train_batch(pool_qa, rows_qa, special=special)
    return out


def host_rows(batches: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """This process's contiguous block of every batch dimension (axis 1 of the "inner" [K,B,L]
    arrays, axis 0 of the others): what `meta_step.shard_meta_batches` assembles into global
    arrays. The whole batch in a single-process run."""
    index, count = jax.process_index(), jax.process_count()

    def rows(value: np.ndarray, dim: int) -> np.ndarray:
        keep = seq2seq.local_rows(np.arange(value.shape[dim]), index, count)
        return np.take(value, keep, axis=dim)

    return {
        name: {k: rows(np.asarray(v), int(name == "inner")) for k, v in part.items()}
        for name, part in batches.items()
    }


def best_key(record: Mapping[str, float]) -> tuple:
    """Larger is better: the lower dev meta-objective, then the earlier step."""
    return (-record["objective"], -record["step"])


def meta_learner(
    model: Any,
    theta: Any,
    net: PolicyNet,
    phi: Any,
    train_triples: Sequence[Mapping[str, Any]],
    dev_triples: Sequence[Mapping[str, Any]],
    *,
    tokenizer: Any,
    special: SpecialTokens,
    cfg: MetaConfig,
    corrupt: meta.Corrupt,
    budget: Mapping[str, Any],
    seed: int,
    length: int,
    source_length: int,
    target_length: int,
    dev_batches: int = 16,
    mesh: Mesh | None = None,
) -> tuple[Learner, LoopOptions]:
    """The meta-learned policy as a `loop.train` learner: cfg.meta_steps meta steps from `phi`
    against the LM `theta` (fixed), whose inner steps corrupt contexts with `corrupt` (the
    intermediate stage's format: meta.corruption).

    Selection uses only the downstream loss: every meta_steps // 10 steps the dev
    meta-objective (`_dev_evaluator`, on up to `dev_batches` fixed dev batches) is measured and
    the best step kept; the masks' span-F1 against gold answers is a diagnostic only.
    `train_triples` / `dev_triples`: token-level triples (data.contexts.add_token_spans).
    cfg.mask_rate is the sampler's rate during meta-learning (0: budget["mask_rate"]).
    Data parallel over `mesh` (default: every device on the data axis; see the module doc)."""
    cfg = _checked(cfg, budget, train_triples, dev_triples)
    qa, dev_qa = (
        encode_questions(t, tokenizer, special, source_length, target_length)
        for t in (train_triples, dev_triples)
    )
    setup = meta.MetaSetup(
        cfg=cfg,
        policy_fn=meta.policy_fn_from_net(net),
        lm_loss=unroll.bart_lm_loss(model),
        special=special,
        corrupt=corrupt,
    )
    mesh = sharding.make_mesh(MeshConfig()) if mesh is None else mesh
    theta_sharding = sharding.param_shardings(theta, mesh)
    theta = sharding.place(theta, theta_sharding)
    step_fn = meta_step.make_meta_step(setup, mesh=mesh, theta_sharding=theta_sharding)
    rng = jax.random.fold_in(jax.random.key(seed), 4)
    dev = [
        meta_step.shard_meta_batches(host_rows(batches), mesh)
        for batches in _dev_batches(
            dev_triples, dev_qa, cfg, special, seed, length, dev_batches, (train_triples, qa)
        )
    ]
    evaluate = _dev_evaluator(
        setup, theta, dev, rng, net, phi, dev_triples, budget, special, seed, length
    )

    def batch_for_step(step: int) -> MetaBatches:
        batches = meta_batch(
            train_triples, qa, step, cfg, special=special, seed=seed, length=length
        )
        return meta_step.shard_meta_batches(host_rows(batches), mesh)

    eval_every = max(cfg.meta_steps // 10, 1)
    learner = Learner(
        init_state=lambda: _replicated_state(phi, cfg, mesh),
        step=lambda state, batches, rng: step_fn(state, theta, batches, rng),
        batch_for_step=batch_for_step,
        rng=rng,
        metadata={"meta": to_dict(cfg), "budget": dict(budget), "seed": seed},
        compare=("meta", "budget"),
        defaults={"meta": to_dict(MetaConfig())},
        evaluate=evaluate,
        eval_every=eval_every,
        best_key=best_key if cfg.select == "dev_objective" else None,
    )
    options = LoopOptions(
        num_steps=cfg.meta_steps,
        checkpoint_every=eval_every,
        log_every=min(eval_every, 10),
        desc="meta-learn policy",
    )
    return learner, options


def _checked(
    cfg: MetaConfig,
    budget: Mapping[str, Any],
    train_triples: Sequence[Mapping[str, Any]],
    dev_triples: Sequence[Mapping[str, Any]],
) -> MetaConfig:
    """cfg with its sampling rate resolved (cfg.mask_rate, or 0 = the deployment budget's),
    after checking that both splits have triples."""
    if not train_triples or not dev_triples:
        raise UserError(
            "meta-learning needs (context, question, answer) triples of the train and dev "
            f"splits; found {len(train_triples)} and {len(dev_triples)}"
        )
    if cfg.mask_rate:
        return cfg
    if "mask_rate" not in budget:
        raise UserError(
            "meta-learning samples masks at a rate: with --policy.spans_per_sentence set, "
            "set --meta.mask_rate too"
        )
    return dataclasses.replace(cfg, mask_rate=budget["mask_rate"])


def _replicated_state(phi: Any, cfg: MetaConfig, mesh: Mesh) -> TrainState:
    """The policy's initial meta state (params and Adam), replicated on every device."""
    state = meta_step.create_meta_state(jax.tree.map(jnp.array, phi), cfg)
    replicated = sharding.replicated(mesh)
    return sharding.place(state, jax.tree.map(lambda _: replicated, state))


def encode_questions(
    triples: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    special: SpecialTokens,
    source_length: int,
    target_length: int,
) -> dict[str, np.ndarray]:
    """The triples' (question, answer) pairs as seq2seq arrays (the outer loss's examples)."""
    pairs = [SimpleNamespace(source=t["question"], targets=[t["answer"]]) for t in triples]
    return seq2seq.encode_examples(
        pairs, tokenizer, special=special, source_length=source_length,
        target_length=target_length,
    )  # fmt: skip


def _dev_batches(
    dev_triples: Sequence[Mapping[str, Any]],
    dev_qa: Mapping[str, np.ndarray],
    cfg: MetaConfig,
    special: SpecialTokens,
    seed: int,
    length: int,
    max_batches: int,
    qa_pool: tuple[Sequence[Mapping[str, Any]], seq2seq.EncodedExamples],
) -> list[MetaBatches]:
    """Up to `max_batches` fixed meta batches of the dev triples (their own data order; the QA
    step's questions from `qa_pool`, the training split)."""
    n = min(max_batches, max(len(dev_triples) // distinct_contexts(cfg), 1))
    return [
        meta_batch(
            dev_triples,
            dev_qa,
            i,
            cfg,
            special=special,
            seed=seed + 1,
            length=length,
            qa_pool=qa_pool,
        )  # fmt: skip
        for i in range(n)
    ]


def _dev_evaluator(
    setup: meta.MetaSetup,
    theta: Any,
    dev: Sequence[MetaBatches],
    rng: jax.Array,
    net: PolicyNet,
    phi: Any,
    dev_triples: Sequence[Mapping[str, Any]],
    budget: Mapping[str, Any],
    special: SpecialTokens,
    seed: int,
    length: int,
):
    """evaluate(state): the dev meta-objective (mean over `dev`, fixed noise per batch; the
    selector) and the masks' span-F1 against the gold answers under `budget` (a diagnostic)."""
    objective = meta_step.make_meta_objective(setup)
    gold = supervised.eval_batches(dev_triples, length, 256, special=special)
    scorer = LearnedScorer(net, phi, units=setup.cfg.policy_units)  # one jitted forward

    def evaluate(state: TrainState) -> dict[str, float]:
        runs = [objective(state.params, theta, d, rng, i) for i, d in enumerate(dev)]
        means = {k: float(np.mean([float(r[k]) for r in runs])) for k in runs[0]}
        scorer.params = jax.device_get(state.params)
        spans = supervised.evaluate_scorer(scorer, gold, budget, draws=4, seed=seed)
        return {"objective": means.pop("outer_loss"), **means, **spans}

    return evaluate
