"""What every stage of a run needs, built once: the config, the folders, the tokenizer, the
model and its initial parameters on the device mesh, the synthetic world (when the run uses
one), and the task's examples (read once per run).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Any

import jax

from meta_mask import config as config_lib
from meta_mask.config import Config
from meta_mask.errors import UserError
from meta_mask.special_tokens import SpecialTokens
from meta_mask.training.distributed import is_writer

WORLD_CORPUS = "world"


@dataclass
class RunContext:
    """What every stage needs, built once per run."""

    cfg: Config
    workdir: pathlib.Path
    cache_dir: pathlib.Path
    tokenizer: Any
    special: SpecialTokens  # the tokenizer's special ids, with the model's decoder start
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

    def corpus(self, population: str = "task"):
        """The run's tokenized intermediate corpus (built once, cached on disk by fingerprint);
        population="generic": the world's generic population (the generic stage's corpus)."""
        from meta_mask.data import corpora

        cfg = self.cfg

        def build():
            return corpora.build_corpus(
                corpora.source_for(
                    cfg.data.corpus,
                    task=cfg.data.task,
                    data_dir=cfg.data.data_dir,
                    world=self.world,
                    population=population,
                ),
                self.tokenizer,
                self.cache_dir / "corpora",
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

    def shared_dir(self, stage: str, *parts: Any) -> pathlib.Path:
        """The folder of a stage shared by every run of a sweep that agrees on what it depends
        on (the model, the world, the data lengths, the seed and `parts`): under the cache
        folder, named by a fingerprint of those, so a run finds a finished one and reuses it."""
        from meta_mask import workdir

        cfg = self.cfg
        key = {
            "model": config_lib.to_dict(self.model_cfg),
            "world": config_lib.to_dict(cfg.world),
            # Not the task: policies and tasks of one seed share the generic LM (transfer).
            "data": {k: v for k, v in config_lib.to_dict(cfg.data).items() if "length" in k or
                     k in ("tokenizer", "corpus")},
            "seed": cfg.seed,
            "init": cfg.init,
            "parts": [config_lib.to_dict(p) if hasattr(p, "__dataclass_fields__") else p
                      for p in parts],
        }  # fmt: skip
        return self.cache_dir / stage / f"seed{cfg.seed}-{workdir.fingerprint(key)}"

    def dev_split(self) -> str:
        from meta_mask.data import tasks

        return tasks.dev_split(self.cfg.data.task)


def build_context(cfg: Config, workdir: pathlib.Path, cache_dir: pathlib.Path) -> RunContext:
    """The tokenizer, the model and its initial parameters on the mesh, the world (if any)."""
    from meta_mask.data import tasks
    from meta_mask.model import bart, hf
    from meta_mask.training import sharding

    spec = tasks.get_task(cfg.data.task)  # an unknown name fails here, before any work
    world = None
    if cfg.data.corpus == WORLD_CORPUS or spec.world_variant is not None:
        from meta_mask.data import world as world_lib

        world = world_lib.build_world(cfg.world)  # the run's one world
    if cfg.data.tokenizer:
        tokenizer = hf.load_tokenizer(cfg.data.tokenizer, flag="--data.tokenizer")
    elif cfg.init:
        tokenizer = hf.load_tokenizer(cfg.init, flag="--init")
    elif world is not None:
        from meta_mask.data import world_tokenizer

        tokenizer = world_tokenizer.world_tokenizer(world)
    else:
        raise UserError(
            f"--data.task={cfg.data.task} with --data.corpus={cfg.data.corpus} has no "
            "tokenizer: set --data.tokenizer or --init (a Hugging Face BART)"
        )

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
            raise UserError(
                f"the tokenizer's {name} id is {theirs} but the model's {name}_token_id is {ours}"
                " (--model.*_token_id, or a --data.tokenizer that belongs to another model)"
            )
    special = SpecialTokens.of(tokenizer, model_cfg.decoder_start_token_id)
    params = sharding.place(params, sharding.param_shardings(params, mesh))
    return RunContext(
        cfg=cfg,
        workdir=workdir,
        cache_dir=cache_dir,
        tokenizer=tokenizer,
        special=special,
        model_cfg=model_cfg,
        model=bart.Bart(model_cfg),
        init_params=params,
        mesh=mesh,
        world=world,
    )
