"""Jitted greedy and beam-search generation, token-for-token equal to Hugging Face `generate`.

This module owns decoding: the logits processors HF applies for BART (min length, forced BOS,
forced EOS), the greedy loop, the (vectorized) beam search, and the model-level `generate` /
`make_generate_fn` that encode once and decode with the model's key/value cache.

The search functions never see the model. They take a step function

    step_fn(token_ids: int32 [N, 1], cache) -> (logits [N, V], new_cache)

with beams folded into the batch axis (N = batch * num_beams, row b * num_beams + k is beam k of
example b, the order HF's `repeat_interleave` gives). Beam search reorders the cache after each
step by taking, along axis 0, every cache leaf whose leading axis has size N; other leaves (a
scalar decode position, say) are shared by all rows and kept as they are.

Everything runs on fixed shapes inside one `jax.lax.while_loop` that stops as soon as every
sequence is done, so the whole search is one jittable function with no host round-trips.
Outputs are int32 [B, max_length]: position 0 holds the decoder start token (as HF's output does),
then the generated tokens, then `pad_token_id` after EOS. HF crops its output to the longest
sequence in the batch; padding HF's output to `max_length` with `pad_token_id` gives ours.

Lengths follow HF: `max_length` and `min_length` count the decoder start token, and beam search's
length penalty divides a finished hypothesis' summed log-probability by
(number of generated tokens, EOS included) ** length_penalty.

Not implemented (pass them disabled to HF when comparing): sampling, no_repeat_ngram_size,
repetition/bad-words processors, multiple EOS ids, num_return_sequences (beam search returns all
`num_beams` finished hypotheses, best first; `generate` keeps the best). One HF quirk is not
copied: HF's beam search pads with EOS instead when pad_token_id == 0 (never the case for BART).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from meta_mask.config import ModelConfig
from meta_mask.model.bart import Bart, decode_step, init_cache

# HF adds this to a candidate's score to rule it out (a soft mask, not -inf, so arithmetic on
# masked scores stays finite). We add it in the same places and order, so that rounding (and
# hence the order of near-equal masked candidates) follows HF's float32 arithmetic.
_MASK = -1.0e9

Cache = Any
StepFn = Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]


class BeamSearchOutput(NamedTuple):
    """All `num_beams` finished hypotheses per example, best first (HF's `sequences_scores`)."""

    sequences: jax.Array  # int32 [B, num_beams, max_length]
    scores: jax.Array  # float32 [B, num_beams]: sum of log-probs / generated_len ** length_penalty


def _check_lengths(max_length: int, min_length: int) -> None:
    if max_length < 2:
        raise ValueError(
            f"max_length={max_length}: it counts the decoder start token, so it must be >= 2 "
            "to generate anything"
        )
    if min_length < 0:
        raise ValueError(f"min_length={min_length} must be >= 0")


def process_scores(
    scores: jax.Array,
    cur_len: jax.Array,
    *,
    max_length: int,
    eos_token_id: int,
    min_length: int = 0,
    forced_bos_token_id: int | None = None,
    forced_eos_token_id: int | None = None,
) -> jax.Array:
    """HF's MinLength, ForcedBOS, ForcedEOS logits processors, applied in HF's order.

    `scores` [N, V] are logits (greedy) or log-probabilities (beam search); `cur_len` is the
    length of the sequences so far, decoder start token included. A forced token gets score 0 and
    every other token -inf, so the forcing processors, applied later, override the min length.
    """
    vocab = jnp.arange(scores.shape[-1])
    neg_inf = jnp.array(-jnp.inf, scores.dtype)
    if min_length > 0:
        scores = jnp.where((cur_len < min_length) & (vocab == eos_token_id), neg_inf, scores)
    for token, at_len in ((forced_bos_token_id, 1), (forced_eos_token_id, max_length - 1)):
        if token is not None:
            forced = jnp.where(vocab == token, jnp.zeros((), scores.dtype), neg_inf)
            scores = jnp.where(cur_len == at_len, jnp.broadcast_to(forced, scores.shape), scores)
    return scores


def _bound_processor(
    max_length: int,
    eos_token_id: int,
    min_length: int,
    forced_bos_token_id: int | None,
    forced_eos_token_id: int | None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """process_scores with the generation settings bound: (scores, cur_len) -> scores."""
    return lambda scores, cur_len: process_scores(
        scores,
        cur_len,
        max_length=max_length,
        eos_token_id=eos_token_id,
        min_length=min_length,
        forced_bos_token_id=forced_bos_token_id,
        forced_eos_token_id=forced_eos_token_id,
    )


def reorder_cache(cache: Cache, row_indices: jax.Array) -> Cache:
    """Gathers cache rows: leaves with leading axis N = len(row_indices) are per-row state."""
    n = row_indices.shape[0]

    def take(leaf):
        if leaf.ndim >= 1 and leaf.shape[0] == n:
            return jnp.take(leaf, row_indices, axis=0)
        return leaf

    return jax.tree.map(take, cache)


def _column(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[..., index] for a traced index."""
    return jax.lax.dynamic_index_in_dim(x, index, axis=x.ndim - 1, keepdims=False)


def _set_column(x: jax.Array, index: jax.Array, values: jax.Array) -> jax.Array:
    """x with x[..., index] = values, for a traced index."""
    return jnp.where(jnp.arange(x.shape[-1]) == index, values[..., None], x)


def greedy_search(
    step_fn: StepFn,
    cache: Cache,
    batch_size: int,
    *,
    max_length: int,
    decoder_start_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    forced_bos_token_id: int | None = None,
    forced_eos_token_id: int | None = None,
    min_length: int = 0,
) -> jax.Array:
    """Argmax decoding; returns int32 [batch_size, max_length] (see the module docstring)."""
    _check_lengths(max_length, min_length)
    process = _bound_processor(
        max_length, eos_token_id, min_length, forced_bos_token_id, forced_eos_token_id
    )
    sequences = jnp.full((batch_size, max_length), pad_token_id, jnp.int32)
    sequences = sequences.at[:, 0].set(decoder_start_token_id)
    init = (jnp.int32(1), sequences, jnp.ones((batch_size,), bool), cache)

    def cond(state):
        cur_len, _, unfinished, _ = state
        return (cur_len < max_length) & jnp.any(unfinished)

    def body(state):
        cur_len, sequences, unfinished, cache = state
        last = _column(sequences, cur_len - 1)[:, None]
        logits, cache = step_fn(last, cache)
        scores = process(logits.astype(jnp.float32), cur_len)
        next_tokens = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        # HF: once a row has emitted EOS it only receives padding.
        next_tokens = jnp.where(unfinished, next_tokens, pad_token_id)
        sequences = _set_column(sequences, cur_len, next_tokens)
        unfinished = unfinished & (next_tokens != eos_token_id)
        return cur_len + 1, sequences, unfinished, cache

    return jax.lax.while_loop(cond, body, init)[1]


def _length_penalties(max_length: int, length_penalty: float) -> jax.Array:
    """penalty[n] = n ** length_penalty, computed in float64 and rounded once to float32.

    HF divides float32 scores by a Python float; a table built the same way keeps us bit-equal
    (jnp.power in float32 can be an ulp off). Index 0 is never used.
    """
    table = [1.0] + [float(n) ** length_penalty for n in range(1, max_length + 1)]
    return jnp.asarray(np.asarray(table, np.float32))


def beam_search(
    step_fn: StepFn,
    cache: Cache,
    batch_size: int,
    *,
    num_beams: int,
    max_length: int,
    decoder_start_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    forced_bos_token_id: int | None = None,
    forced_eos_token_id: int | None = None,
    min_length: int = 0,
) -> BeamSearchOutput:
    """HF's vectorized beam search (transformers 5.x `GenerationMixin._beam_search`), in JAX.

    The cache holds N = batch_size * num_beams rows. Per step every running beam proposes V
    tokens; the best 2 * num_beams (beam, token) pairs are kept so that, even if num_beams of them
    end in EOS, num_beams unfinished ones remain to run on. Of those, the EOS-ending (or
    max-length-reaching) candidates *ranked within the top num_beams* join the finished set,
    scored sum_logprobs / generated_len ** length_penalty; the finished set keeps its best
    num_beams. `early_stopping`: True stops an example once it has num_beams finished hypotheses;
    False (HF's default) stops it when the best running beam, normalized by the current length,
    can no longer beat the worst finished one; "never" makes that test exact by using max_length
    instead of the current length when length_penalty > 0.
    """
    _check_lengths(max_length, min_length)
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping={early_stopping!r}; valid: True, False, 'never'")
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be >= 1")
    b, k, n_keep = batch_size, num_beams, 2 * num_beams  # one EOS id: keep (1 + 1) * num_beams
    early_true = early_stopping is True
    penalties = _length_penalties(max_length, length_penalty)
    if early_stopping == "never" and length_penalty > 0.0:
        best_len = lambda cur_len: jnp.int32(max_length - 1)
    else:
        best_len = lambda cur_len: cur_len - 1
    process = _bound_processor(
        max_length, eos_token_id, min_length, forced_bos_token_id, forced_eos_token_id
    )
    gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)
    in_top_k = jnp.arange(n_keep) < k
    mask = lambda flag: flag.astype(jnp.float32) * _MASK

    running_seq = jnp.full((b, k, max_length), pad_token_id, jnp.int32)
    running_seq = running_seq.at[:, :, 0].set(decoder_start_token_id)
    # Only beam 0 is live at first, so the first step does not pick the same token k times.
    running_scores = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_MASK)
    init = dict(
        cur_len=jnp.int32(1),
        running_seq=running_seq,
        running_scores=running_scores,
        seq=running_seq,
        scores=jnp.full((b, k), _MASK, jnp.float32),
        finished=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b, 1), bool),  # HF: is_early_stop_heuristic_unsatisfied
        done=jnp.array(False),
        cache=cache,
    )

    def body(s):
        cur_len = s["cur_len"]
        last = _column(s["running_seq"], cur_len - 1).reshape(b * k, 1)
        logits, cache = step_fn(last, s["cache"])
        log_probs = process(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), cur_len)
        vocab = log_probs.shape[-1]
        totals = log_probs.reshape(b, k, vocab) + s["running_scores"][:, :, None]
        top_scores, top_flat = jax.lax.top_k(totals.reshape(b, k * vocab), n_keep)
        top_beam, top_token = top_flat // vocab, (top_flat % vocab).astype(jnp.int32)
        top_seq = _set_column(gather(s["running_seq"], top_beam), cur_len, top_token)
        hits_stop = (top_token == eos_token_id) | (cur_len + 1 >= max_length)

        # The best k candidates that did not stop run on.
        _, pick = jax.lax.top_k(top_scores + mask(hits_stop), k)
        running_seq = gather(top_seq, pick)
        running_scores = gather(top_scores + mask(hits_stop), pick)
        source_row = gather(top_beam, pick) + jnp.arange(b)[:, None] * k

        # Stopped candidates ranked within the top k join the finished set (if still open).
        just_finished = hits_stop & in_top_k
        cand = top_scores / penalties[cur_len]
        cand = cand + mask(jnp.all(s["finished"], axis=1, keepdims=True) & early_true)
        cand = cand + mask(~s["improvable"])
        cand = cand + mask(~just_finished)
        merged_scores = jnp.concatenate([s["scores"], cand], axis=1)
        _, keep = jax.lax.top_k(merged_scores, k)
        seq = gather(jnp.concatenate([s["seq"], top_seq], axis=1), keep)
        scores = gather(merged_scores, keep)
        finished = gather(jnp.concatenate([s["finished"], just_finished], axis=1), keep)

        cache = reorder_cache(cache, source_row.reshape(b * k))
        cur_len = cur_len + 1
        best_running = running_scores[:, :1] / penalties[best_len(cur_len)]
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _MASK)
        improvable = s["improvable"] & jnp.any(best_running > worst_finished, axis=1, keepdims=True)
        still_open = ~(jnp.all(finished) & early_true)
        done = ~(jnp.any(improvable) & still_open & ~jnp.all(hits_stop))
        return dict(
            cur_len=cur_len,
            running_seq=running_seq,
            running_scores=running_scores,
            seq=seq,
            scores=scores,
            finished=finished,
            improvable=improvable,
            done=done,
            cache=cache,
        )

    final = jax.lax.while_loop(lambda s: ~s["done"], body, init)
    return BeamSearchOutput(final["seq"], final["scores"])


def generate(
    model: Bart,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    config: ModelConfig,
    max_length: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    min_length: int = 0,
) -> jax.Array:
    """Greedy (num_beams=1) or beam-search decoding: int32 [B, max_length].

    Encodes once, builds the decode cache for B * num_beams rows, and runs the search. Special
    tokens (decoder start, EOS, pad, forced BOS/EOS) come from `config`, as HF's come from
    `model.generation_config`; use `config.replace(forced_eos_token_id=None)` to change them.
    `attention_mask` defaults to input_ids != pad_token_id. Jit it with `make_generate_fn`.
    """
    if max_length - 1 > config.max_position_embeddings:
        raise ValueError(
            f"max_length={max_length} needs {max_length - 1} decoder positions but "
            f"ModelConfig.max_position_embeddings={config.max_position_embeddings}"
        )
    if attention_mask is None:
        attention_mask = input_ids != config.pad_token_id
    attention_mask = attention_mask.astype(bool)
    batch_size = input_ids.shape[0]
    encoded = model.apply({"params": params}, input_ids, attention_mask, method=Bart.encode)
    # Beams are rows b * num_beams + k, the order of HF's repeat_interleave.
    encoded = jnp.repeat(encoded, num_beams, axis=0)
    attention_mask = jnp.repeat(attention_mask, num_beams, axis=0)
    # Steps feed the tokens at positions 0 .. max_length - 2.
    cache = init_cache(model, params, encoded, attention_mask, max_decode_len=max_length - 1)

    def step_fn(token_ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        logits, cache = decode_step(model, params, cache, token_ids, attention_mask)
        return logits[:, -1], cache

    tokens = dict(
        max_length=max_length,
        decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        forced_bos_token_id=config.forced_bos_token_id,
        forced_eos_token_id=config.forced_eos_token_id,
        min_length=min_length,
    )
    if num_beams == 1:
        return greedy_search(step_fn, cache, batch_size, **tokens)
    out = beam_search(
        step_fn,
        cache,
        batch_size,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        **tokens,
    )
    return out.sequences[:, 0]


def make_generate_fn(
    model: Bart,
    *,
    config: ModelConfig,
    max_length: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    min_length: int = 0,
) -> Callable[..., jax.Array]:
    """`generate` with its options fixed, jitted: fn(params, input_ids, attention_mask=None).

    Compiles once per (batch, source length) shape; pad inputs to fixed buckets to reuse it.
    """
    options = dict(
        config=config,
        max_length=max_length,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        min_length=min_length,
    )

    def generate_fn(
        params: Any, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        return generate(model, params, input_ids, attention_mask, **options)

    return jax.jit(generate_fn)
