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
from meta_mask.policies import heuristic, meta, supervised
from meta_mask.policies.net import LearnedScorer, PolicyNet
from meta_mask.special_tokens import SpecialTokens
from meta_mask.training import sharding
from meta_mask.training.loop import Learner, LoopOptions
from meta_mask.training.steps import TrainState


def _others(
    triples: Sequence[Mapping[str, Any]],
    taken: Sequence[int],
    count: int,
    order: np.ndarray,
) -> np.ndarray:
    """`count` rows in `order` whose answers appear in none of the `taken` rows' contexts (and
    are not taken): questions the inner steps' contexts cannot teach."""
    texts = " ".join(str(triples[i]["text"]).casefold() for i in taken)
    skip = set(int(i) for i in taken)
    out = []
    for i in order:
        if int(i) not in skip and str(triples[i]["answer"]).casefold() not in texts:
            out.append(int(i))
            skip.add(int(i))
            if len(out) == count:
                return np.asarray(out)
    raise UserError(
        f"meta-learning needs {count} questions whose answers are not in the step's "
        f"{len(taken)} contexts; only {len(out)} of {len(triples)} qualify: lower "
        "--meta.inner_batch_size / --meta.outer_batch_size"
    )


def meta_batch(
    triples: Sequence[Mapping[str, Any]],
    qa: seq2seq.EncodedExamples,
    step: int,
    cfg: MetaConfig,
    *,
    special: SpecialTokens,
    seed: int,
    length: int,
) -> MetaBatches:
    """The batches of meta step `step` (batches.MetaBatches), a pure function of (seed, step):
    K inner batches of B contexts [K, B, L] (with the policy's units), the first
    outer_batch_size of them's own questions ("outer"), with `cfg.contrastive` as many
    questions about other contexts ("contrast"), and with downstream_steps = 1 a QA batch of
    yet other questions ("qa")."""
    k, b = cfg.inner_steps, cfg.inner_batch_size
    rows = supervised.step_indices(len(triples), k * b, seed=seed, step=step)
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
    taken = list(rows)
    if cfg.contrastive:
        contrast = _others(triples, taken, n_out, order)
        out["contrast"] = seq2seq.train_batch(qa, contrast, special=special)
        taken += list(contrast)
    if cfg.downstream_steps:
        out["qa"] = seq2seq.train_batch(qa, _others(triples, taken, n_out, order), special=special)
    return out


def host_rows(batches: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """This process's contiguous block of every batch dimension (axis 1 of the "inner" [K,B,L]
    arrays, axis 0 of the others): what `meta.shard_meta_batches` assembles into global
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

    Selection uses only what the paper uses, the downstream loss: every meta_steps // 10 steps
    the dev meta-objective (the meta step's outer loss on up to `dev_batches` fixed batches of
    dev contexts and questions, fixed masks' noise) is measured and the best step is kept. The
    masks' span-F1 against the gold answer tokens under the deployment `budget` is reported
    beside it, a diagnostic only.

    `train_triples` / `dev_triples` are token-level triples (data.contexts.add_token_spans:
    input_ids, word_ids, answer_labels, question, answer; entity_spans for entity units).
    cfg.mask_rate is the sampler's rate during meta-learning (0: budget["mask_rate"]).

    Data parallel over `mesh` (default: every device on the data axis): each meta step's
    batches are split over the devices (every host builds the step's global batch, which
    depends only on (seed, step), and contributes its own rows), theta is laid out by
    `sharding.param_shardings` (FSDP when the mesh has fsdp > 1), the policy state replicated."""
    if not train_triples or not dev_triples:
        raise UserError(
            "meta-learning needs (context, question, answer) triples of the train and dev "
            f"splits; found {len(train_triples)} and {len(dev_triples)}"
        )
    if not cfg.mask_rate:
        if "mask_rate" not in budget:
            raise UserError(
                "meta-learning samples masks at a rate: with --policy.spans_per_sentence set, "
                "set --meta.mask_rate too"
            )
        cfg = dataclasses.replace(cfg, mask_rate=budget["mask_rate"])

    def encode(triples):
        pairs = [SimpleNamespace(source=t["question"], targets=[t["answer"]]) for t in triples]
        return seq2seq.encode_examples(
            pairs, tokenizer, special=special, source_length=source_length,
            target_length=target_length,
        )  # fmt: skip

    qa, dev_qa = encode(train_triples), encode(dev_triples)
    setup = meta.MetaSetup(
        cfg=cfg,
        policy_fn=meta.policy_fn_from_net(net),
        lm_loss=meta.bart_lm_loss(model),
        special=special,
        corrupt=corrupt,
    )
    mesh = sharding.make_mesh(MeshConfig()) if mesh is None else mesh
    theta_sharding = sharding.param_shardings(theta, mesh)
    theta = sharding.place(theta, theta_sharding)
    meta_step = meta.make_meta_step(setup, mesh=mesh, theta_sharding=theta_sharding)
    replicated = sharding.replicated(mesh)
    objective = meta.make_meta_objective(setup)
    rng = jax.random.fold_in(jax.random.key(seed), 4)
    n_dev = min(dev_batches, max(len(dev_triples) // (cfg.inner_steps * cfg.inner_batch_size), 1))
    dev = [
        meta.shard_meta_batches(
            host_rows(
                meta_batch(
                    dev_triples, dev_qa, i, cfg, special=special, seed=seed + 1, length=length
                )
            ),
            mesh,
        )
        for i in range(n_dev)
    ]
    gold = supervised.eval_batches(dev_triples, length, 256, special=special)
    scorer = LearnedScorer(net, phi, units=cfg.policy_units)  # one jitted forward for every eval

    def evaluate(state: TrainState) -> dict[str, float]:
        runs = [objective(state.params, theta, d, rng, i) for i, d in enumerate(dev)]
        means = {k: float(np.mean([float(r[k]) for r in runs])) for k in runs[0]}
        scorer.params = jax.device_get(state.params)
        spans = supervised.evaluate_scorer(scorer, gold, budget, draws=4, seed=seed)
        return {"objective": means.pop("outer_loss"), **means, **spans}

    def batch_for_step(step: int) -> MetaBatches:
        batches = meta_batch(
            train_triples, qa, step, cfg, special=special, seed=seed, length=length
        )
        return meta.shard_meta_batches(host_rows(batches), mesh)

    def init_state() -> TrainState:
        state = meta.create_meta_state(jax.tree.map(jnp.array, phi), cfg)
        return sharding.place(state, jax.tree.map(lambda _: replicated, state))

    eval_every = max(cfg.meta_steps // 10, 1)
    learner = Learner(
        init_state=init_state,
        step=lambda state, batches, rng: meta_step(state, theta, batches, rng),
        batch_for_step=batch_for_step,
        rng=rng,
        metadata={"meta": to_dict(cfg), "budget": dict(budget), "seed": seed},
        compare=("meta", "budget"),
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
