"""Downstream (source -> target) examples as fixed-shape batches for the shared train step.

Owns: tokenizing a task's examples once (source with <s> .. </s> truncated to the encoder
length; the first target as labels <s> .. </s> truncated to the decoder length, counted and
reported), and the seeded, resumable order of fine-tuning batches: the batch of step s
depends only on (seed, s), like the corpus stream's, so a resumed fine-tuning run sees
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from meta_mask.batches import Seq2SeqBatch, shift_right
from meta_mask.special_tokens import SpecialTokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedExamples:
    """Padded token arrays of a list of examples, in the examples' order."""

    input_ids: np.ndarray  # int32 [N, source_length], pad-padded
    labels: np.ndarray  # int32 [N, target_length], pad-padded
    num_sources_truncated: int
    num_targets_truncated: int

    def __len__(self) -> int:
        return len(self.input_ids)


def _pad_truncate(seqs: Sequence[Sequence[int]], length: int, pad_id: int, eos_id: int):
    out = np.full((len(seqs), length), pad_id, np.int32)
    truncated = 0
    for i, ids in enumerate(seqs):
        if len(ids) > length:
            truncated += 1
            ids = [*ids[: length - 1], eos_id]  # keep the </s>: the model must learn to stop
        out[i, : len(ids)] = ids
    return out, truncated


def encode_examples(
    examples: Sequence,
    tokenizer,
    *,
    special: SpecialTokens,
    source_length: int,
    target_length: int,
) -> EncodedExamples:
    """Tokenize `examples` (objects with .source and .targets) for training or generation."""
    if not examples:
        raise ValueError("encode_examples: no examples")
    pad_id, eos_id = special.pad, special.eos
    sources = tokenizer([ex.source for ex in examples], add_special_tokens=True)["input_ids"]
    targets = tokenizer([ex.targets[0] for ex in examples], add_special_tokens=True)["input_ids"]
    input_ids, n_src = _pad_truncate(sources, source_length, pad_id, eos_id)
    labels, n_tgt = _pad_truncate(targets, target_length, pad_id, eos_id)
    if n_src or n_tgt:
        log.warning(
            "truncated %d of %d sources to %d tokens and %d targets to %d tokens",
            n_src, len(examples), source_length, n_tgt, target_length,
        )  # fmt: skip
    return EncodedExamples(input_ids, labels, n_src, n_tgt)


def batch_rows(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The example rows of step `step`: epochs of permutations drawn from PCG64([seed, epoch]).

    With fewer examples than a batch, rows repeat within the batch (an epoch is padded by
    drawing from the next permutations), so every step still has a full fixed-shape batch.
    """
    per_epoch = max(num_examples // batch_size, 1)
    epoch, within = divmod(step, per_epoch)
    if num_examples >= batch_size:
        perm = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_examples)
        return perm[within * batch_size : (within + 1) * batch_size]
    reps = -(-batch_size // num_examples)
    perms = [
        np.random.Generator(np.random.PCG64([seed, epoch, r])).permutation(num_examples)
        for r in range(reps)
    ]
    return np.concatenate(perms)[:batch_size]


def local_rows(rows: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This host's slice of a global batch's rows, as CorpusStream takes it.

    Every host draws the same global rows (a function of seed and step) and keeps the
    contiguous block [i * b, (i + 1) * b), b = global / process_count, which is the block
    `jax.make_array_from_process_local_data` expects from process i.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, process_count={process_count})"
        )
    if len(rows) % process_count:
        raise ValueError(
            f"global batch size {len(rows)} is not divisible by the {process_count} processes"
        )
    b = len(rows) // process_count
    return rows[process_index * b : (process_index + 1) * b]


def train_batch(data: EncodedExamples, rows: np.ndarray, *, special: SpecialTokens) -> Seq2SeqBatch:
    """The train-step batch of `rows` (weights 1 on every real label)."""
    labels = data.labels[rows]
    return {
        "input_ids": data.input_ids[rows],
        "decoder_input_ids": shift_right(labels, special.decoder_start),
        "labels": labels,
        "weights": (labels != special.pad).astype(np.float32),
    }


def pad_batch(batch: Seq2SeqBatch, like: Seq2SeqBatch, *, pad: int) -> Seq2SeqBatch:
    """`batch` padded on the right to the shapes of `like` (same keys and rows; longer
    sequences): pad tokens (masked out of attention) and weight 0, so its loss is unchanged and
    one compiled step takes both."""
    if set(batch) != set(like):
        raise ValueError(f"cannot pad a batch with keys {sorted(batch)} to {sorted(like)}")
    out = {}
    for key, value in batch.items():
        value, shape = np.asarray(value), np.shape(like[key])
        if value.shape[0] != shape[0] or value.shape[1] > shape[1]:
            raise ValueError(f"cannot pad {key} of shape {value.shape} to {shape}")
        fill = 0 if key == "weights" else pad
        out[key] = np.pad(value, ((0, 0), (0, shape[1] - value.shape[1])), constant_values=fill)
    return out  # type: ignore[return-value]


def eval_batches(
    data: EncodedExamples, batch_size: int, *, special: SpecialTokens
) -> Iterator[tuple[np.ndarray, int]]:
    """Fixed-shape batches over all examples in order; the last is padded with pad rows.

    Yields (input_ids [batch_size, S], number of real rows)."""
    n = len(data)
    for start in range(0, n, batch_size):
        chunk = data.input_ids[start : start + batch_size]
        real = len(chunk)
        if real < batch_size:
            pad = np.full((batch_size - real, chunk.shape[1]), special.pad, np.int32)
            pad[:, 0] = chunk[0, 0]  # a pad row still needs one real token to attend to
            chunk = np.concatenate([chunk, pad])
        yield chunk, real
