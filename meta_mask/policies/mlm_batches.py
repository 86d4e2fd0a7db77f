"""The host input pipeline of intermediate pre-training: corpus batch -> policy mask -> example.

One object turns a step number into the fixed-shape batch the shared train step consumes:
the corpus stream gives the step's sentences (order from seed and step), the policy's scorer
and the shared sampler give the mask (randomness from seed, step and sentence index), and the
shared corruption function writes it in the chosen output format. Every policy, heuristic or
learned, goes through exactly this path, so comparing policies changes nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from meta_mask.config import DataConfig, PolicyConfig
from meta_mask.data.stream import CorpusStream
from meta_mask.policies.corrupt import corrupt_np, non_special_ids, sentinel_ids
from meta_mask.policies.heuristic import SPECIAL_IDS
from meta_mask.policies.sampler import BatchRng, Scorer, mask_batch_np


def policy_batch(stream_batch: Mapping[str, np.ndarray], entity_labels: Sequence[Sequence[str]]):
    """A corpus stream batch in the scorers' batch format (policies.heuristic.collate's)."""
    input_ids, word_ids = stream_batch["input_ids"], stream_batch["word_ids"]
    spans = stream_batch["entity_spans"].copy()
    n_max = spans.shape[1]
    present = np.arange(n_max)[None, :] < stream_batch["num_entities"][:, None]
    spans[~present] = -1
    return {
        "input_ids": input_ids,
        "word_ids": word_ids,
        "valid": (word_ids >= 0) & ~np.isin(input_ids, np.asarray(SPECIAL_IDS)),
        "entity_spans": spans,
        "entity_labels": [list(labels)[:n_max] for labels in entity_labels],
        "example_ids": stream_batch["indices"].astype(np.int64),
    }


@dataclass
class MlmBatches:
    """`batches(step)` -> the intermediate-stage train batch of `step` (pure in (seed, step)).

    `stream` is a data.stream.CorpusStream; `labels_of(rows)` returns the entity labels of
    corpus rows (for label-filtered salient spans); `sentinels` are the tokenizer's
    <extra_id_i> ids (policies.corrupt.sentinel_ids); `random_ids` the ids an 80/10/10 random
    replacement draws from.
    """

    stream: Any
    scorer: Scorer
    policy: PolicyConfig
    data: DataConfig
    seed: int
    mask_id: int
    sentinels: Sequence[int]
    labels_of: Callable[[np.ndarray], list[list[str]]]
    random_ids: np.ndarray | None = None
    pad_id: int = 1
    eos_id: int = 2
    decoder_start_token_id: int = 2

    def masked(self, step: int) -> tuple[dict, np.ndarray]:
        """The step's policy batch and its mask [B, L] (for inspection and heatmaps)."""
        sb = self.stream.batch_at(step * self.stream.batch_size)
        batch = policy_batch(sb, self.labels_of(sb["indices"]))
        rng = BatchRng(self.seed, step, batch["example_ids"])
        mask = mask_batch_np(self.scorer, batch, rng, **self.policy.budget())
        return batch, mask

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        batch, mask = self.masked(step)
        full = self.policy.output_format == "full_sentence"
        return corrupt_np(
            batch["input_ids"],
            mask,
            output_format=self.policy.output_format,
            enc_len=self.data.mlm_length,
            dec_len=self.data.mlm_length if full else self.data.mlm_target_length,
            mask_id=self.mask_id,
            sentinels=self.sentinels,
            infill=self.policy.infill,
            replace_80_10_10=self.policy.replace_80_10_10,
            rng=BatchRng(self.seed, step, batch["example_ids"]),
            random_ids=self.random_ids,
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            decoder_start_token_id=self.decoder_start_token_id,
        )


def for_corpus(
    corpus: Any,
    scorer: Scorer,
    tokenizer: Any,
    *,
    policy: PolicyConfig,
    data: DataConfig,
    seed: int,
    batch_size: int,
    decoder_start_token_id: int,
) -> MlmBatches:
    """The intermediate stage's batches over a built corpus (data.corpora.Corpus): this
    process's block of every global batch (data.stream.CorpusStream), masked by `scorer`."""
    stream = CorpusStream(
        corpus.dataset,
        batch_size=batch_size,
        max_length=data.mlm_length,
        seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        pad_id=tokenizer.pad_token_id,
    )
    labels_column = corpus.dataset.data.column("entity_labels")
    return MlmBatches(
        stream=stream,
        scorer=scorer,
        policy=policy,
        data=data,
        seed=seed,
        mask_id=tokenizer.mask_token_id,
        sentinels=sentinel_ids(tokenizer),
        labels_of=lambda rows: labels_column.take(rows).to_pylist(),
        random_ids=non_special_ids(tokenizer),
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        decoder_start_token_id=decoder_start_token_id,
    )
