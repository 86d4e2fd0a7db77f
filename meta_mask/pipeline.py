"""The conductor: one run's stages, in order.

    run(cfg, workdir) -> results

    learn_policy   learned policies only: the supervised or meta-learned masking policy
    intermediate   MLM on the corpus under the masking policy (skipped for policy "none")
    finetune       the downstream task
    evaluate       generation on the eval split, scored with the task's metric

Every trained stage is a learner run by training/loop.py in its own folder `workdir/<stage>/`
(resumed after a kill, bit for bit; skipped once its done.json exists); workdir.py keeps the
run's records and refuses a folder that holds another config. This is the only module that
knows every part; the parts know nothing of each other.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import jax

from meta_mask import config as config_lib
from meta_mask import workdir as workdir_lib
from meta_mask.config import Config
from meta_mask.training.distributed import is_writer

log = logging.getLogger(__name__)

WORLD_CORPUS = "world"


@dataclass
class RunContext:
    """What every stage needs, built once per run."""

    cfg: Config
    workdir: pathlib.Path
    cache_dir: pathlib.Path
    tokenizer: Any
    model_cfg: config_lib.ModelConfig
    model: Any
    init_params: Any
    mesh: Any
    world: Any = None
    _examples: dict = field(default_factory=dict)  # (split, max_examples) -> examples

    def examples(self, split: str, max_examples: int = 0) -> list:
        """The run's task examples of `split` (world tasks come from the run's world), read
        once per run."""
        from meta_mask.data import tasks

        key = (split, max_examples)
        if key not in self._examples:
            self._examples[key] = tasks.load_task(
                self.cfg.data.task,
                split,
                data_dir=self.cfg.data.data_dir or None,
                max_examples=max_examples or None,
                world=self.world,
            )
        return self._examples[key]

    def dev_split(self) -> str:
        from meta_mask.data import tasks

        return tasks.get_task(self.cfg.data.task).dev_split


def build_context(cfg: Config, workdir: pathlib.Path, cache_dir: pathlib.Path) -> RunContext:
    """The tokenizer, the model and its initial parameters on the mesh, the world (if any)."""
    from meta_mask.data import tasks
    from meta_mask.model import bart, hf
    from meta_mask.training import sharding

    world = None
    if cfg.data.corpus == WORLD_CORPUS or tasks.get_task(cfg.data.task).world_variant:
        from meta_mask.data import world as world_lib

        world = world_lib.build_world(cfg.world)
    if cfg.data.tokenizer:
        tokenizer = hf.load_tokenizer(cfg.data.tokenizer, flag="--data.tokenizer")
    elif cfg.init:
        tokenizer = hf.load_tokenizer(cfg.init, flag="--init")
    elif world is not None:
        from meta_mask.data import world_tokenizer

        tokenizer = world_tokenizer.world_tokenizer(world)
    else:
        raise ValueError("no tokenizer: set --data.tokenizer or --init (a Hugging Face BART)")

    mesh = sharding.make_mesh(cfg.mesh)
    if cfg.init:
        model_cfg, params = hf.load_hf(
            cfg.init, flag="--init", dtype=cfg.model.dtype, remat=cfg.model.remat
        )
    else:
        model_cfg = cfg.model
        if len(tokenizer) > model_cfg.vocab_size or model_cfg.vocab_size == 0:
            # The world's vocabulary is only known once its tokenizer is trained.
            model_cfg = model_cfg.replace(vocab_size=len(tokenizer))
        # Created in place in their FSDP layout: never whole on one device.
        params = sharding.init_sharded_params(model_cfg, jax.random.key(cfg.seed), mesh)
    for name in ("pad", "eos", "bos"):
        ours = getattr(model_cfg, f"{name}_token_id")
        theirs = getattr(tokenizer, f"{name}_token_id")
        if ours != theirs:
            raise ValueError(
                f"the tokenizer's {name} id is {theirs} but the model's {name}_token_id is {ours}"
            )
    params = sharding.place(params, sharding.param_shardings(params, mesh))
    return RunContext(
        cfg=cfg,
        workdir=workdir,
        cache_dir=cache_dir,
        tokenizer=tokenizer,
        model_cfg=model_cfg,
        model=bart.Bart(model_cfg),
        init_params=params,
        mesh=mesh,
        world=world,
    )


# ------------------------------------------------------------------------------- stages


def train_stage(
    ctx: RunContext,
    name: str,
    params: Any,
    stage_cfg: config_lib.StageConfig,
    batch_for_step,
    *,
    rng_salt: int,
) -> Any:
    """Train the LM from `params` for the stage's steps in `workdir/<name>` (resuming its
    checkpoints; loading its final params when done); returns the final params."""
    from meta_mask.training import checkpoint, lm_learner, loop

    stage_dir = ctx.workdir / name
    if workdir_lib.stage_done(stage_dir) is not None:
        log.info("stage %s already done; loading its final params", name)
        # Into `params`' layout (each host reads only its shards) when it is on the mesh.
        return checkpoint.load_params(stage_dir / "final", params)
    stage_cfg = lm_learner.resolved(stage_cfg)
    learner = lm_learner.lm_learner(
        ctx.model,
        params,
        stage_cfg,
        mesh=ctx.mesh,
        batch_for_step=batch_for_step,
        rng=jax.random.fold_in(jax.random.key(ctx.cfg.seed), rng_salt),
        metadata={
            "stage": name,
            "model": config_lib.to_dict(ctx.model_cfg),
            "stage_config": config_lib.to_dict(stage_cfg),
            "seed": ctx.cfg.seed,
        },
    )
    start = time.time()
    trained = loop.train(learner, stage_dir, lm_learner.options(stage_cfg, name))
    checkpoint.save_params(stage_dir / "final", trained.state.params, overwrite=True)
    done = {"steps": stage_cfg.steps, "seconds": time.time() - start}
    workdir_lib.write_json(stage_dir / "done.json", done)
    return trained.state.params


def build_corpus(ctx: RunContext):
    """The run's tokenized intermediate corpus (built once, cached by fingerprint)."""
    from meta_mask.data import corpora

    cfg = ctx.cfg

    def build():
        return corpora.build_corpus(
            corpora.source_for(
                cfg.data.corpus, task=cfg.data.task, data_dir=cfg.data.data_dir, world=ctx.world
            ),
            ctx.tokenizer,
            ctx.cache_dir / "corpora",
            max_sentences=cfg.data.max_corpus_sentences or None,
            max_length=cfg.data.mlm_length,
            # Real text has no gold entities: salient spans come from spaCy NER (the world's
            # are gold).
            ner_labels=cfg.policy.salient_labels
            if cfg.policy.name == "salient_spans" and cfg.data.corpus != WORLD_CORPUS
            else None,
        )

    if jax.process_count() == 1:
        return build()
    # Several hosts share the cache folder: the writer builds, the others then load its files
    # (rather than all of them writing the same Arrow files at once).
    from jax.experimental import multihost_utils

    corpus = build() if is_writer() else None
    multihost_utils.sync_global_devices("meta_mask: corpus built")
    return corpus if corpus is not None else build()


def learn_policy_stage(ctx: RunContext, corpus) -> pathlib.Path:
    """The folder of the run's learned policy: learned here (skipped once done) or another
    run's (--policy.checkpoint: transfer)."""
    from meta_mask.errors import UserError
    from meta_mask.policies import learned, meta_train, supervised
    from meta_mask.training import loop

    cfg = ctx.cfg
    folder = pathlib.Path(cfg.policy.checkpoint or ctx.workdir / "learn_policy")
    if workdir_lib.stage_done(folder) is not None:
        return folder
    if cfg.policy.checkpoint:
        raise UserError(
            f"--policy.checkpoint={cfg.policy.checkpoint}: no finished learned policy there "
            "(expected the learn_policy/ folder of a run, with done.json and policy.json)"
        )
    net, phi = learned.init_policy(
        cfg.meta,
        ctx.init_params,
        vocab_size=ctx.model_cfg.vocab_size,
        pad_id=ctx.tokenizer.pad_token_id,
        seed=cfg.seed,
    )
    train = ctx.examples("train", cfg.data.max_train_examples)
    dev = ctx.examples(ctx.dev_split(), cfg.supervised.max_dev_triples)
    # Answer sentences come from the examples' own contexts; without them, from the corpus.
    sentences = None
    if not all(ex.contexts for ex in train):
        sentences = corpus.dataset.select(range(min(len(corpus), 200_000)))["text"]
    budget = cfg.policy.budget()
    if cfg.policy.name == "supervised":
        scfg = cfg.supervised
        triples = [
            supervised.supervised_triples(x, ctx.tokenizer, scfg, corpus_sentences=sentences)
            for x in (train, dev)
        ]
        learner, options = supervised.supervised_learner(
            net, phi, *triples, scfg, budget=budget, seed=cfg.seed
        )
        units = scfg.units
    else:
        # Token-level (context sentence, question, answer) triples of the task.
        scfg = dataclasses.replace(cfg.supervised, max_length=cfg.data.mlm_length)
        train_t, dev_t = (
            supervised.prepare_triples(
                supervised.supervised_triples(x, ctx.tokenizer, scfg, corpus_sentences=sentences),
                max_triples=cap,
                seed=cfg.seed,
            )
            for x, cap in ((train, 0), (dev, cfg.supervised.max_dev_triples))
        )
        learner, options = meta_train.meta_learner(
            ctx.model,
            ctx.init_params,
            net,
            phi,
            train_t,
            dev_t,
            tokenizer=ctx.tokenizer,
            cfg=cfg.meta,
            budget=budget,
            seed=cfg.seed,
            length=cfg.data.mlm_length,
            source_length=cfg.data.source_length,
            target_length=cfg.data.target_length,
            decoder_start_token_id=ctx.model_cfg.decoder_start_token_id,
            mesh=ctx.mesh,
        )
        units = cfg.meta.policy_units
    trained = loop.train(learner, folder, options)
    spec = learned.save_policy(folder, net, trained.state.params, cfg=cfg, units=units)
    workdir_lib.write_json(folder / "policy.json", spec)
    workdir_lib.write_json(folder / "history.json", {**learner.metadata, **trained.history()})
    workdir_lib.write_json(folder / "done.json", {"policy": cfg.policy.name})
    return folder


def intermediate_stage(ctx: RunContext, params: Any, corpus, scorer) -> Any:
    """MLM on the corpus under the run's masking policy, in the chosen output format."""
    from meta_mask.evaluation import report
    from meta_mask.policies import mlm_batches

    cfg = ctx.cfg
    batches = mlm_batches.for_corpus(
        corpus,
        scorer,
        ctx.tokenizer,
        policy=cfg.policy,
        data=cfg.data,
        seed=cfg.seed,
        batch_size=cfg.intermediate.batch_size,
        decoder_start_token_id=ctx.model_cfg.decoder_start_token_id,
    )
    heatmap = ctx.workdir / "intermediate" / "masks.html"
    if is_writer() and not heatmap.exists():
        report.write_mask_examples(heatmap, batches, ctx.tokenizer, cfg.policy)
    return train_stage(ctx, "intermediate", params, cfg.intermediate, batches, rng_salt=1)


def finetune_stage(ctx: RunContext, params: Any) -> Any:
    from meta_mask.data import seq2seq

    cfg = ctx.cfg
    data = seq2seq.encode_examples(
        ctx.examples("train", cfg.data.max_train_examples),
        ctx.tokenizer,
        source_length=cfg.data.source_length,
        target_length=cfg.data.target_length,
    )
    pad = ctx.tokenizer.pad_token_id
    start = ctx.model_cfg.decoder_start_token_id

    def batch_for_step(step: int):
        rows = seq2seq.batch_rows(len(data), cfg.finetune.batch_size, cfg.seed, step)
        rows = seq2seq.local_rows(rows, jax.process_index(), jax.process_count())
        return seq2seq.train_batch(data, rows, pad_id=pad, decoder_start_token_id=start)

    return train_stage(ctx, "finetune", params, cfg.finetune, batch_for_step, rng_salt=2)


def evaluate_stage(ctx: RunContext, params: Any) -> dict:
    """Generate on the eval split, score with the task's metric, write predictions."""
    from meta_mask.data import tasks
    from meta_mask.evaluation import predict

    stage_dir = ctx.workdir / "evaluate"
    done = workdir_lib.stage_done(stage_dir)
    if done is not None:
        return done
    cfg = ctx.cfg
    metric = tasks.get_task(cfg.data.task).metric
    out_dir = stage_dir
    if jax.process_count() > 1:
        # Generation is not sharded: every host decodes all examples from a whole copy of the
        # params (the same result everywhere), and only the writer writes into the workdir.
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
        if not is_writer():
            out_dir = pathlib.Path(tempfile.mkdtemp(prefix="meta_mask_eval_"))
    result = predict.evaluate(
        ctx.model,
        params,
        ctx.model_cfg,
        ctx.tokenizer,
        ctx.examples(cfg.eval.split, cfg.eval.max_examples),
        metric=metric,
        source_length=cfg.data.source_length,
        max_length=cfg.data.target_length,
        eval_cfg=cfg.eval,
        out_dir=out_dir,
        # Closed-book QA: overlap buckets of test answers with the train answers.
        train_examples=ctx.examples("train", cfg.data.max_train_examples)
        if metric == "em_f1"
        else None,
    )
    workdir_lib.write_json(stage_dir / "done.json", result)
    return result


# ---------------------------------------------------------------------------------- run


def run(
    cfg: Config,
    workdir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    argv: list[str] | None = None,
) -> dict:
    """Run (or resume, or skip) every stage of `cfg.stages`; returns the run's results."""
    from meta_mask.evaluation import report
    from meta_mask.policies import heuristic, learned

    workdir = pathlib.Path(workdir)
    finished = workdir_lib.stored_results(cfg, workdir)
    if finished is not None:
        log.info("%s is finished; returning its stored results", workdir)
        return finished
    cache = pathlib.Path(cache_dir) if cache_dir else workdir / "cache"
    ctx = build_context(cfg, workdir, cache)
    ctx.examples("train", cfg.data.max_train_examples)  # bad task data fails before any write
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.record_run(cfg, workdir, argv)
    params = ctx.init_params
    timings: dict[str, float] = {}
    learned_policy = cfg.policy.name in config_lib.LEARNED_POLICIES
    pretrain = "intermediate" in cfg.stages and cfg.policy.name != "none"
    learn = learned_policy and (pretrain or "learn_policy" in cfg.stages)
    corpus = build_corpus(ctx) if pretrain or learn else None
    scorer = None
    if learn:
        t = time.time()
        folder = learn_policy_stage(ctx, corpus)
        scorer = learned.load_scorer(folder, ctx.model_cfg.vocab_size)
        timings["learn_policy"] = time.time() - t
    if pretrain:
        t = time.time()
        scorer = scorer or heuristic.corpus_scorer(cfg.policy, corpus)
        params = intermediate_stage(ctx, params, corpus, scorer)
        timings["intermediate"] = time.time() - t
    if "finetune" in cfg.stages:
        t = time.time()
        params = finetune_stage(ctx, params)
        timings["finetune"] = time.time() - t
    metrics: dict = {}
    if "evaluate" in cfg.stages:
        t = time.time()
        metrics = evaluate_stage(ctx, params)
        timings["evaluate"] = time.time() - t
    results = {
        "task": cfg.data.task,
        "policy": cfg.policy.name,
        "policy_task": learned.learned_on(cfg),
        "output_format": cfg.policy.output_format,
        "seed": cfg.seed,
        "metrics": metrics,
        "seconds": timings,
    }
    if "evaluate" in cfg.stages and is_writer():  # only a complete run has results
        report.write_run_report(workdir, results)
        workdir_lib.write_json_atomic(workdir / "results.json", results)
    return results
