"""The host input pipeline of intermediate pre-training: corpus batch -> policy mask -> example.

One object turns a step number into the fixed-shape batch the shared train step consumes:
the corpus stream gives the step's sentences (order from seed and step), the policy's scorer
and the shared sampler give the mask (randomness from seed, step and sentence index), and the
shared corruption function writes it in the chosen output format. Every policy, heuristic or
learned, goes through exactly this path, so comparing policies changes nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from meta_mask.batches import CorpusBatch, PolicyBatch, Seq2SeqBatch
from meta_mask.config import DataConfig, PolicyConfig
from meta_mask.data.stream import CorpusStream
from meta_mask.policies.corrupt import corrupt_np, non_special_ids
from meta_mask.policies.sampler import BatchRng, Scorer, mask_batch_np
from meta_mask.special_tokens import SpecialTokens


def policy_batch(
    stream_batch: CorpusBatch,
    entity_labels: Sequence[Sequence[str]],
    special: SpecialTokens,
    entity_types: Sequence[Sequence[str]] | None = None,
) -> PolicyBatch:
    """A corpus stream batch as the scorers read it (what heuristic.collate makes of records);
    with `entity_types` (the world's attribute of each span) also "entity_types"."""
    input_ids, word_ids = stream_batch["input_ids"], stream_batch["word_ids"]
    spans = stream_batch["entity_spans"].copy()
    n_max = spans.shape[1]
    present = np.arange(n_max)[None, :] < stream_batch["num_entities"][:, None]
    spans[~present] = -1
    return {
        "input_ids": input_ids,
        "word_ids": word_ids,
        "valid": (word_ids >= 0) & ~np.isin(input_ids, np.asarray(special.unmaskable)),
        "entity_spans": spans,
        "entity_labels": [list(labels)[:n_max] for labels in entity_labels],
        "example_ids": stream_batch["indices"].astype(np.int64),
        **(
            {"entity_types": [list(types)[:n_max] for types in entity_types]}
            if entity_types is not None
            else {}
        ),
    }


@dataclass
class MlmBatches:
    """`batches(step)` -> the intermediate-stage train batch of `step` (pure in (seed, step)).

    `stream` is a data.stream.CorpusStream; `labels_of(rows)` / `types_of(rows)` return the
    entity labels (for label-filtered salient spans) / types (the world's attribute of each
    span, for the oracle and diagnostics) of corpus rows; `special` the run's special ids;
    `random_ids` the ids an 80/10/10 random replacement draws from.
    """

    stream: Any
    scorer: Scorer
    policy: PolicyConfig
    data: DataConfig
    seed: int
    special: SpecialTokens
    labels_of: Callable[[np.ndarray], list[list[str]]]
    types_of: Callable[[np.ndarray], list[list[str]]]
    random_ids: np.ndarray | None = None

    def rows(self, rows: np.ndarray) -> PolicyBatch:
        """The policy batch of corpus `rows` (example ids = the rows)."""
        sb = self.stream.rows_batch(np.asarray(rows))
        return policy_batch(sb, self.labels_of(sb["indices"]), self.special,
                            self.types_of(sb["indices"]))  # fmt: skip

    def masked(self, step: int) -> tuple[PolicyBatch, np.ndarray]:
        """The step's policy batch and its mask [B, L] (for inspection and heatmaps)."""
        batch = self.rows(self.stream.indices_at(step * self.stream.batch_size))
        rng = BatchRng(self.seed, step, batch["example_ids"])
        mask = mask_batch_np(self.scorer, batch, rng, **self.policy.budget())
        return batch, mask

    def __call__(self, step: int) -> Seq2SeqBatch:
        batch, mask = self.masked(step)
        full = self.policy.output_format == "full_sentence"
        return corrupt_np(
            batch["input_ids"],
            mask,
            output_format=self.policy.output_format,
            enc_len=self.data.mlm_length,
            dec_len=self.data.mlm_length if full else self.data.mlm_target_length,
            special=self.special,
            infill=self.policy.infill,
            replace_80_10_10=self.policy.replace_80_10_10,
            rng=BatchRng(self.seed, step, batch["example_ids"]),
            random_ids=self.random_ids,
        )


def for_corpus(
    corpus: Any,
    scorer: Scorer,
    tokenizer: Any,
    *,
    special: SpecialTokens,
    policy: PolicyConfig,
    data: DataConfig,
    seed: int,
    batch_size: int,
) -> MlmBatches:
    """The intermediate stage's batches over a built corpus (data.corpora.Corpus): this
    process's block of every global batch (data.stream.CorpusStream), masked by `scorer`;
    80/10/10 replacements draw from `tokenizer`'s non-special ids."""
    stream = CorpusStream(
        corpus.dataset,
        batch_size=batch_size,
        max_length=data.mlm_length,
        seed=seed,
        special=special,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    labels_column = corpus.dataset.data.column("entity_labels")
    types_column = corpus.dataset.data.column("entity_types")
    return MlmBatches(
        stream=stream,
        scorer=scorer,
        policy=policy,
        data=data,
        seed=seed,
        special=special,
        labels_of=lambda rows: labels_column.take(rows).to_pylist(),
        types_of=lambda rows: types_column.take(rows).to_pylist(),
        random_ids=non_special_ids(tokenizer),
    )
