"""A learned masking policy's life around its training: its network built for a run's LM,
the learner that trains it (supervised or meta-learned), and its folder on disk (parameters +
policy.json), read back as a Scorer.

    learn_policy/policy/       the PolicyNet's parameters (orbax)
    learn_policy/policy.json   which policy, learned on which task, with which units, and the
                               network's shape (so another run can rebuild it: transfer)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from meta_mask.config import LEARNED_POLICIES, Config, MetaConfig
from meta_mask.errors import UserError
from meta_mask.policies import meta, meta_train, supervised, unroll
from meta_mask.policies import net as net_lib
from meta_mask.special_tokens import SpecialTokens
from meta_mask.training import checkpoint
from meta_mask.training.loop import Learner, LoopOptions

NET_FIELDS = (
    "vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim", "max_length", "embed_dim",
    "freeze_embeddings", "repeat_buckets", "pad_id",
)  # fmt: skip


def init_policy(
    cfg: MetaConfig, lm_params: Any, *, vocab_size: int, pad_id: int, seed: int
) -> tuple[net_lib.PolicyNet, Any]:
    """The PolicyNet `cfg` describes for this LM, and its fresh parameters (the token table a
    copy of the LM's shared embedding when cfg.use_lm_embeddings)."""
    embedding = lm_params["shared"]["embedding"]
    net = net_lib.policy_net_from_config(cfg, vocab_size, embedding.shape[1], pad_id)
    emb = None
    if cfg.use_lm_embeddings:
        if not embedding.is_fully_addressable:  # FSDP across hosts: gather the other shards
            from jax.experimental import multihost_utils

            embedding = multihost_utils.process_allgather(embedding, tiled=True)
        # A host copy: the policy's (donated) state must not share a buffer with the LM's.
        emb = np.array(embedding)
    key = jax.random.fold_in(jax.random.key(seed), 3)
    return net, net_lib.init_policy_params(net, key, lm_embedding=emb)


def policy_learner(
    cfg: Config,
    model: Any,
    theta: Any,
    net: net_lib.PolicyNet,
    phi: Any,
    train: Sequence[Any],
    dev: Sequence[Any],
    *,
    tokenizer: Any,
    special: SpecialTokens,
    corpus_sentences: Sequence[str] | None,
) -> tuple[Learner, LoopOptions, str]:
    """The learner of the run's learned policy (cfg.policy.name: supervised or meta) on the
    task's train / dev examples (their contexts, or `corpus_sentences` that mention an answer),
    its loop options and the units it scores."""
    budget = cfg.policy.budget()
    units = cfg.supervised.units if cfg.policy.name == "supervised" else cfg.meta.policy_units
    # Entity units: gold entities where the task's contexts carry them, else NER spans.
    ner = cfg.policy.salient_labels if units == "entity" else None
    if cfg.policy.name == "supervised":
        scfg = cfg.supervised
        triples = [
            supervised.supervised_triples(
                x, tokenizer, scfg, corpus_sentences=corpus_sentences, ner_labels=ner
            )
            for x in (train, dev)
        ]
        learner, options = supervised.supervised_learner(
            net, phi, *triples, scfg, special=special, budget=budget, seed=cfg.seed
        )
        return learner, options, scfg.units
    if cfg.policy.replace_80_10_10:
        raise UserError(
            "meta-learning corrupts contexts inside a jitted step, where BERT's 80/10/10 "
            "replacement has no form: drop --policy.replace_80_10_10 for --policy.name=meta"
        )
    # Token-level (context, question, answer) triples of the task, at the corpus length.
    # (answer spans only: they are the meta policy's diagnostic, never its target)
    train_t, dev_t = _meta_triples(cfg, train, dev, tokenizer, "answers", ner, corpus_sentences)
    learner, options = meta_train.meta_learner(
        model,
        theta,
        net,
        phi,
        train_t,
        dev_t,
        tokenizer=tokenizer,
        special=special,
        cfg=cfg.meta,
        corrupt=_inner_corruption(cfg, special),
        budget=budget,
        seed=cfg.seed,
        length=cfg.data.mlm_length,
        source_length=cfg.data.source_length,
        target_length=cfg.data.target_length,
    )
    return learner, options, cfg.meta.policy_units


def _meta_triples(
    cfg: Config,
    train: Sequence[Any],
    dev: Sequence[Any],
    tokenizer: Any,
    targets: str,
    ner: Sequence[str] | None,
    corpus_sentences: Sequence[str] | None,
) -> tuple[list, list]:
    """Token-level (context, question, answer) triples of the train and dev examples at the
    corpus length, labelled with `targets` (dev capped at --supervised.max_dev_triples)."""
    scfg = dataclasses.replace(cfg.supervised, max_length=cfg.data.mlm_length, targets=targets)
    train_t, dev_t = (
        supervised.prepare_triples(
            supervised.supervised_triples(
                x, tokenizer, scfg, corpus_sentences=corpus_sentences, ner_labels=ner
            ),
            max_triples=cap,
            seed=cfg.seed,
        )
        for x, cap in ((train, 0), (dev, cfg.supervised.max_dev_triples))
    )
    return train_t, dev_t


def _inner_corruption(cfg: Config, special: SpecialTokens) -> meta.Corrupt:
    """The meta inner step's corruption: exactly the examples the intermediate stage writes."""
    return meta.corruption(
        cfg.policy.output_format,
        cfg.policy.infill,
        special,
        enc_len=cfg.data.mlm_length,
        dec_len=cfg.data.mlm_length
        if cfg.policy.output_format == "full_sentence"
        else cfg.data.mlm_target_length,
    )


def meta_objective_probe(
    cfg: Config,
    model: Any,
    theta: Any,
    net: net_lib.PolicyNet,
    phi: Any,
    train: Sequence[Any],
    dev: Sequence[Any],
    *,
    tokenizer: Any,
    special: SpecialTokens,
    fill: int = 4,
    max_batches: int = 16,
) -> dict:
    """policies/mask_probe.py on the run's dev examples: the meta-objective (the run's meta
    config at its exploration rate, the LM `theta`) of reference masks made from the answers
    and the questions' entities (gold on world tasks). `phi` only shapes the computation."""
    from meta_mask.policies import mask_probe

    mcfg = cfg.meta if cfg.meta.mask_rate else dataclasses.replace(
        cfg.meta, mask_rate=cfg.policy.mask_rate
    )  # fmt: skip
    ner = cfg.policy.salient_labels if mcfg.policy_units == "entity" else None
    train_t, dev_t = _meta_triples(
        cfg, train, dev, tokenizer, "answers_and_question_entities", ner, None
    )
    encode = lambda t: meta_train.encode_questions(  # noqa: E731
        t, tokenizer, special, cfg.data.source_length, cfg.data.target_length
    )
    setup = meta.MetaSetup(
        cfg=mcfg,
        policy_fn=meta.policy_fn_from_net(net),
        lm_loss=unroll.bart_lm_loss(model),
        special=special,
        corrupt=_inner_corruption(cfg, special),
    )
    batches = mask_probe.probe_batches(
        dev_t, encode(dev_t), mcfg, special=special, seed=cfg.seed, length=cfg.data.mlm_length,
        fill=fill, max_batches=max_batches,
        qa_pool=(train_t, encode(train_t)) if mcfg.downstream_steps else None,
    )  # fmt: skip
    return {"fill": fill, **mask_probe.probe(setup, phi, theta, batches)}


def save_policy(
    folder: pathlib.Path,
    net: net_lib.PolicyNet,
    params: Any,
    *,
    cfg: Config,
    units: str,
    scores: str = "logits",
) -> dict[str, Any]:
    """Write the policy's parameters to `folder`/policy (every host: orbax writes together);
    returns the content of its policy.json, for the run's writer to write."""
    checkpoint.save_params(folder / "policy", params, overwrite=True)
    return {
        "policy": cfg.policy.name,
        "task": cfg.data.task,
        "units": units,
        "scores": scores,
        "net": {f: getattr(net, f) for f in NET_FIELDS},
        "parameters": net_lib.count_params(net),
    }


def load_scorer(folder: pathlib.Path, vocab_size: int) -> net_lib.LearnedScorer:
    """The policy learned in `folder` as a Scorer, for a model with `vocab_size` tokens."""
    spec = json.loads((folder / "policy.json").read_text())
    net = net_lib.PolicyNet(**spec["net"])
    if net.vocab_size != vocab_size:
        raise UserError(
            f"the policy in {folder} was learned for a vocabulary of {net.vocab_size} tokens, but "
            f"this run's model has {vocab_size}: transfer needs the same tokenizer"
        )
    params = checkpoint.load_params(folder / "policy")
    # policy.json of runs before `scores` existed: the logits.
    return net_lib.LearnedScorer(
        net, params, units=spec["units"], scores=spec.get("scores", "logits")
    )


def learned_on(cfg: Config) -> str:
    """The task the run's learned policy was learned on ("" for heuristics; "?" when the
    --policy.checkpoint folder does not say)."""
    if cfg.policy.name not in LEARNED_POLICIES:
        return ""
    if not cfg.policy.checkpoint:
        return cfg.data.task
    spec = pathlib.Path(cfg.policy.checkpoint) / "policy.json"
    return json.loads(spec.read_text())["task"] if spec.exists() else "?"
