"""The conductor: one run's stages, their order, and resume/skip logic.

    run(cfg, workdir) -> results

Stages (cfg.stages, in this order): intermediate pre-training of the model under the
masking policy on the corpus -> fine-tuning on the downstream task -> evaluation by
generation with the task's metric. Each stage writes to `workdir/<stage>/`: its orbax
checkpoints (resumed after a kill: data order and masks derive from seed and step, so the
result equals an uninterrupted run's), metrics.jsonl and TensorBoard events, and finally
`final/` params and `done.json`; a stage with `done.json` is skipped on rerun. A finished
run (`results.json`) is never overwritten: rerunning with the same config returns the stored
results; with a different config it is an error naming the differing fields.

This is the only module that knows every part; the parts know nothing of each other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from meta_mask import config as config_lib
from meta_mask.config import Config

log = logging.getLogger(__name__)

WORLD_CORPUS = "world"


class RunConflict(RuntimeError):
    """The workdir holds a run with another config; nothing was changed."""


# --------------------------------------------------------------------------------- files


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def git_commit() -> str:
    """The source tree's commit (with '+dirty' for uncommitted changes), or 'unknown'."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} (stored) vs {vb!r} (now)")
    return out


def claim_workdir(cfg: Config, workdir: pathlib.Path, argv: list[str] | None) -> dict | None:
    """Record the run's config in `workdir`; returns stored results if the run is finished.

    Refuses (RunConflict) when the folder holds a run with a different config, so a finished
    run's results are never silently replaced and stages are never mixed across configs.
    """
    resolved = json.loads(json.dumps(config_lib.to_dict(cfg), default=str))
    # Which stages a command runs may change between invocations of the same run.
    resolved.pop("stages")
    stored_path = workdir / "config.json"
    if stored_path.exists():
        stored = json.loads(stored_path.read_text())
        diff = _differences(stored, resolved)
        if diff:
            raise RunConflict(
                f"{workdir} holds a run with a different config:\n  "
                + "\n  ".join(diff)
                + "\nUse another --workdir, or delete the folder to start over."
            )
        results = workdir / "results.json"
        if results.exists():
            return json.loads(results.read_text())
    elif jax.process_index() == 0:  # one writer in a multi-host run
        write_json_atomic(stored_path, resolved)
    if jax.process_index() == 0:
        if argv is not None:
            write_text_atomic(workdir / "command.txt", " ".join(argv) + "\n")
        write_text_atomic(workdir / "git_commit.txt", git_commit() + "\n")
    return None


# ------------------------------------------------------------------------------ context


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


def build_context(cfg: Config, workdir: pathlib.Path, cache_dir: pathlib.Path) -> RunContext:
    from meta_mask.data import tasks
    from meta_mask.model import bart, hf
    from meta_mask.training import sharding

    spec = tasks.get_task(cfg.data.task)  # an unknown name fails here, before any work
    world = None
    if cfg.data.corpus == WORLD_CORPUS or spec.world_variant is not None:
        from meta_mask.data import world as world_lib
        from meta_mask.data import world_tokenizer

        world = world_lib.build_world(cfg.world)  # the run's one world
    if cfg.data.tokenizer:
        tokenizer = hf.load_tokenizer(cfg.data.tokenizer, flag="--data.tokenizer")
    elif cfg.init:
        tokenizer = hf.load_tokenizer(cfg.init, flag="--init")
    elif world is not None:
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
        ours, theirs = (
            getattr(model_cfg, f"{name}_token_id"),
            getattr(tokenizer, f"{name}_token_id"),
        )
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


def task_examples(ctx: RunContext, split: str, max_examples: int = 0) -> list:
    """The examples of the run's task and `split` (world tasks come from the run's world)."""
    from meta_mask.data import tasks

    return tasks.load_task(
        ctx.cfg.data.task,
        split,
        data_dir=ctx.cfg.data.data_dir or None,
        max_examples=max_examples or None,
        world=ctx.world,
    )


def task_metric(name: str) -> str:
    from meta_mask.data import tasks

    return tasks.get_task(name).metric


# ------------------------------------------------------------------------------- stages


def _stage_done(stage_dir: pathlib.Path) -> dict | None:
    done = stage_dir / "done.json"
    return json.loads(done.read_text()) if done.exists() else None


def _final_params(stage_dir: pathlib.Path, like: Any) -> Any:
    from meta_mask.training import checkpoint

    # Straight into `like`'s layout (each host reads only its shards) when it is on the mesh.
    leaves = jax.tree.leaves(like)
    sharding = None
    if leaves and all(isinstance(x, jax.Array) for x in leaves):
        sharding = jax.tree.map(lambda x: x.sharding, like)
    return checkpoint.load_params(stage_dir / "final", jax.eval_shape(lambda: like), sharding)


def train_stage(
    ctx: RunContext,
    name: str,
    params: Any,
    stage_cfg: config_lib.StageConfig,
    batch_for_step,
    *,
    rng_salt: int,
) -> Any:
    """Train `params` for the stage's steps (resuming its checkpoints); returns final params."""
    from meta_mask.evaluation.writers import MetricWriter
    from meta_mask.training import checkpoint, loop, sharding, steps

    stage_dir = ctx.workdir / name
    if stage_cfg.optim.total_steps == 0:  # decay over exactly the stage's steps
        stage_cfg = dataclasses.replace(
            stage_cfg, optim=dataclasses.replace(stage_cfg.optim, total_steps=stage_cfg.steps)
        )
    if _stage_done(stage_dir) is not None:
        log.info("stage %s already done; loading its final params", name)
        return _final_params(stage_dir, params)
    tx = steps.make_optimizer(stage_cfg.optim)
    # Params and Adam moments in the FSDP layout over the mesh (optimizer state is created there).
    params = sharding.place(params, sharding.param_shardings(params, ctx.mesh))
    state = sharding.sharded_call(lambda p: steps.create_train_state(p, tx), params, mesh=ctx.mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    metadata = {
        "stage": name,
        "model": config_lib.to_dict(ctx.model_cfg),
        "stage_config": config_lib.to_dict(stage_cfg),
        "seed": ctx.cfg.seed,
    }
    train_step = steps.make_train_step(
        ctx.model, stage_cfg.optim, mesh=ctx.mesh, state_sharding=state_sharding
    )
    rng = jax.random.fold_in(jax.random.key(ctx.cfg.seed), rng_salt)
    with (
        checkpoint.CheckpointManager(stage_dir / "checkpoints", max_to_keep=2) as ckpt,
        MetricWriter(stage_dir, enabled=jax.process_index() == 0) as writer,
    ):
        if ckpt.latest_step() is not None:
            state = ckpt.restore(
                jax.eval_shape(lambda: state), expected_metadata=metadata,
                compare_sections=("model", "stage_config"), sharding=state_sharding,
            )  # fmt: skip
            log.info("stage %s: resumed from step %d", name, int(state.step))
        start = time.time()
        state = loop.run_loop(
            state,
            train_step=train_step,
            # This host's rows -> one global array over the mesh.
            batch_for_step=lambda s: sharding.shard_batch(batch_for_step(s), ctx.mesh),
            rng=rng,
            options=loop.LoopOptions(
                num_steps=stage_cfg.steps,
                checkpoint_every=stage_cfg.checkpoint_every,
                log_every=stage_cfg.log_every,
                desc=name,
            ),
            checkpoints=ckpt,
            writer=writer,
            metadata=metadata,
        )
    checkpoint.save_params(stage_dir / "final", state.params, overwrite=True)  # every host
    if jax.process_index() == 0:
        write_json_atomic(
            stage_dir / "done.json", {"steps": stage_cfg.steps, "seconds": time.time() - start}
        )
    return state.params


def build_corpus(ctx: RunContext):
    """The run's tokenized intermediate corpus (built once, cached by fingerprint)."""
    from meta_mask.data import corpora

    cfg = ctx.cfg

    def build():
        return corpora.build_corpus(
            corpus_source(ctx),
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
    # Several hosts share the cache folder: process 0 builds, the others then load its files
    # (rather than all of them writing the same Arrow files at once).
    from jax.experimental import multihost_utils

    corpus = build() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("meta_mask: corpus built")
    return corpus if corpus is not None else build()


def heuristic_scorer(ctx: RunContext, corpus):
    from meta_mask.policies import heuristic

    pmi_table = None
    if ctx.cfg.policy.name == "pmi":
        from meta_mask.data import pmi

        p = ctx.cfg.policy
        pmi_table = pmi.build_pmi_table(corpus.dataset, p.pmi_max_n, p.pmi_min_count, p.pmi_top_k)
    return heuristic.make_scorer(ctx.cfg.policy, pmi_table)


def mlm_batches_for(ctx: RunContext, corpus, scorer, *, batch_size: int):
    """Step -> intermediate-stage batch under `scorer` (the shared sampler and formats)."""
    from meta_mask.data.stream import CorpusStream
    from meta_mask.policies import corrupt, mlm_batches

    cfg = ctx.cfg
    stream = CorpusStream(
        corpus.dataset,
        batch_size=batch_size,
        max_length=cfg.data.mlm_length,
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        pad_id=ctx.tokenizer.pad_token_id,
    )
    labels_column = corpus.dataset.data.column("entity_labels")
    return mlm_batches.MlmBatches(
        stream=stream,
        scorer=scorer,
        policy=cfg.policy,
        data=cfg.data,
        seed=cfg.seed,
        mask_id=ctx.tokenizer.mask_token_id,
        sentinels=corrupt.sentinel_ids(ctx.tokenizer),
        labels_of=lambda rows: labels_column.take(rows).to_pylist(),
        random_ids=corrupt.non_special_ids(ctx.tokenizer),
        pad_id=ctx.tokenizer.pad_token_id,
        eos_id=ctx.tokenizer.eos_token_id,
        decoder_start_token_id=ctx.model_cfg.decoder_start_token_id,
    )


def intermediate_stage(ctx: RunContext, params: Any, corpus, scorer) -> Any:
    """MLM on the corpus under the run's masking policy, in the chosen output format."""
    batches = mlm_batches_for(ctx, corpus, scorer, batch_size=ctx.cfg.intermediate.batch_size)
    write_mask_examples(ctx, batches)
    return train_stage(ctx, "intermediate", params, ctx.cfg.intermediate, batches, rng_salt=1)


def write_mask_examples(ctx: RunContext, batches, num: int = 8) -> None:
    """What the policy masks: a heatmap of per-token mask probabilities (estimated over many
    sampler draws, so heuristic and learned policies are shown alike) for a few sentences."""
    from meta_mask.evaluation import report

    out = ctx.workdir / "intermediate" / "masks.html"
    if out.exists() or jax.process_index() != 0:
        return
    batch, _ = batches.masked(0)
    rows = {k: v[:num] if hasattr(v, "__getitem__") else v for k, v in batch.items()}
    probs = report.mask_probabilities(batches.scorer, rows, ctx.cfg.policy.budget())
    tokens = [ctx.tokenizer.convert_ids_to_tokens(ids) for ids in rows["input_ids"]]
    report.write_mask_heatmap(out, tokens, probs, rows["valid"], title=ctx.cfg.policy.name)


POLICY_NET_FIELDS = (
    "vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim", "max_length", "embed_dim",
    "freeze_embeddings", "pad_id",
)  # fmt: skip


def learned_scorer(ctx: RunContext, corpus):
    """The run's learned policy as a scorer: learned here (learn_policy stage, skipped once
    done) or read from another run's learn_policy/ folder (--policy.checkpoint: transfer)."""
    from meta_mask.policies import net as net_lib
    from meta_mask.training import checkpoint

    cfg = ctx.cfg
    folder = pathlib.Path(cfg.policy.checkpoint or ctx.workdir / "learn_policy")
    if not (folder / "done.json").exists():
        if cfg.policy.checkpoint:
            raise FileNotFoundError(
                f"--policy.checkpoint={cfg.policy.checkpoint}: no finished learned policy there "
                "(expected the learn_policy/ folder of a run, with done.json and policy.json)"
            )
        learn_policy_stage(ctx, corpus, folder)
    spec = json.loads((folder / "policy.json").read_text())
    net = net_lib.PolicyNet(**spec["net"])
    if net.vocab_size != ctx.model_cfg.vocab_size:
        raise ValueError(
            f"the policy in {folder} was learned for a vocabulary of {net.vocab_size} tokens, but "
            f"this run's model has {ctx.model_cfg.vocab_size}: transfer needs the same tokenizer"
        )
    params = checkpoint.load_params(folder / "policy")
    return net_lib.LearnedScorer(net, params, units=spec["units"])


def _policy_task(cfg: Config) -> str:
    """The task a learned policy was learned on ("" for heuristics)."""
    if cfg.policy.name not in config_lib.LEARNED_POLICIES:
        return ""
    if not cfg.policy.checkpoint:
        return cfg.data.task
    spec = pathlib.Path(cfg.policy.checkpoint) / "policy.json"
    return json.loads(spec.read_text())["task"] if spec.exists() else "?"


def _dev_split(ctx: RunContext) -> str:
    from meta_mask.data import tasks

    return tasks.dev_split(ctx.cfg.data.task)


def learn_policy_stage(ctx: RunContext, corpus, folder: pathlib.Path) -> None:
    """Learn the masking policy (supervised on the task's answers, or meta-learned against the
    task's dev loss) and save it with its network's shape in `folder`."""
    from meta_mask.policies import net as net_lib
    from meta_mask.training import checkpoint

    cfg = ctx.cfg
    net = net_lib.policy_net_from_config(
        cfg.meta, ctx.model_cfg.vocab_size, ctx.model_cfg.d_model, ctx.tokenizer.pad_token_id
    )
    # A host copy: the policy's (donated) state must not share a buffer with the LM's params.
    emb = None
    if cfg.meta.use_lm_embeddings:
        emb = ctx.init_params["shared"]["embedding"]
        if not emb.is_fully_addressable:  # FSDP across hosts: gather the other hosts' shards
            from jax.experimental import multihost_utils

            emb = multihost_utils.process_allgather(emb, tiled=True)
        emb = np.array(emb)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 3)
    params = net_lib.init_policy_params(net, key, lm_embedding=emb)
    train = task_examples(ctx, "train", cfg.data.max_train_examples)
    dev = task_examples(ctx, _dev_split(ctx), cfg.supervised.max_dev_triples)
    # Answer sentences come from the examples' own contexts; without them, from the corpus.
    sentences = None
    if not all(ex.contexts for ex in train):
        sentences = corpus.dataset.select(range(min(len(corpus), 200_000)))["text"]
    if cfg.policy.name == "supervised":
        from meta_mask.policies import supervised

        budget = cfg.policy.budget()
        scfg = dataclasses.replace(
            cfg.supervised,
            eval_mask_rate=budget.get("mask_rate", cfg.supervised.eval_mask_rate),
            eval_spans_per_sentence=budget.get("num_units", 0),
        )
        params, history = supervised.learn_supervised_policy(
            net, params, train, dev, ctx.tokenizer, scfg, seed=cfg.seed, corpus_sentences=sentences
        )
        units = scfg.units
    else:
        from meta_mask.evaluation.writers import MetricWriter
        from meta_mask.policies import meta_train, supervised

        # Token-level (context sentence, question, answer) triples of the task.
        scfg = dataclasses.replace(cfg.supervised, max_length=cfg.data.mlm_length)
        train_triples = supervised.prepare_triples(
            supervised.supervised_triples(train, ctx.tokenizer, scfg, corpus_sentences=sentences),
            seed=cfg.seed,
        )
        dev_triples = supervised.prepare_triples(
            supervised.supervised_triples(dev, ctx.tokenizer, scfg, corpus_sentences=sentences),
            max_triples=cfg.supervised.max_dev_triples, seed=cfg.seed,
        )  # fmt: skip
        with MetricWriter(folder, enabled=jax.process_index() == 0) as writer:
            params, history = meta_train.learn_meta_policy(
                ctx.model,
                ctx.init_params,
                net,
                params,
                train_triples,
                dev_triples,
                tokenizer=ctx.tokenizer,
                cfg=dataclasses.replace(cfg.meta, mask_rate=cfg.policy.mask_rate),
                seed=cfg.seed,
                length=cfg.data.mlm_length,
                source_length=cfg.data.source_length,
                target_length=cfg.data.target_length,
                decoder_start_token_id=ctx.model_cfg.decoder_start_token_id,
                log_fn=writer.write,
            )
        units = cfg.meta.policy_units
    checkpoint.save_params(folder / "policy", params, overwrite=True)
    spec = {
        "policy": cfg.policy.name,
        "task": cfg.data.task,
        "units": units,
        "net": {f: getattr(net, f) for f in POLICY_NET_FIELDS},
        "parameters": net_lib.count_params(net),
    }
    if jax.process_index() == 0:  # one writer in a multi-host run
        write_json_atomic(folder / "policy.json", spec)
        write_json_atomic(folder / "history.json", history)
        write_json_atomic(folder / "done.json", {"policy": cfg.policy.name})


def corpus_source(ctx: RunContext):
    from meta_mask.data import corpora

    spec = ctx.cfg.data.corpus
    if spec == WORLD_CORPUS:
        return corpora.CorpusSource(
            kind="records", records=list(ctx.world.sentences), name=f"world-{ctx.cfg.world.seed}"
        )
    if spec == "task":
        return corpora.CorpusSource(
            kind="task", task=ctx.cfg.data.task, data_dir=ctx.cfg.data.data_dir
        )
    if spec.endswith((".txt", ".jsonl")) and ":" not in spec:
        return corpora.CorpusSource(kind="file", path=spec)
    return corpora.CorpusSource.from_spec(spec)


def finetune_stage(ctx: RunContext, params: Any) -> Any:
    from meta_mask.data import seq2seq

    cfg = ctx.cfg
    examples = task_examples(ctx, "train", cfg.data.max_train_examples)
    data = seq2seq.encode_examples(
        examples,
        ctx.tokenizer,
        source_length=cfg.data.source_length,
        target_length=cfg.data.target_length,
    )
    pad = ctx.tokenizer.pad_token_id
    start = ctx.model_cfg.decoder_start_token_id
    batch_size = cfg.finetune.batch_size

    def batch_for_step(step: int):
        rows = seq2seq.batch_rows(len(data), batch_size, cfg.seed, step)
        rows = seq2seq.local_rows(rows, jax.process_index(), jax.process_count())
        return seq2seq.train_batch(data, rows, pad_id=pad, decoder_start_token_id=start)

    return train_stage(ctx, "finetune", params, cfg.finetune, batch_for_step, rng_salt=2)


def evaluate_stage(ctx: RunContext, params: Any) -> dict:
    """Generate on the eval split, score with the task's metric, write predictions."""
    from meta_mask.evaluation import predict

    stage_dir = ctx.workdir / "evaluate"
    done = _stage_done(stage_dir)
    if done is not None:
        return done
    cfg = ctx.cfg
    examples = task_examples(ctx, cfg.eval.split, cfg.eval.max_examples)
    metric = task_metric(cfg.data.task)
    closed_book = metric == "em_f1"
    out_dir = stage_dir
    if jax.process_count() > 1:
        # Generation is not sharded: every host decodes all examples from a whole copy of the
        # params (the same result everywhere), and only process 0 writes into the workdir.
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            out_dir = pathlib.Path(tempfile.mkdtemp(prefix="meta_mask_eval_"))
    result = predict.evaluate(
        ctx.model,
        params,
        ctx.model_cfg,
        ctx.tokenizer,
        examples,
        metric=metric,
        source_length=cfg.data.source_length,
        max_length=cfg.data.target_length,
        eval_cfg=cfg.eval,
        out_dir=out_dir,
        train_examples=task_examples(ctx, "train", cfg.data.max_train_examples)
        if closed_book
        else None,
    )
    if jax.process_index() == 0:
        write_json_atomic(stage_dir / "done.json", result)
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

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    finished = claim_workdir(cfg, workdir, argv)
    if finished is not None:
        log.info("%s is finished; returning its stored results", workdir)
        return finished
    cache = pathlib.Path(cache_dir) if cache_dir else workdir / "cache"
    ctx = build_context(cfg, workdir, cache)
    params = ctx.init_params
    timings: dict[str, float] = {}
    learned = cfg.policy.name in config_lib.LEARNED_POLICIES
    pretrain = "intermediate" in cfg.stages and cfg.policy.name != "none"
    corpus = build_corpus(ctx) if pretrain or (learned and "learn_policy" in cfg.stages) else None
    scorer = None
    if learned and (pretrain or "learn_policy" in cfg.stages):
        t = time.time()
        scorer = learned_scorer(ctx, corpus)
        timings["learn_policy"] = time.time() - t
    if pretrain:
        t = time.time()
        scorer = scorer or heuristic_scorer(ctx, corpus)
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
        "policy_task": _policy_task(cfg),
        "output_format": cfg.policy.output_format,
        "seed": cfg.seed,
        "metrics": metrics,
        "seconds": timings,
    }
    if "evaluate" in cfg.stages and jax.process_index() == 0:  # only a complete run has results
        report.write_run_report(workdir, results)
        write_json_atomic(workdir / "results.json", results)
    return results
