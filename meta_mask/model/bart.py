"""The BART encoder-decoder as a Flax linen module, with a key/value cache for decoding.

Owns: `Bart` (the module), `init_params`, the decode-cache API (`init_cache`, `decode_step`)
that greedy and beam search are built on, and the token cross-entropy (`cross_entropy` on
logits; `head_cross_entropy`, fused with the LM head, behind `Bart.token_cross_entropy`, the
train step's loss). It mirrors `transformers.BartForConditionalGeneration` (post-layer-norm
blocks, learned positions with offset 2, `layernorm_embedding`, tied input/output embeddings plus
`final_logits_bias`) so that a Hugging Face checkpoint maps onto the parameter tree name by name
(see `meta_mask.model.hf`).

Numerics: parameters are float32; matmuls run in `config.dtype` (float32 or bfloat16); layer
norms and softmax always run in float32; logits are returned in float32.

Decode-cache API (one token at a time, for meta_mask/model/generate.py)
-----------------------------------------------------------------------
    model = Bart(config)
    # 1. Encode once.
    enc = model.apply({"params": params}, input_ids, attention_mask, method=Bart.encode)
    enc_mask = attention_mask  # [B, S] bool/int; (input_ids != pad) if you have no mask
    # 2. Build the cache for batch B (= enc.shape[0]) and at most T decoder tokens.
    cache = init_cache(model, params, enc, enc_mask, max_decode_len=T)
    # 3. Step: feed the previous token [B, 1]; get logits [B, 1, V] (float32) and the new cache.
    logits, cache = decode_step(model, params, cache, tokens, enc_mask)
    # equivalently:
    # logits, mut = model.apply({"params": params, "cache": cache}, tokens, None, enc_mask,
    #                           decode=True, method=Bart.decode, mutable=["cache"])
    # cache = mut["cache"]

The first step feeds `decoder_start_token_id` (2 for BART); step t (0-based) uses learned
position t, exactly as the full teacher-forced pass does, so the logits of step t equal
`model.apply(..., decoder_input_ids)[:, t]` for the same prefix.

Cache contents (a plain pytree, safe to pass through `jax.jit` / `lax.while_loop`):
  - `cache["decoder"]["position_index"]`: int32 scalar, number of tokens decoded so far.
  - per layer i, `cache["decoder"][f"layers_{i}"]["self_attn"]`:
      `cached_key`, `cached_value` [B, H, T, Dh] (compute dtype) and `cache_index` (int32 scalar);
  - per layer i, `cache["decoder"][f"layers_{i}"]["encoder_attn"]`:
      `cross_key`, `cross_value` [B, H, S, Dh]: the encoder output projected once in `init_cache`,
      so steps never recompute them (and need no encoder output: pass None).
Every array leaf with ndim > 0 has the batch on axis 0 and every scalar leaf is a step counter
shared by the whole batch, so beam search can expand / reorder beams with
`jax.tree.map(lambda x: x[idx] if x.ndim else x, cache)` (see `reorder_cache`); to start B*K
beams, either encode the repeated inputs or `reorder_cache(init_cache(...), jnp.repeat(
jnp.arange(B), K))`. All beams of a batch advance together (one shared step counter).
Decoding more than T tokens is not checked inside jit (extra tokens overwrite the last cache
slot): callers must stop at T. T and the encoder length must be <= `max_position_embeddings`
(checked while tracing: ValueError).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from meta_mask.config import ModelConfig

Array = jax.Array
PyTree = Any

# HF's BartLearnedPositionalEmbedding looks up position + 2 (a fairseq legacy of padding_idx=1).
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which BART checkpoints were trained with.


def _erf_gelu(x: Array) -> Array:
    # torch's exact gelu, written as torch writes it: x/2 * (1 + erf(x/sqrt 2)). jax.nn.gelu's
    # exact form goes through erfc, measured ~2% of the whole CPU train step slower.
    return 0.5 * x * (1.0 + jax.lax.erf(x * (2.0**-0.5)))


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATION_FNS: dict[str, Callable[[Array], Array]] = {
    "gelu": _erf_gelu,
    "gelu_python": _erf_gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "quick_gelu": _quick_gelu,
}


def compute_dtype(config: ModelConfig) -> jnp.dtype:
    return jnp.dtype(config.dtype)


class Dense(nn.Module):
    """nn.Dense (same parameters: kernel [in, out], bias [out], HF-style init) as a 2-D matmul.

    The [..., in] input is flattened to rows first: a 3-D dot_general contracting over (batch,
    time) in the backward pass made XLA CPU compute every kernel gradient from transposed
    copies at about half the matmul rate (fc1 / fc2 alone: 7% of the whole CPU train step).
    """

    config: ModelConfig
    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype = compute_dtype(cfg)
        shape = (x.shape[-1], self.features)
        # HF BartPreTrainedModel._init_weights: Linear weights ~ N(0, init_std), biases zero.
        kernel = self.param("kernel", nn.initializers.normal(cfg.init_std), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        rows = x.reshape(-1, x.shape[-1]).astype(dtype)
        y = jnp.matmul(rows, kernel.astype(dtype)) + bias.astype(dtype)
        return y.reshape(*x.shape[:-1], self.features)


def _layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
    # A plain nn.LayerNorm keeps the tree flat ({name}/{scale,bias}); float32 statistics.
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS, dtype=jnp.float32, param_dtype=jnp.float32, name=name
    )


def _apply_ln(ln: nn.LayerNorm, x: Array, dtype: jnp.dtype) -> Array:
    return ln(x.astype(jnp.float32)).astype(dtype)


def _mix32(h: Array) -> Array:
    """lowbias32, a bijective 32-bit integer hash with full avalanche (C. Wellons)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


class Dropout(nn.Module):
    """Inverted dropout (as nn.Dropout) whose random bits are a counter-based hash.

    jax's threefry runs as a rolled loop over whole arrays on CPU (20 rounds, each a pass over
    memory) and was ~7% of a d_model-256 CPU train step; 'rbg' keys were slower still there.
    Here the "dropout" rng gives two 32-bit seeds (one threefry block) and element i's bits are
    mix(mix(i ^ s0) + s1), a pure elementwise function that XLA fuses into the select: no bits
    array is written. The mask is a pure function of the rng, so a resumed run redraws it
    exactly. mix is a bijection, so the elements of one call get distinct 32-bit values. An
    element is kept iff its value < round((1 - rate) * 2**32) and kept values are scaled by
    2**32 / that threshold (the exact inverse keep probability).
    """

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        if x.size > 2**32:
            raise ValueError(f"Dropout takes at most 2**32 elements, got shape {x.shape}")
        seed = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
        index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
        bits = _mix32(_mix32(index ^ seed[0]) + seed[1])
        threshold = min(round((1.0 - self.rate) * 2.0**32), 2**32 - 1)
        keep = bits < jnp.uint32(threshold)
        scale = jnp.asarray(2.0**32 / threshold, x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


class Attention(nn.Module):
    """Multi-head attention with q/k/v/out projections named like HF's BartAttention.

    `mask` is boolean, broadcastable to [B, 1, Lq, Lk], True where attention is allowed.
    Queries, keys and values are split head-major, [B, H, L, Dh], right after their 2-D
    projections: the score and value matmuls then run over contiguous [L, Dh] blocks (with
    [B, L, H, Dh] operands XLA CPU inserted its own copies in every einsum, forward and backward;
    measured ~25% slower attention blocks). Self-attention caches keys/values per decoded token;
    cross-attention caches the projected encoder output once (see the module docstring).
    """

    config: ModelConfig
    num_heads: int
    is_cross: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        kv: Array | None,
        mask: Array | None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """x [B,Lq,D] -> [B,Lq,D]; `kv` is the encoder output for cross-attention, else None."""
        cfg = self.config
        dtype = compute_dtype(cfg)
        d = cfg.d_model
        heads = self.num_heads

        def split(t: Array) -> Array:  # [B, L, D] -> [B, H, L, Dh]
            return t.reshape(t.shape[0], t.shape[1], heads, d // heads).transpose(0, 2, 1, 3)

        q = split(Dense(cfg, d, name="q_proj")(x))
        k_proj, v_proj = Dense(cfg, d, name="k_proj"), Dense(cfg, d, name="v_proj")

        if self.is_cross:
            if decode and self.has_variable("cache", "cross_key"):
                k = self.get_variable("cache", "cross_key")
                v = self.get_variable("cache", "cross_value")
            else:
                if kv is None:
                    raise ValueError("cross-attention needs the encoder output (no cache yet)")
                k, v = split(k_proj(kv)), split(v_proj(kv))
                if decode:  # first (initializing) call: store the projected encoder output
                    self.put_variable("cache", "cross_key", k)
                    self.put_variable("cache", "cross_value", v)
        else:
            k, v = split(k_proj(x)), split(v_proj(x))
            if decode:
                k, v, mask = self._update_cache(k, v, mask)

        # Scores accumulate in float32 even for bf16 inputs; softmax runs in float32.
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * (q.shape[-1] ** -0.5)  # HF BartAttention.scaling
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = Dropout(rate=cfg.attention_dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), v)
        out = out.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], d)
        return Dense(cfg, d, name="out_proj")(out)

    def _update_cache(self, k: Array, v: Array, mask: Array | None) -> tuple[Array, Array, Any]:
        """flax-wmt style: the initializing call sizes the cache from the input length T."""
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            return k, v, mask  # init pass: a normal causal pass whose output is discarded
        step_len = k.shape[2]
        max_len = cached_key.value.shape[2]
        if step_len != 1:
            raise ValueError(f"decode=True takes one token per step, got length {step_len}")
        idx = cache_index.value
        k = jax.lax.dynamic_update_slice(cached_key.value, k, (0, 0, idx, 0))
        v = jax.lax.dynamic_update_slice(cached_value.value, v, (0, 0, idx, 0))
        cached_key.value, cached_value.value = k, v
        cache_index.value = idx + 1
        # The new query (position idx) sees cache slots 0..idx; later slots are still zeros.
        return k, v, (jnp.arange(max_len) <= idx)[None, None, None, :]


class EncoderLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        dtype = compute_dtype(cfg)
        drop = Dropout(rate=cfg.dropout)
        h = Attention(cfg, cfg.encoder_attention_heads, name="self_attn")(
            x, None, mask, deterministic
        )
        x = _apply_ln(_layer_norm(cfg, "self_attn_layer_norm"), x + drop(h, deterministic), dtype)
        h = ACTIVATION_FNS[cfg.activation_function](Dense(cfg, cfg.encoder_ffn_dim, name="fc1")(x))
        h = Dropout(rate=cfg.activation_dropout)(h, deterministic=deterministic)
        h = Dense(cfg, cfg.d_model, name="fc2")(h)
        return _apply_ln(_layer_norm(cfg, "final_layer_norm"), x + drop(h, deterministic), dtype)


class DecoderLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        enc: Array | None,
        enc_mask: Array | None,
        self_mask: Array | None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        cfg = self.config
        dtype = compute_dtype(cfg)
        heads = cfg.decoder_attention_heads
        drop = Dropout(rate=cfg.dropout)
        h = Attention(cfg, heads, name="self_attn")(x, None, self_mask, deterministic, decode)
        x = _apply_ln(_layer_norm(cfg, "self_attn_layer_norm"), x + drop(h, deterministic), dtype)
        h = Attention(cfg, heads, is_cross=True, name="encoder_attn")(
            x, enc, enc_mask, deterministic, decode
        )
        x = _apply_ln(
            _layer_norm(cfg, "encoder_attn_layer_norm"), x + drop(h, deterministic), dtype
        )
        h = ACTIVATION_FNS[cfg.activation_function](Dense(cfg, cfg.decoder_ffn_dim, name="fc1")(x))
        h = Dropout(rate=cfg.activation_dropout)(h, deterministic=deterministic)
        h = Dense(cfg, cfg.d_model, name="fc2")(h)
        return _apply_ln(_layer_norm(cfg, "final_layer_norm"), x + drop(h, deterministic), dtype)


def _positions(config: ModelConfig, name: str) -> nn.Embed:
    return nn.Embed(
        config.max_position_embeddings + POSITION_OFFSET,
        config.d_model,
        dtype=compute_dtype(config),
        param_dtype=jnp.float32,
        embedding_init=nn.initializers.normal(config.init_std),
        name=name,
    )


def _check_length(config: ModelConfig, length: int, what: str) -> None:
    # Shapes are static, so this costs nothing under jit; an out-of-range learned position would
    # otherwise silently read NaN.
    if length > config.max_position_embeddings:
        raise ValueError(
            f"{what} length {length} exceeds max_position_embeddings="
            f"{config.max_position_embeddings}; truncate the inputs or lower max_decode_len"
        )


class Encoder(nn.Module):
    """Positions + layernorm_embedding + encoder layers, on already-embedded tokens."""

    config: ModelConfig

    @nn.compact
    def __call__(self, embeds: Array, mask: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        dtype = compute_dtype(cfg)
        _check_length(cfg, embeds.shape[1], "input_ids")
        positions = jnp.arange(embeds.shape[1]) + POSITION_OFFSET
        x = embeds + _positions(cfg, "embed_positions")(positions)[None]
        x = _apply_ln(_layer_norm(cfg, "layernorm_embedding"), x, dtype)
        x = Dropout(rate=cfg.dropout)(x, deterministic=deterministic)
        attn_mask = mask[:, None, None, :]  # [B,1,1,S]: keys only, like HF's bidirectional mask
        layer_cls = nn.remat(EncoderLayer, static_argnums=(3,)) if cfg.remat else EncoderLayer
        for i in range(cfg.encoder_layers):
            x = layer_cls(cfg, name=f"layers_{i}")(x, attn_mask, deterministic)
        return x


class Decoder(nn.Module):
    """Positions + layernorm_embedding + causal decoder layers, on already-embedded tokens."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        embeds: Array,
        enc: Array | None,
        enc_mask: Array,
        decoder_mask: Array | None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        cfg = self.config
        dtype = compute_dtype(cfg)
        length = embeds.shape[1]
        start = jnp.array(0, jnp.int32)
        if decode:
            initialized = self.has_variable("cache", "position_index")
            index = self.variable("cache", "position_index", lambda: jnp.array(0, jnp.int32))
            if initialized:  # a real step: learned position = tokens decoded so far
                start = index.value
                index.value = start + length
            else:
                _check_length(cfg, length, "max_decode_len")
        else:
            _check_length(cfg, length, "decoder_input_ids")
        positions = start + jnp.arange(length) + POSITION_OFFSET
        x = embeds + _positions(cfg, "embed_positions")(positions)[None]
        x = _apply_ln(_layer_norm(cfg, "layernorm_embedding"), x, dtype)
        x = Dropout(rate=cfg.dropout)(x, deterministic=deterministic)

        self_mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1,1,T,T]
        if decoder_mask is not None:
            self_mask = self_mask & decoder_mask.astype(bool)[:, None, None, :]
        enc_attn_mask = enc_mask.astype(bool)[:, None, None, :]
        layer_cls = nn.remat(DecoderLayer, static_argnums=(5, 6)) if cfg.remat else DecoderLayer
        for i in range(cfg.decoder_layers):
            x = layer_cls(cfg, name=f"layers_{i}")(
                x, enc, enc_attn_mask, self_mask, deterministic, decode
            )
        return x


class Bart(nn.Module):
    """BART for conditional generation (HF `BartForConditionalGeneration` semantics).

    `__call__(input_ids [B,S], decoder_input_ids [B,T], attention_mask=None,
    decoder_attention_mask=None, deterministic=True)` -> logits [B,T,V] float32. Dropout is active
    only with deterministic=False and a "dropout" rng. `final_logits_bias` is a parameter for
    checkpoint compatibility but, like HF's buffer, receives no gradient.
    """

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        init_std = cfg.init_std
        pad = cfg.pad_token_id

        def embed_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
            # HF: N(0, init_std) with the padding_idx row zeroed.
            w = jax.random.normal(key, shape, dtype) * init_std
            return w.at[pad].set(0.0) if 0 <= pad < shape[0] else w

        self.shared = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=compute_dtype(cfg),
            param_dtype=jnp.float32,
            embedding_init=embed_init,
        )
        self.final_logits_bias = self.param(
            "final_logits_bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32
        )
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def token_embedding(self, input_ids: Array) -> Array:
        """Shared embedding lookup, times sqrt(d_model) when scale_embedding: [B,L,D]."""
        scale = math.sqrt(self.config.d_model) if self.config.scale_embedding else 1.0
        return self.shared(input_ids) * jnp.asarray(scale, compute_dtype(self.config))

    def encode(
        self, input_ids: Array, attention_mask: Array | None = None, deterministic: bool = True
    ) -> Array:
        """Encoder output [B,S,D] in the compute dtype. Mask defaults to input_ids != pad."""
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        return self.encoder(
            self.token_embedding(input_ids), attention_mask.astype(bool), deterministic
        )

    def decode(
        self,
        decoder_input_ids: Array,
        encoder_hidden: Array | None,
        encoder_attention_mask: Array | None,
        decoder_attention_mask: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """Decoder + tied LM head: logits [B,T,V] float32.

        With decode=True see the module docstring (cache API); `encoder_hidden` may then be None
        once the cache exists, and `decoder_attention_mask` must be None (decoding never pads).
        """
        if decode and decoder_attention_mask is not None:
            raise ValueError("decoder_attention_mask is not supported with decode=True")
        if encoder_attention_mask is None:
            if encoder_hidden is None:
                raise ValueError("pass encoder_attention_mask when encoder_hidden is None")
            encoder_attention_mask = jnp.ones(encoder_hidden.shape[:2], bool)
        h = self.decoder(
            self.token_embedding(decoder_input_ids),
            encoder_hidden,
            encoder_attention_mask,
            decoder_attention_mask,
            deterministic,
            decode,
        )
        return self.logits(h)

    def logits(self, hidden: Array) -> Array:
        """Tied output projection + final_logits_bias, accumulated and returned in float32."""
        rows = hidden.reshape(-1, hidden.shape[-1])
        logits = _head_logits(rows, self.shared.embedding, self.final_logits_bias)
        return logits.reshape(*hidden.shape[:-1], logits.shape[-1])

    def token_cross_entropy(
        self,
        input_ids: Array,
        decoder_input_ids: Array,
        labels: Array,
        attention_mask: Array | None = None,
        decoder_attention_mask: Array | None = None,
        deterministic: bool = True,
        label_smoothing: float = 0.0,
    ) -> tuple[Array, Array]:
        """`cross_entropy(self(...), labels, label_smoothing)` without materializing its
        gradient graph: (per-token nll [B,T] float32, argmax == label [B,T]).

        The LM head and the loss are one `head_cross_entropy` (custom_vjp), the train step's
        path. It supports reverse mode only; for forward mode (jax.jvp) use the logits and
        `cross_entropy`.
        """
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        attention_mask = attention_mask.astype(bool)
        enc = self.encode(input_ids, attention_mask, deterministic)
        hidden = self.decoder(
            self.token_embedding(decoder_input_ids),
            enc,
            attention_mask,
            decoder_attention_mask,
            deterministic,
        )
        nll, correct = head_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            self.shared.embedding,
            self.final_logits_bias,
            labels.reshape(-1),
            label_smoothing,
        )
        return nll.reshape(labels.shape), correct.reshape(labels.shape)

    def __call__(
        self,
        input_ids: Array,
        decoder_input_ids: Array,
        attention_mask: Array | None = None,
        decoder_attention_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        attention_mask = attention_mask.astype(bool)
        enc = self.encode(input_ids, attention_mask, deterministic)
        return self.decode(
            decoder_input_ids, enc, attention_mask, decoder_attention_mask, deterministic
        )


def _head_logits(rows: Array, table: Array, bias: Array) -> Array:
    """rows [N, D] (compute dtype) -> float32 logits [N, V] of the tied head + bias.

    One 2-D matmul over the flattened (batch, time) rows: with a 3-D einsum contracting over
    (b, t) in the backward pass, XLA CPU materializes the [B*T, V] logit gradient a second time,
    transposed, for the embedding's gradient (measured ~2x slower at V = 8192).
    """
    logits = jnp.matmul(rows, table.astype(rows.dtype).T, preferred_element_type=jnp.float32)
    # HF keeps final_logits_bias as a (never trained) buffer: no gradient flows into it.
    return logits + jax.lax.stop_gradient(bias)


def _nll_and_correct(
    lse: Array, picked: Array, top: Array, logits: Array, labels: Array, label_smoothing: float
) -> tuple[Array, Array]:
    """The loss from the log-sum-exp, the label's logit and the max logit (all [...])."""
    nll = lse - picked
    if label_smoothing:
        # Smoothed target (1-eps)*onehot + eps/V, as fairseq's and optax.smooth_labels:
        # -mean(log p) = lse - mean(logits).
        nll = (1.0 - label_smoothing) * nll + label_smoothing * (lse - jnp.mean(logits, axis=-1))
    # Padding labels may carry an out-of-range id (HF's -100): never counted correct.
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    return nll, (picked >= top) & in_range


def cross_entropy(
    logits: Array, labels: Array, label_smoothing: float = 0.0
) -> tuple[Array, Array]:
    """Per-token cross-entropy [...] of float logits [..., V] and whether the argmax is right.

    Written as one pass over the logits, the largest array of the step: the label's logit is
    picked with a one-hot select (take_along_axis's gradient is a scatter into a zeroed [..., V]
    buffer) and "argmax == label" is "label logit == max logit", reusing the log-sum-exp's max
    (argmax is a variadic reduce, slow on CPU). On an exact tie for the max, a label among the
    tied tokens counts as correct (argmax would pick the first). Out-of-range labels (weight 0
    in a batch) pick a clipped id, so no NaN leaks in. Differentiable in any mode.
    """
    vocab = logits.shape[-1]
    safe_labels = jnp.clip(labels, 0, vocab - 1)
    # The max cancels exactly in lse - picked, so stopping its gradient changes no derivative.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    shifted = logits - top
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    one_hot = safe_labels[..., None] == jnp.arange(vocab, dtype=safe_labels.dtype)
    picked = jnp.sum(jnp.where(one_hot, shifted, 0.0), axis=-1)
    return _nll_and_correct(lse, picked, 0.0, shifted, labels, label_smoothing)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def head_cross_entropy(
    rows: Array, table: Array, bias: Array, labels: Array, label_smoothing: float
) -> tuple[Array, Array]:
    """`cross_entropy(_head_logits(rows, table, bias), labels, label_smoothing)`, rows [N, D].

    A custom_vjp (reverse mode only): the forward pass picks the label logits with a gather
    and keeps only the logits and their log-sum-exp; the backward pass is one fused pass over
    the [N, V] logits, d logits = (softmax - (1 - eps) onehot - eps / V) * g, then the two head
    matmuls. Autodiff of `cross_entropy` instead writes exp(logits) and a one-hot select in the
    forward pass: measured ~25% slower for the head's forward + backward (N = 2048, V = 8192,
    D = 256, CPU).
    """
    return _head_cross_entropy_fwd(rows, table, bias, labels, label_smoothing)[0]


def _head_cross_entropy_fwd(rows, table, bias, labels, label_smoothing):
    logits = _head_logits(rows, table, bias)
    safe_labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
    top = jnp.max(logits, axis=-1)
    lse = jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1)) + top
    picked = jnp.take_along_axis(logits, safe_labels[:, None], axis=-1)[:, 0]
    out = _nll_and_correct(lse, picked, top, logits, labels, label_smoothing)
    return out, (rows, table, bias, logits, lse, safe_labels)


def _head_cross_entropy_bwd(label_smoothing, res, cotangents):
    rows, table, bias, logits, lse, safe_labels = res
    g = cotangents[0]  # `correct` is boolean: it has no cotangent
    vocab = logits.shape[-1]
    one_hot = safe_labels[:, None] == jnp.arange(vocab, dtype=safe_labels.dtype)
    target = jnp.where(one_hot, 1.0 - label_smoothing, 0.0) + label_smoothing / vocab
    d_logits = ((jnp.exp(logits - lse[:, None]) - target) * g[:, None]).astype(rows.dtype)
    d_rows = jnp.matmul(d_logits, table.astype(rows.dtype), preferred_element_type=jnp.float32)
    d_table = jnp.matmul(d_logits.T, rows, preferred_element_type=jnp.float32)
    return (
        d_rows.astype(rows.dtype),
        d_table.astype(table.dtype),
        jnp.zeros_like(bias),  # a buffer in HF: never trained (the forward stops its gradient)
        None,
    )


head_cross_entropy.defvjp(_head_cross_entropy_fwd, _head_cross_entropy_bwd)


def init_params(config: ModelConfig, rng: Array, batch_shape: tuple[int, int] = (1, 8)) -> PyTree:
    """Fresh float32 parameters (HF-style init: N(0, init_std) weights, zero biases)."""
    ids = jnp.full(batch_shape, config.bos_token_id, jnp.int32)
    return jax.jit(lambda r: Bart(config).init(r, ids, ids)["params"])(rng)


def init_cache(
    model: Bart,
    params: PyTree,
    encoder_hidden: Array,
    encoder_attention_mask: Array,
    max_decode_len: int,
) -> PyTree:
    """Empty decode cache for batch encoder_hidden.shape[0] and up to `max_decode_len` tokens.

    Also projects `encoder_hidden` into every layer's cross-attention keys/values once.
    """
    batch = encoder_hidden.shape[0]
    dummy = jnp.zeros((batch, max_decode_len), jnp.int32)
    _, mutated = model.apply(
        {"params": params},
        dummy,
        encoder_hidden,
        encoder_attention_mask,
        decode=True,
        method=Bart.decode,
        mutable=["cache"],
    )
    return mutated["cache"]


def decode_step(
    model: Bart,
    params: PyTree,
    cache: PyTree,
    tokens: Array,
    encoder_attention_mask: Array,
) -> tuple[Array, PyTree]:
    """One decoding step: tokens [B,1] -> (logits [B,1,V] float32, updated cache)."""
    logits, mutated = model.apply(
        {"params": params, "cache": cache},
        tokens,
        None,
        encoder_attention_mask,
        decode=True,
        method=Bart.decode,
        mutable=["cache"],
    )
    return logits, mutated["cache"]


def reorder_cache(cache: PyTree, index: Array) -> PyTree:
    """Gather batch rows `index` [B'] from every batched cache leaf (beam expand / reorder)."""
    return jax.tree.map(lambda x: x[index] if x.ndim else x, cache)
