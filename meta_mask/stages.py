"""The stages of a run, each a function of the RunContext (context.py) and the parameters the
previous stage produced; pipeline.run calls them in order.

Every trained stage is a learner run by training/loop.py in its own folder (resumed after a
kill, bit for bit; skipped once its done.json exists): `workdir/<stage>/`, or for the stages
a sweep's runs of one seed share (the generic LM and the meta-learning LM) a folder under the
cache named by a fingerprint of what they depend on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import tempfile
import time
from typing import Any

import jax

from meta_mask import config as config_lib
from meta_mask import workdir as workdir_lib
from meta_mask.context import WORLD_CORPUS, RunContext
from meta_mask.errors import UserError
from meta_mask.training.distributed import is_writer

log = logging.getLogger(__name__)


def train_stage(
    ctx: RunContext,
    name: str | pathlib.Path,
    params: Any,
    stage_cfg: config_lib.StageConfig,
    batch_for_step,
    *,
    rng_salt: int,
    dev_score=None,
    select_by: str = "",
) -> Any:
    """Train the LM from `params` for the stage's steps in `workdir/<name>` (or the folder
    `name`, a shared stage's), resuming its checkpoints or loading its final params when done;
    returns the final params (the best dev step's with stage_cfg.eval_every > 0:
    `dev_score(params)` -> metrics, best `select_by`)."""
    from meta_mask.training import checkpoint, lm_learner, loop

    stage_dir = ctx.workdir / name
    with _one_run_at_a_time(stage_dir, shared=isinstance(name, pathlib.Path)):
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
                "stage": stage_dir.name,
                "model": config_lib.to_dict(ctx.model_cfg),
                "stage_config": config_lib.to_dict(stage_cfg),
                "seed": ctx.cfg.seed,
            },
            dev_score=dev_score,
            select_by=select_by,
        )
        start = time.time()
        desc = name if isinstance(name, str) else stage_dir.parent.name
        trained = loop.train(learner, stage_dir, lm_learner.options(stage_cfg, desc))
        checkpoint.save_params(stage_dir / "final", trained.state.params, overwrite=True)
        done = {"steps": stage_cfg.steps, "seconds": time.time() - start, **trained.history()}
        workdir_lib.write_json(stage_dir / "done.json", done)
        return trained.state.params


def _one_run_at_a_time(stage_dir: pathlib.Path, *, shared: bool):
    """A shared stage (under the cache) is trained by one of the runs that need it at a time
    (workdir.exclusive); not across the hosts of one run, which train it together."""
    if not shared or jax.process_count() > 1:
        return contextlib.nullcontext()
    return workdir_lib.exclusive(
        stage_dir, on_wait=lambda: log.info("waiting for another run training %s", stage_dir)
    )


def generic_stage(ctx: RunContext) -> Any:
    """MLM on the world's generic population from the initial parameters: the generic LM
    (the world's stand-in for a pre-trained BART), shared by every run of the seed."""
    cfg = ctx.cfg
    batches = _generic_biographies(ctx, cfg.generic.train.batch_size)
    every = cfg.generic.qa_every  # mixed training: the generic population's questions too
    if every:
        batches = mixed_batches(batches, _generic_questions(ctx, cfg.generic.train), every, ctx)
    policy = cfg.generic.policy
    folder = ctx.shared_dir("generic", cfg.generic.train, policy, *([every] if every else []))
    return train_stage(ctx, folder, ctx.init_params, cfg.generic.train, batches, rng_salt=5)


def _generic_biographies(ctx: RunContext, batch_size: int):
    """Step -> an MLM batch of the generic population's biographies, masked by generic.policy."""
    from meta_mask.policies import heuristic, mlm_batches

    corpus = ctx.corpus("generic")
    policy = ctx.cfg.generic.policy
    return mlm_batches.for_corpus(
        corpus,
        heuristic.corpus_scorer(policy, corpus),
        ctx.tokenizer,
        special=ctx.special,
        policy=policy,
        data=ctx.cfg.data,
        seed=ctx.cfg.seed,
        batch_size=batch_size,
    )


def mixed_batches(mlm, qa, every: int, ctx: RunContext):
    """Step -> the MLM batch, except that every `every`-th step is a batch of the `qa` stream
    (questions, or another corpus's MLM batches) padded to the MLM batch's shape (one compiled
    step). Both streams keep their own consecutive order: a pure function of the step."""
    from meta_mask.data import seq2seq

    shapes: list = []  # the MLM batch's shapes (step 0's), read once

    def batch_for_step(step: int):
        if (step + 1) % every:
            return mlm(step - (step + 1) // every)
        shapes[:] = shapes or [mlm(0)]
        return seq2seq.pad_batch(qa(step // every), shapes[0], pad=ctx.special.pad)

    return batch_for_step


def generic_qa_stage(ctx: RunContext, generic: Any) -> Any:
    """The generic LM fine-tuned on the generic population's questions: the LM a meta-learned
    policy is learned against. Its checks.json records that it answers those questions and
    not the task's (dev) ones: it knows how to answer, not the task's facts."""
    from meta_mask.data import tasks, world
    from meta_mask.evaluation import predict

    cfg = ctx.cfg
    mixed = (cfg.generic.qa_every,) if cfg.generic.qa_every else ()  # the generic LM's recipe
    folder = ctx.shared_dir(
        "generic_qa", cfg.generic.train, cfg.generic.policy, cfg.generic.qa, *mixed
    )
    examples = tasks.load_task(world.GENERIC_QA_TASK, "train", world=ctx.world)
    params = train_stage(
        ctx, folder, generic, cfg.generic.qa, finetune_batches(ctx, examples, cfg.generic.qa),
        rng_salt=6,
    )  # fmt: skip
    if workdir_lib.stage_done(folder) is not None and not (folder / "checks.json").exists():
        checks = {}
        for name, exs in (("generic_em", examples), ("task_dev_em", ctx.examples("dev"))):
            score = predict.dev_scorer(
                ctx.model, ctx.model_cfg, ctx.tokenizer, exs, special=ctx.special, metric="em_f1",
                source_length=cfg.data.source_length, max_length=cfg.data.target_length,
                eval_cfg=cfg.eval,
            )  # fmt: skip
            checks[name] = score(params)["em"]
        log.info("the meta-learning LM: EM %.3f on the generic population's questions (its "
                 "training), %.3f on the task's dev people", checks["generic_em"],
                 checks["task_dev_em"])  # fmt: skip
        workdir_lib.write_json(folder / "checks.json", checks)
    return params


def learn_policy_stage(ctx: RunContext, corpus, theta: Any) -> pathlib.Path:
    """The folder of the run's learned policy: learned here against the LM `theta` (skipped
    once done) or another run's (--policy.checkpoint: transfer)."""
    from meta_mask.policies import learned
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
        theta,
        vocab_size=ctx.model_cfg.vocab_size,
        pad_id=ctx.special.pad,
        seed=cfg.seed,
    )
    train = ctx.examples("train", cfg.data.max_train_examples)
    dev = ctx.examples(ctx.dev_split(), cfg.supervised.max_dev_triples)
    # Answer sentences come from the examples' own contexts; without them, from the corpus.
    sentences = None
    if not all(ex.contexts for ex in train):
        sentences = corpus.dataset.select(range(min(len(corpus), 200_000)))["text"]
    learner, options, units = learned.policy_learner(
        cfg, ctx.model, theta, net, phi, train, dev,
        tokenizer=ctx.tokenizer, special=ctx.special, corpus_sentences=sentences,
    )  # fmt: skip
    trained = loop.train(learner, folder, options)
    # What the sampler ranks the units by (a meta-learned policy's logits are its scores).
    scores = cfg.supervised.sample_scores if cfg.policy.name == "supervised" else "logits"
    spec = learned.save_policy(
        folder, net, trained.state.params, cfg=cfg, units=units, scores=scores
    )
    if cfg.policy.name == "meta" and ctx.world is not None:  # gold subjects: world tasks
        probe = learned.meta_objective_probe(
            cfg, ctx.model, theta, net, trained.state.params, train, dev,
            tokenizer=ctx.tokenizer, special=ctx.special,
        )  # fmt: skip
        workdir_lib.write_json(folder / "mask_probe.json", probe)
    workdir_lib.write_json(folder / "policy.json", spec)
    workdir_lib.write_json(folder / "history.json", {**learner.metadata, **trained.history()})
    workdir_lib.write_json(folder / "done.json", {"policy": cfg.policy.name})
    return folder


def intermediate_stage(ctx: RunContext, params: Any, corpus, scorer) -> Any:
    """MLM on the corpus under the run's masking policy, in the chosen output format."""
    from meta_mask.evaluation import report

    cfg = ctx.cfg
    policy_batches, steps = intermediate_batches(ctx, corpus, scorer)
    heatmap = ctx.workdir / "intermediate" / "masks.html"
    if is_writer() and not heatmap.exists():
        report.write_mask_examples(heatmap, policy_batches, ctx.tokenizer, cfg.policy)
    return train_stage(ctx, "intermediate", params, cfg.intermediate, steps, rng_salt=1)


def intermediate_batches(ctx: RunContext, corpus, scorer):
    """(the policy's MlmBatches of the corpus, step -> the intermediate stage's batch): the
    policy's batches, with the generic population's questions (generic.intermediate_qa_every)
    and biographies (generic.intermediate_replay_every) in their steps."""
    from meta_mask.policies import mlm_batches

    cfg = ctx.cfg
    policy_batches = mlm_batches.for_corpus(
        corpus,
        scorer,
        ctx.tokenizer,
        special=ctx.special,
        policy=cfg.policy,
        data=cfg.data,
        seed=cfg.seed,
        batch_size=cfg.intermediate.batch_size,
    )
    steps, every = policy_batches, cfg.generic.intermediate_qa_every
    if every:  # mixed: the generic population's questions in every `every`-th step
        steps = mixed_batches(steps, _generic_questions(ctx, cfg.intermediate), every, ctx)
    replay = cfg.generic.intermediate_replay_every
    if replay:  # the generic population's biographies in every `replay`-th step
        generic = _generic_biographies(ctx, cfg.intermediate.batch_size)
        steps = mixed_batches(steps, generic, replay, ctx)
    return policy_batches, steps


def _generic_questions(ctx: RunContext, stage_cfg):
    """Step -> a batch of the generic population's questions (stage_cfg.batch_size rows)."""
    from meta_mask.data import tasks, world

    questions = tasks.load_task(world.GENERIC_QA_TASK, "train", world=ctx.world)
    return finetune_batches(ctx, questions, stage_cfg)


def finetune_batches(ctx: RunContext, examples, stage_cfg):
    """Step -> this host's rows of the seq2seq batch of `examples` (order from seed and step)."""
    from meta_mask.data import seq2seq

    cfg = ctx.cfg
    data = seq2seq.encode_examples(
        examples,
        ctx.tokenizer,
        special=ctx.special,
        source_length=cfg.data.source_length,
        target_length=cfg.data.target_length,
    )

    def batch_for_step(step: int):
        rows = seq2seq.batch_rows(len(data), stage_cfg.batch_size, cfg.seed, step)
        rows = seq2seq.local_rows(rows, jax.process_index(), jax.process_count())
        return seq2seq.train_batch(data, rows, special=ctx.special)

    return batch_for_step


def finetune_stage(ctx: RunContext, params: Any) -> Any:
    """Fine-tuning on the task's train split; with --finetune.eval_every, the step with the
    best dev score (the task's main metric, by generation) is kept."""
    from meta_mask.data import tasks
    from meta_mask.evaluation import predict

    cfg = ctx.cfg
    batch_for_step = finetune_batches(
        ctx, ctx.examples("train", cfg.data.max_train_examples), cfg.finetune
    )
    dev_score, metric = None, tasks.get_task(cfg.data.task).metric
    if cfg.finetune.eval_every:
        dev_score = predict.dev_scorer(
            ctx.model,
            ctx.model_cfg,
            ctx.tokenizer,
            ctx.examples(ctx.dev_split()),
            special=ctx.special,
            metric=metric,
            source_length=cfg.data.source_length,
            max_length=cfg.data.target_length,
            eval_cfg=cfg.eval,
        )
    return train_stage(
        ctx, "finetune", params, cfg.finetune, batch_for_step, rng_salt=2,
        dev_score=dev_score, select_by=predict.main_metric(metric),
    )  # fmt: skip


def diagnostics_stage(ctx: RunContext, params: Any, scorer) -> dict:
    """World runs: where the policy puts its masks (dev people's rows) and what the LM stored
    (a cloze probe on test people's rows), reported beside the scores, never selected on."""
    from meta_mask.data import tasks, world
    from meta_mask.evaluation import diagnostics
    from meta_mask.model.generate import make_generate_fn
    from meta_mask.policies import heuristic, mlm_batches

    cfg = ctx.cfg
    variant = tasks.get_task(cfg.data.task).world_variant
    path = ctx.workdir / "diagnostics.json"
    if variant is None or cfg.data.corpus != WORLD_CORPUS or jax.process_count() > 1:
        return {}
    if path.exists():
        return json.loads(path.read_text())
    corpus = ctx.corpus()
    batches = mlm_batches.for_corpus(
        corpus, scorer or heuristic.NoMask(), ctx.tokenizer, special=ctx.special,
        policy=cfg.policy, data=cfg.data, seed=cfg.seed, batch_size=cfg.intermediate.batch_size,
    )  # fmt: skip
    generate = make_generate_fn(
        ctx.model, config=ctx.model_cfg, max_length=cfg.data.mlm_target_length
    )
    result = diagnostics.world_diagnostics(
        batches, corpus.dataset["doc_id"], ctx.world, world.asked_attributes(ctx.world, variant),
        generate=generate, params=params, special=ctx.special, policy=cfg.policy, data=cfg.data,
    )  # fmt: skip
    workdir_lib.write_json(path, result)
    return result


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
        special=ctx.special,
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


def asked(ctx: RunContext) -> tuple[str, ...]:
    """The attributes a world task asks about (the oracle's units); () for real tasks."""
    from meta_mask.data import tasks, world

    variant = tasks.get_task(ctx.cfg.data.task).world_variant
    return world.asked_attributes(ctx.world, variant) if variant else ()
