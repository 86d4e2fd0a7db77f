"""Turning (tokens, mask) into one fixed-shape training example, in either output format.

Owns the two output formats of the study:
- "masked_spans" (T5): the encoder input is the sentence with each masked span (a maximal run
  of masked tokens; with infill="token" each masked token) replaced by one sentinel
  <extra_id_0>, <extra_id_1>, ... in order (<mask> for every span when the tokenizer has no
  sentinels); the decoder target is  sentinel_0 span_0 sentinel_1 span_1 ... </s>.
- "full_sentence" (BART text infilling): the encoder input has one <mask> per masked span (or
  per masked token with infill="token"); the target is the whole original sentence,
  <s> ... </s>. Optionally BERT's 80/10/10: each masked span/token is replaced by <mask> with
  probability 0.8, by random tokens (same length) with 0.1, and left unchanged with 0.1.

Both return a batches.Seq2SeqBatch (S = enc_len, T = dec_len) padded with special.pad, weights
1 on real labels and 0 on padding. The ids come from one SpecialTokens (special_tokens.py).
numpy for the host pipeline (vectorized over the batch); `corrupt_full_sentence_jax` is the jittable
same-length full-sentence variant for the learned policy, `corrupt_spans_jax` the jittable
masked_spans one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from meta_mask.batches import Seq2SeqBatch, SpanSeq2SeqBatch, shift_right
from meta_mask.policies.sampler import STREAM_CORRUPT, BatchRng
from meta_mask.special_tokens import SpecialTokens, sentinel_ids

REPLACE_PROBS = (0.8, 0.1, 0.1)  # <mask>, random tokens, unchanged
_MASK, _RANDOM, _KEEP = 0, 1, 2


def non_special_ids(tokenizer) -> np.ndarray:
    """Ids a random replacement may draw: the vocabulary minus special tokens and sentinels."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids) | set(sentinel_ids(tokenizer))
    return np.asarray(sorted(set(vocab.values()) - special), np.int32)


def _scatter_rows(values, keep, width, pad_id, name) -> np.ndarray:
    """Compact each row's kept values to the left of a [B, width] array padded with pad_id."""
    counts = keep.sum(1)
    if counts.max(initial=0) > width:
        raise ValueError(
            f"corrupt: an example needs {counts.max()} {name} positions but {name}={width}; "
            f"raise {name}"
        )
    out = np.full((keep.shape[0], width), pad_id, np.int32)
    rows, cols = np.nonzero(keep)
    out[rows, (np.cumsum(keep, axis=1) - 1)[rows, cols]] = values[rows, cols]
    return out


def _runs(mask: np.ndarray, infill: str) -> tuple[np.ndarray, np.ndarray]:
    """Where each masked run starts (a maximal span, or every token with infill="token") and
    each token's run index (-1 before the first run)."""
    prev = np.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    run_start = mask & ~prev if infill == "span" else mask
    return run_start, np.cumsum(run_start, axis=1) - 1


def _fit_target(mask, run_start, run_idx, dec_len) -> np.ndarray:
    """Unmask the trailing runs whose masked_spans target would not fit in dec_len (with </s>)."""
    end = np.cumsum(mask.astype(np.int64) + run_start, axis=1)  # target slots used so far
    next_continues = np.pad(mask & ~run_start, ((0, 0), (0, 1)))[:, 1:]
    last = mask & ~next_continues  # the last token of each run
    fits = np.zeros((mask.shape[0], mask.shape[1] + 1), bool)
    rows, cols = np.nonzero(last)
    fits[rows, run_idx[rows, cols]] = end[rows, cols] <= dec_len - 1
    return mask & np.take_along_axis(fits, np.maximum(run_idx, 0), axis=1)


def _replacement_actions(rng, random_ids, shape):
    """An 80/10/10 action and a random id drawn at every position (used at run starts)."""
    length = shape[1]
    action_at_start = np.empty(shape, np.int8)
    random_tokens = np.empty(shape, np.int32)
    cdf = np.cumsum(REPLACE_PROBS)
    for i, g in enumerate(rng.generators(STREAM_CORRUPT)):
        action_at_start[i] = np.searchsorted(cdf, g.random(length), side="right")
        random_tokens[i] = random_ids[g.integers(len(random_ids), size=length)]
    return np.minimum(action_at_start, _KEEP), random_tokens


def _checked_ids(input_ids, mask, output_format: str, infill: str, overflow: str) -> np.ndarray:
    """`input_ids` as int32, after checking corrupt_np's options and the mask's shape."""
    if output_format not in ("masked_spans", "full_sentence"):
        raise ValueError(f"output_format={output_format!r}; valid: masked_spans, full_sentence")
    if infill not in ("span", "token"):
        raise ValueError(f"infill={infill!r}; valid: span, token")
    input_ids = np.asarray(input_ids, np.int32)
    if np.shape(mask) != input_ids.shape:
        raise ValueError(f"mask shape {np.shape(mask)} != input_ids shape {input_ids.shape}")
    if overflow not in ("drop_spans", "error"):
        raise ValueError(f"overflow={overflow!r}; valid: drop_spans, error")
    return input_ids


def _replace_80_10_10(input_ids, mask, run_start, rng, random_ids) -> tuple[np.ndarray, np.ndarray]:
    """BERT's 80/10/10 over the masked runs: each token's action [B, L] (_MASK, _RANDOM or
    _KEEP) and the encoder values with the _RANDOM runs' tokens replaced by random ids."""
    if rng is None or random_ids is None or len(random_ids) == 0:
        raise ValueError("replace_80_10_10 needs rng (a BatchRng) and non-empty random_ids")
    at_start, random_tokens = _replacement_actions(
        rng, np.asarray(random_ids, np.int32), input_ids.shape
    )
    # Every token of a run follows the draw made at the run's start.
    run_first = np.maximum.accumulate(np.where(run_start, np.arange(input_ids.shape[1]), 0), axis=1)
    action = np.take_along_axis(at_start, run_first, axis=1)
    return action, np.where(mask & (action == _RANDOM), random_tokens, input_ids)


def _span_symbols(run_idx, output_format: str, special: SpecialTokens) -> np.ndarray:
    """The symbol that stands for each token's run [B, L]: its sentinel (masked_spans with a
    tokenizer that has sentinels), else <mask>."""
    sentinels = special.sentinels
    if output_format == "masked_spans" and len(sentinels):
        if run_idx.max(initial=-1) >= len(sentinels):
            raise ValueError(
                f"corrupt: a sentence has {run_idx.max() + 1} masked spans but the tokenizer "
                f"has {len(sentinels)} sentinels; lower the budget or add <extra_id_*> tokens"
            )
        return np.asarray(sentinels, np.int32)[np.maximum(run_idx, 0)]
    return np.full(run_idx.shape, special.mask, np.int32)


def _encoder_ids(enc_values, real, masked_out, run_start, symbol, enc_len, pad_id) -> np.ndarray:
    """The encoder input [B, enc_len]: each run of <mask>-replaced tokens (`masked_out`)
    collapsed to its symbol at the run's start, the rest of the sentence kept."""
    enc_values = np.where(masked_out & run_start, symbol, enc_values)
    enc_keep = real & ~(masked_out & ~run_start)
    return _scatter_rows(enc_values, enc_keep, enc_len, pad_id, "enc_len")


def _span_targets(
    input_ids, mask, run_start, symbol, dec_len: int, special: SpecialTokens
) -> tuple[np.ndarray, np.ndarray]:
    """The masked_spans target [B, dec_len], sentinel_0 span_0 sentinel_1 span_1 ... </s>, and
    each row's number of labels [B]."""
    # Each masked token emits itself, preceded by its span's sentinel at a span start.
    width = mask.astype(np.int64) + run_start
    end = np.cumsum(width, axis=1)  # one past each token's own slot
    n_labels = end[:, -1] + 1  # + </s>
    if n_labels.max(initial=0) > dec_len:
        raise ValueError(
            f"corrupt: a target needs {n_labels.max()} positions but dec_len={dec_len}; "
            "raise dec_len"
        )
    labels = np.full((input_ids.shape[0], dec_len), special.pad, np.int32)
    rows, cols = np.nonzero(mask)
    labels[rows, end[rows, cols] - 1] = input_ids[rows, cols]
    rows, cols = np.nonzero(run_start)
    labels[rows, end[rows, cols] - 2] = symbol[rows, cols]
    labels[np.arange(len(labels)), n_labels - 1] = special.eos
    return labels, n_labels


def corrupt_np(
    input_ids: np.ndarray,
    mask: np.ndarray,
    *,
    output_format: str,
    enc_len: int,
    dec_len: int,
    special: SpecialTokens,
    infill: str = "span",
    replace_80_10_10: bool = False,
    rng: BatchRng | None = None,
    random_ids: np.ndarray | None = None,
    overflow: str = "drop_spans",
) -> Seq2SeqBatch:
    """One training example per row of `input_ids` [B, L] (with <s> .. </s>, special.pad
    padding at the end) masked by `mask` [B, L] (bool); see the module docstring for the formats.

    replace_80_10_10 (full_sentence only) needs `rng` (draws use the STREAM_CORRUPT stream of
    each example) and `random_ids`, the ids a random replacement draws from uniformly (e.g.
    every non-special token id).

    overflow: a masked_spans target longer than dec_len raises with overflow="error"; with
    "drop_spans" (default: a rare long draw must not stop a training run) the trailing masked
    spans that do not fit are left unmasked, whole. The encoder always fits when enc_len >= L,
    the full-sentence target when dec_len >= L; otherwise both raise, naming the parameter.
    """
    input_ids = _checked_ids(input_ids, mask, output_format, infill, overflow)
    real = input_ids != special.pad
    mask = np.asarray(mask, bool) & real
    run_start, run_idx = _runs(mask, infill)
    if output_format == "masked_spans" and overflow == "drop_spans":
        mask = _fit_target(mask, run_start, run_idx, dec_len)
        run_start, run_idx = _runs(mask, infill)

    action = np.full(input_ids.shape, _MASK, np.int8)
    enc_values = input_ids.copy()
    if replace_80_10_10:
        if output_format != "full_sentence":
            raise ValueError("replace_80_10_10 applies to output_format='full_sentence' only")
        action, enc_values = _replace_80_10_10(input_ids, mask, run_start, rng, random_ids)

    symbol = _span_symbols(run_idx, output_format, special)
    masked_out = mask & (action == _MASK)
    enc = _encoder_ids(enc_values, real, masked_out, run_start, symbol, enc_len, special.pad)
    if output_format == "full_sentence":
        labels = _scatter_rows(input_ids, real, dec_len, special.pad, "dec_len")
        n_labels = real.sum(1)
    else:
        labels, n_labels = _span_targets(input_ids, mask, run_start, symbol, dec_len, special)
    weights = (np.arange(dec_len)[None, :] < n_labels[:, None]).astype(np.float32)
    return {
        "input_ids": enc,
        "decoder_input_ids": shift_right(labels, special.decoder_start),
        "labels": labels,
        "weights": weights,
    }


def corrupt_full_sentence_jax(
    input_ids: jax.Array, mask: jax.Array, special: SpecialTokens, *, infill: str = "token"
) -> SpanSeq2SeqBatch:
    """Jittable full-sentence example (BART's text infilling): equal to corrupt_np(...,
    output_format="full_sentence", infill=infill, enc_len=dec_len=L). One <mask> per masked
    token ("token": the encoder keeps the sentence's length) or per masked span ("span": the
    encoder is shorter, padded back to L); the target is the whole sentence. "label_source"
    points each masked token's label at its own position (-1 elsewhere)."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, length = input_ids.shape
    real = input_ids != special.pad
    mask = jnp.asarray(mask, bool) & real
    prev = jnp.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    run_start = mask & ~prev if infill == "span" else mask
    enc_values = jnp.where(mask & run_start, jnp.int32(special.mask), input_ids)
    keep = real & ~(mask & ~run_start)
    pos = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, length)  # length: dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
    enc = jnp.full((b, length), special.pad, jnp.int32).at[rows, pos].set(enc_values, mode="drop")
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    return {
        "input_ids": enc,
        "decoder_input_ids": shift_right(input_ids, special.decoder_start),
        "labels": input_ids,
        "weights": real.astype(jnp.float32),
        "label_source": jnp.where(mask, positions, -1),
    }


def corrupt_spans_jax(
    input_ids: jax.Array,
    mask: jax.Array,
    *,
    enc_len: int,
    dec_len: int,
    special: SpecialTokens,
    infill: str = "span",
) -> SpanSeq2SeqBatch:
    """Jittable masked_spans example, equal to corrupt_np(..., output_format="masked_spans",
    overflow="drop_spans") on every row whose corrupt_np would not raise (enc_len >= L; at most
    len(sentinels) spans), so a policy meta-learned through it is trained on exactly the
    examples the intermediate stage writes. Also returns "label_source" int32 [B, dec_len]: the
    input position each label reproduces (-1 for sentinels, </s> and padding), which maps
    per-token weights onto the target."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, length = input_ids.shape
    pad_id, sentinels = special.pad, special.sentinels
    real = input_ids != pad_id
    mask = jnp.asarray(mask, bool) & real

    def runs(m):
        prev = jnp.pad(m, ((0, 0), (1, 0)))[:, :-1]
        start = m & ~prev if infill == "span" else m
        return start, jnp.cumsum(start, axis=1) - 1

    run_start, run_idx = runs(mask)
    # Drop the trailing runs whose target (sentinel + tokens, then </s>) would not fit: a run
    # fits iff the target slots used up to its last token leave room for </s>.
    end = jnp.cumsum(mask.astype(jnp.int32) + run_start, axis=1)
    slot = jnp.where(mask, run_idx, length)  # unmasked tokens go to a spare segment
    run_end = jax.vmap(lambda e, r: jax.ops.segment_max(e, r, num_segments=length + 1))(
        jnp.where(mask, end, 0), slot
    )
    mask = mask & (jnp.take_along_axis(run_end, slot, axis=1) <= dec_len - 1)
    run_start, run_idx = runs(mask)

    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
    if len(sentinels):
        table = jnp.asarray(sentinels, jnp.int32)
        symbol = table[jnp.clip(run_idx, 0, len(sentinels) - 1)]
    else:
        symbol = jnp.full((b, length), special.mask, jnp.int32)
    enc_values = jnp.where(mask & run_start, symbol, input_ids)
    keep = real & ~(mask & ~run_start)
    enc_pos = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, enc_len)  # enc_len: dropped
    enc = jnp.full((b, enc_len), pad_id, jnp.int32).at[rows, enc_pos].set(enc_values, mode="drop")

    end = jnp.cumsum(mask.astype(jnp.int32) + run_start, axis=1)  # one past each token's slot
    n_labels = end[:, -1] + 1  # + </s>
    token_pos = jnp.where(mask, end - 1, dec_len)
    sentinel_pos = jnp.where(mask & run_start, end - 2, dec_len)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    labels = jnp.full((b, dec_len), pad_id, jnp.int32)
    labels = labels.at[rows, token_pos].set(input_ids, mode="drop")
    labels = labels.at[rows, sentinel_pos].set(symbol, mode="drop")
    labels = labels.at[jnp.arange(b), n_labels - 1].set(special.eos, mode="drop")
    source = jnp.full((b, dec_len), -1, jnp.int32).at[rows, token_pos].set(positions, mode="drop")
    return {
        "input_ids": enc,
        "decoder_input_ids": shift_right(labels, special.decoder_start),
        "labels": labels,
        "weights": (jnp.arange(dec_len)[None, :] < n_labels[:, None]).astype(jnp.float32),
        "label_source": source,
    }
