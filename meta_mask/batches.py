"""The batch contracts: every dict of arrays passed between modules, its keys, shapes and dtypes
written down once here; and `shift_right`, the one way a decoder input is made from labels.

The contracts are `TypedDict`s: at runtime a batch is a plain dict (jit, pytrees, sharding and
`batch["key"]` work unchanged); producers and consumers are annotated with its contract.
Sizes: B rows, L tokens of a sentence, E entities, S encoder and T decoder positions, K inner
steps. "pad" is the run's SpecialTokens.pad (special_tokens.py).

    corpus stream   CorpusBatch      data/stream.py CorpusStream.batch_at
        |  policies/mlm_batches.policy_batch (or policies/heuristic.collate of records)
    scorers         PolicyBatch      read by every Scorer, the sampler, LearnedScorer
        |  policies/corrupt.corrupt_np (the mask written in an output format)
    train step      Seq2SeqBatch     also data/seq2seq.train_batch; read by training/steps.py

The learned policies: supervised.collate_triples -> TripleBatch (a PolicyBatch with answer
labels), supervised.make_policy_batches -> PolicyTrainBatch; meta_train.meta_batch ->
MetaBatches (read by policies/meta_step.py's meta step).
"""

# No `from __future__ import annotations`: TypedDict must see NotRequired[...] evaluated to
# know which keys are optional (its __required_keys__ / __optional_keys__).
from typing import NotRequired, TypedDict, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

Array = np.ndarray | jax.Array  # host (numpy) or device (jax) batch, same contract


class CorpusBatch(TypedDict):
    """A block of corpus rows, padded to fixed shapes (numpy)."""

    input_ids: np.ndarray  # int32 [B, L]: <s> .. </s>, then pad
    word_ids: np.ndarray  # int32 [B, L]: each token's word index; -1 on specials and padding
    lengths: np.ndarray  # int32 [B]: real tokens per row
    entity_spans: np.ndarray  # int32 [B, E, 2]: half-open token spans; [0, 0) past num_entities
    num_entities: np.ndarray  # int32 [B]: real spans per row (at most E)
    indices: np.ndarray  # int64 [B]: corpus rows (CorpusStream.entity_labels(indices))


class PolicyBatch(TypedDict):
    """What a scorer, the sampler and the corruption read (numpy, host side)."""

    input_ids: np.ndarray  # int32 [B, L], pad-padded
    word_ids: np.ndarray  # int32 [B, L]; -1 on specials and padding
    valid: np.ndarray  # bool [B, L]: maskable (a word token, not SpecialTokens.unmaskable)
    entity_spans: np.ndarray  # int32 [B, E, 2]: half-open token spans; [-1, -1] = none
    entity_labels: list[list[str]]  # each row's span labels, in span order
    example_ids: np.ndarray  # int64 [B]: stable row ids (corpus rows): the masks' randomness


class TripleBatch(PolicyBatch):
    """A PolicyBatch of (context sentence, answer) triples: supervised.collate_triples."""

    labels: np.ndarray  # int32 [B, L]: 1 on maskable target tokens, 0 elsewhere
    label_kinds: np.ndarray  # int32 [B, L]: 1 answer, 2 question entity, 0 elsewhere
    rows: NotRequired[int]  # supervised.eval_batches: the real rows (the rest is filler)


class MaskableBatch(TypedDict):
    """Sentences a learned policy scores and masks inside a jitted step ([..., B, L]: the meta
    step's inner batches carry a leading K axis)."""

    input_ids: Array  # int32 [..., B, L], pad-padded
    valid: Array  # bool [..., B, L]: maskable tokens
    unit_ids: NotRequired[Array]  # int32 [..., B, L]: whole-word units (-1 = none)
    example_ids: NotRequired[Array]  # int32 [..., B]: the noise streams (meta_step.batch_noise)


class PolicyTrainBatch(MaskableBatch):
    """A supervised policy's training batch (supervised.make_policy_batches), [B, L]."""

    labels: Array  # float32 [B, L]: 1.0 on maskable target tokens (span objective: the mass)


class Seq2SeqBatch(TypedDict):
    """What the train step and the losses read: one (source, target) per row."""

    input_ids: Array  # int32 [B, S]: the encoder input, pad-padded
    decoder_input_ids: Array  # int32 [B, T]: shift_right(labels)
    labels: Array  # int32 [B, T]: the target, pad-padded
    weights: Array  # float32 [B, T]: each label's loss weight (0 on padding)
    attention_mask: NotRequired[Array]  # bool/int [B, S]; default input_ids != pad
    decoder_attention_mask: NotRequired[Array]  # bool/int [B, T]; default: none (causal only)


class SpanSeq2SeqBatch(Seq2SeqBatch):
    """A masked_spans example with its labels' sources (policies.corrupt.corrupt_spans_jax)."""

    label_source: Array  # int32 [B, T]: input position each label copies; -1 for the others


class MetaBatches(TypedDict):
    """One meta step's batches (policies/meta_train.meta_batch; meta_step.make_meta_step)."""

    inner: MaskableBatch  # [K, B, L]: the K inner MLM batches (contexts)
    outer: Seq2SeqBatch  # [B, .]: the inner contexts' questions, scored after the inner steps
    contrast: NotRequired[Seq2SeqBatch]  # [B, .]: other contexts' questions (contrastive)
    qa: NotRequired[Seq2SeqBatch]  # [N * B, .]: N in-loop QA steps (downstream_steps = N)


A = TypeVar("A", np.ndarray, jax.Array)


def shift_right(labels: A, decoder_start: int) -> A:
    """decoder_input_ids [..., T]: `labels` moved one step right, `decoder_start` first (as
    transformers' BART shift_tokens_right, for labels padded with pad rather than -100).
    numpy in, numpy out (the host pipeline); a jax array in (also under jit), jax out."""
    xp = jnp if isinstance(labels, jax.Array) else np
    start = xp.full(labels.shape[:-1] + (1,), decoder_start, labels.dtype)
    return xp.concatenate([start, labels[..., :-1]], axis=-1)
