"""The conductor: one run's stages, in order (meta_mask/stages.py).

    run(cfg, workdir) -> results

    generic        MLM on the synthetic world's generic population: the generic LM (the world's
                   stand-in for a pre-trained BART; with --init, the loaded checkpoint is it),
                   trained once per seed and shared by a sweep's runs
    learn_policy   learned policies only: the supervised policy, or the meta-learned one
                   (against the generic LM fine-tuned to answer the generic population's
                   questions)
    intermediate   MLM on the task's corpus under the masking policy (none for policy "none")
    finetune       the downstream task (the best dev step kept with --finetune.eval_every)
    evaluate       generation on the eval split, scored with the task's metric; world runs
                   also get diagnostics (where the policy masks, what the LM stored)

workdir.py keeps the run's records and refuses a folder that holds another config. This is
the only module (with stages.py) that knows every part; the parts know nothing of each other.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time

from meta_mask import config as config_lib
from meta_mask import stages
from meta_mask import workdir as workdir_lib
from meta_mask.config import Config
from meta_mask.context import build_context
from meta_mask.training.distributed import is_writer

log = logging.getLogger(__name__)


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
    # Absolute: a shared stage's folder under the cache is joined onto the run's folder
    # (stages.train_stage), which keeps an absolute path as it is and nests a relative one.
    cache = (pathlib.Path(cache_dir) if cache_dir else workdir / "cache").absolute()
    ctx = build_context(cfg, workdir, cache)
    ctx.examples("train", cfg.data.max_train_examples)  # bad task data fails before any write
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.record_run(cfg, workdir, argv)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        start = time.time()
        out = fn(*args)
        timings[name] = time.time() - start
        return out

    params = ctx.init_params
    if cfg.generic.train.steps:  # a prerequisite of every later stage: trained once per seed
        params = timed("generic", stages.generic_stage, ctx)
    if cfg.stages == ("generic",):
        return {}
    learned_policy = cfg.policy.name in config_lib.LEARNED_POLICIES
    pretrain = "intermediate" in cfg.stages and cfg.policy.name != "none"
    learn = learned_policy and (pretrain or "learn_policy" in cfg.stages)
    corpus = ctx.corpus() if pretrain or learn else None
    scorer = None
    if learn:
        # The meta-learned policy is learned against the generic LM fine-tuned to answer.
        qa_lm = cfg.policy.name == "meta" and not cfg.policy.checkpoint and cfg.generic.qa.steps
        theta = timed("generic_qa", stages.generic_qa_stage, ctx, params) if qa_lm else params
        folder = timed("learn_policy", stages.learn_policy_stage, ctx, corpus, theta)
        scorer = learned.load_scorer(folder, ctx.model_cfg.vocab_size)
    if pretrain:
        scorer = scorer or heuristic.corpus_scorer(cfg.policy, corpus, asked=stages.asked(ctx))
        params = timed("intermediate", stages.intermediate_stage, ctx, params, corpus, scorer)
    # Diagnostics of what the intermediate stage stored, before fine-tuning.
    found = stages.diagnostics_stage(ctx, params, scorer) if "evaluate" in cfg.stages else {}
    if "finetune" in cfg.stages:
        params = timed("finetune", stages.finetune_stage, ctx, params)
    metrics: dict = {}
    if "evaluate" in cfg.stages:
        metrics = dict(timed("evaluate", stages.evaluate_stage, ctx, params))
    facts = metrics.pop("facts", None)  # per-fact scores: what paired comparisons resample
    results = {
        "task": cfg.data.task,
        "policy": cfg.policy.name,
        "policy_task": learned.learned_on(cfg),
        "output_format": cfg.policy.output_format,
        "seed": cfg.seed,
        "metrics": metrics,
        "seconds": timings,
        **({"facts": facts} if facts else {}),
        **({"diagnostics": found} if found else {}),
    }
    if "evaluate" in cfg.stages and is_writer():  # only a complete run has results
        report.write_run_report(workdir, results)
        workdir_lib.write_json_atomic(workdir / "results.json", results)
    return results
