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

import dataclasses
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from meta_mask.config import MeshConfig, MetaConfig, to_dict
from meta_mask.data import seq2seq
from meta_mask.errors import UserError
from meta_mask.policies import meta, supervised
from meta_mask.policies.heuristic import word_units
from meta_mask.policies.net import LearnedScorer, PolicyNet
from meta_mask.training import sharding
from meta_mask.training.loop import Learner, LoopOptions
from meta_mask.training.steps import TrainState


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
            [triples[i] for i in rows[j * b : (j + 1) * b]],
            length,
            pad_id=pad_id,
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
        inner["unit_ids"] = np.stack([word_units(p["word_ids"], p["valid"]) for p in parts]).astype(
            np.int32
        )
    outer_rows = rows[: cfg.outer_batch_size]
    outer = seq2seq.train_batch(
        qa, outer_rows, pad_id=pad_id, decoder_start_token_id=decoder_start_token_id
    )
    return {"inner": inner, "outer": outer}


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
    """Larger is better: dev span-F1, then the earlier step."""
    return (record["span_f1"], -record["step"])


def meta_learner(
    model: Any,
    theta: Any,
    net: PolicyNet,
    phi: Any,
    train_triples: Sequence[Mapping[str, Any]],
    dev_triples: Sequence[Mapping[str, Any]],
    *,
    tokenizer: Any,
    cfg: MetaConfig,
    budget: Mapping[str, Any],
    seed: int,
    length: int,
    source_length: int,
    target_length: int,
    decoder_start_token_id: int,
    mesh: Mesh | None = None,
) -> tuple[Learner, LoopOptions]:
    """The meta-learned policy as a `loop.train` learner: cfg.meta_steps meta steps from `phi`
    against the LM `theta` (fixed), evaluated on dev every meta_steps // 10 steps by span-F1
    under `budget` (the intermediate stage's), the best evaluation kept.

    Data parallel over `mesh` (default: every device on the data axis): each meta step's
    batches are split over the devices (every host builds the step's global batch, which
    depends only on (seed, step), and contributes its own rows), theta is laid out by
    `sharding.param_shardings` (FSDP when the mesh has fsdp > 1), the policy state replicated.

    `train_triples` / `dev_triples` are token-level triples (data.contexts.add_token_spans:
    input_ids, word_ids, answer_labels, question, answer). cfg.mask_rate is the sampler's rate
    during meta-learning (0: budget["mask_rate"], the deployment rate)."""
    if not train_triples:
        raise ValueError("meta-learning needs (context, question, answer) triples; found none")
    if not cfg.mask_rate:
        if "mask_rate" not in budget:
            raise UserError(
                "meta-learning samples masks at a rate: with --policy.spans_per_sentence set, "
                "set --meta.mask_rate too"
            )
        cfg = dataclasses.replace(cfg, mask_rate=budget["mask_rate"])
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
    mesh = sharding.make_mesh(MeshConfig()) if mesh is None else mesh
    theta_sharding = sharding.param_shardings(theta, mesh)
    theta = sharding.place(theta, theta_sharding)
    meta_step = meta.make_meta_step(setup, mesh=mesh, theta_sharding=theta_sharding)
    replicated = sharding.replicated(mesh)
    dev_batches = supervised.eval_batches(dev_triples, length, 256, pad_id=pad_id)
    scorer = LearnedScorer(net, phi, units=cfg.policy_units)  # one jitted forward for every eval

    def evaluate(state: TrainState) -> dict[str, float]:
        scorer.params = jax.device_get(state.params)
        return supervised.evaluate_scorer(scorer, dev_batches, budget, draws=4, seed=seed)

    def batch_for_step(step: int) -> dict[str, Any]:
        batches = meta_batch(
            train_triples, qa, step, cfg, seed=seed, length=length, pad_id=pad_id,
            decoder_start_token_id=decoder_start_token_id,
        )  # fmt: skip
        return meta.shard_meta_batches(host_rows(batches), mesh)

    def init_state() -> TrainState:
        state = meta.create_meta_state(jax.tree.map(jnp.array, phi), cfg)
        return sharding.place(state, jax.tree.map(lambda _: replicated, state))

    eval_every = max(cfg.meta_steps // 10, 1)
    learner = Learner(
        init_state=init_state,
        step=lambda state, batches, rng: meta_step(state, theta, batches, rng),
        batch_for_step=batch_for_step,
        rng=jax.random.fold_in(jax.random.key(seed), 4),
        metadata={"meta": to_dict(cfg), "budget": dict(budget), "seed": seed},
        compare=("meta", "budget"),
        evaluate=evaluate if dev_batches else None,
        eval_every=eval_every,
        best_key=best_key if dev_batches else None,
    )
    options = LoopOptions(
        num_steps=cfg.meta_steps,
        checkpoint_every=eval_every,
        log_every=eval_every,
        desc="meta-learn policy",
    )
    return learner, options
