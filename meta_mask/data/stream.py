"""Deterministic, resumable, multi-host batches of a tokenized corpus (data/corpora.py).

``CorpusStream`` serves fixed-shape padded numpy batches in an order that is a permutation
derived from (seed, epoch); its position is one integer (examples consumed = step * global
batch size) that a checkpoint stores and a resumed run passes back. With
``process_index``/``process_count`` each host takes a disjoint slice of every global batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from meta_mask.batches import CorpusBatch
from meta_mask.data.corpora import Corpus
from meta_mask.special_tokens import SpecialTokens


def _ragged(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of an Arrow list column, offsets starting at 0."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


class CorpusStream:
    """Fixed-shape padded batches of a tokenized corpus in a seeded, resumable order.

    The global order is epoch after epoch of permutations of the rows, each drawn from
    ``np.random.PCG64([seed, epoch])``; the last incomplete global batch of an epoch is dropped
    so every batch has the same shape. ``position`` counts examples consumed globally
    (step * global batch size): ``batch_at(p)`` depends only on (seed, p), so a run resumed at
    a checkpointed position continues exactly as the uninterrupted run would.

    With ``process_count > 1`` every host builds the same global batch and keeps rows
    ``[process_index * b, (process_index + 1) * b)`` where b = global batch / process_count.

    Each batch is a batches.CorpusBatch of b rows (padded with special.pad, at most
    `max_entities` entity spans per sentence).
    """

    def __init__(
        self,
        dataset: Any,  # a tokenized corpus `datasets.Dataset` (or a `Corpus`)
        *,
        batch_size: int,
        max_length: int,
        seed: int,
        special: SpecialTokens,
        process_index: int = 0,
        process_count: int = 1,
        max_entities: int = 16,
    ) -> None:
        """`max_entities` is a lower bound: a corpus with more entities in a row gets that many
        (a passage names its person in every sentence), so no entity is ever dropped."""
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(
                f"process_index={process_index} must lie in [0, process_count={process_count})"
            )
        if batch_size % process_count:
            raise ValueError(
                f"global batch_size={batch_size} is not divisible by process_count={process_count}"
            )
        if isinstance(dataset, Corpus):
            dataset = dataset.dataset
        if dataset._indices is not None:
            # After select/shuffle the Arrow table still holds every row; materialize the view.
            dataset = dataset.flatten_indices()
        n = len(dataset)
        if n < batch_size:
            raise ValueError(f"corpus has {n} sentences, fewer than batch_size={batch_size}")
        table = dataset.data  # the Arrow table; columns are read once into numpy
        self._ids, self._offsets = _ragged(table.column("input_ids"))
        self._word_ids, _ = _ragged(table.column("word_ids"))
        spans_outer = table.column("entity_spans").combine_chunks()
        span_pairs, _ = _ragged(spans_outer.flatten())
        self._spans = span_pairs.reshape(-1, 2).astype(np.int32)
        ent_off = spans_outer.offsets.to_numpy().astype(np.int64)
        self._ent_offsets = ent_off - ent_off[0]
        lengths = np.diff(self._offsets)
        if lengths.max() > max_length:
            raise ValueError(
                f"max_length={max_length} is shorter than the longest sentence in the corpus "
                f"({int(lengths.max())} tokens, row {int(lengths.argmax())}); rebuild the "
                "corpus with a smaller max_length or raise the stream's"
            )
        self.num_examples = n
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.max_length = max_length
        self.max_entities = max(max_entities, int(np.diff(self._ent_offsets).max(initial=0)))
        self.seed = seed
        self.process_index = process_index
        self.special = special
        self.batches_per_epoch = n // batch_size
        # Memo of the last epoch's permutation (a pure function of seed and epoch), so a step
        # does not redraw a permutation of the whole corpus.
        self._perm: tuple[int, np.ndarray] | None = None
        self._entity_columns = dataset.select_columns(["entity_labels", "entity_types"])

    def permutation(self, epoch: int) -> np.ndarray:
        """The row order of `epoch` (the same on every host)."""
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm = (epoch, rng.permutation(self.num_examples))
        return self._perm[1]

    def indices_at(self, position: int) -> np.ndarray:
        """This host's dataset rows of the global batch starting at `position`."""
        if position < 0 or position % self.batch_size:
            raise ValueError(
                f"position={position} must be a non-negative multiple of the global "
                f"batch_size={self.batch_size} (position = step * batch_size)"
            )
        step = position // self.batch_size
        epoch, within = divmod(step, self.batches_per_epoch)
        start = within * self.batch_size + self.process_index * self.local_batch_size
        return self.permutation(epoch)[start : start + self.local_batch_size].astype(np.int64)

    def batch_at(self, position: int) -> CorpusBatch:
        """The padded batch for this host at global `position`."""
        return self.rows_batch(self.indices_at(position))

    def rows_batch(self, rows: np.ndarray) -> CorpusBatch:
        """The padded batch of dataset `rows`, in that order."""
        b, length, e_max = len(rows), self.max_length, self.max_entities
        input_ids = np.full((b, length), self.special.pad, np.int32)
        word_ids = np.full((b, length), -1, np.int32)
        spans = np.zeros((b, e_max, 2), np.int32)
        lengths = np.zeros(b, np.int32)
        num_entities = np.zeros(b, np.int32)
        for i, r in enumerate(rows):
            a, z = self._offsets[r], self._offsets[r + 1]
            lengths[i] = z - a
            input_ids[i, : z - a] = self._ids[a:z]
            word_ids[i, : z - a] = self._word_ids[a:z]
            ea, ez = (
                self._ent_offsets[r],
                min(self._ent_offsets[r + 1], self._ent_offsets[r] + e_max),
            )
            num_entities[i] = ez - ea
            spans[i, : ez - ea] = self._spans[ea:ez]
        return {
            "input_ids": input_ids,
            "word_ids": word_ids,
            "lengths": lengths,
            "entity_spans": spans,
            "num_entities": num_entities,
            "indices": rows,
        }

    def entity_labels(self, rows: np.ndarray) -> list[list[str]]:
        """The entity labels of dataset `rows` (e.g. a batch's "indices"), in span order."""
        return self._entity_columns[[int(r) for r in rows]]["entity_labels"]

    def entity_types(self, rows: np.ndarray) -> list[list[str]]:
        """The entity types (world attribute types; "" if none) of dataset `rows`."""
        return self._entity_columns[[int(r) for r in rows]]["entity_types"]
