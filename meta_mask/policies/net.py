"""The learned masking policy's scorer network and its host-side Scorer wrapper.

Owns `PolicyNet` (linen: tokens -> one mask logit per token), `policy_net_from_config`,
`init_policy_params` (fresh, or with the token table copied from the LM's shared embedding),
`count_params`, and `LearnedScorer`, which makes a trained network a `Scorer` (see
policies/sampler.py) so learned masks go through the same sampler, output formats and train step
as the heuristic policies.

Architecture: token embedding (its own table, or a copy of the LM's `shared/embedding`,
optionally frozen by `jax.lax.stop_gradient` so it receives exactly zero gradient) -> a linear
projection to `d_model` when the table is wider -> + learned positions -> `num_layers` pre-LN
transformer encoder layers -> LayerNorm -> one logit per token. Tokens that are not `valid`
(special tokens, padding) get logit -inf: they are never masked.

Some parameters would receive no gradient at all, because the policy's distribution is a
softmax over each sentence (policies/meta_weights.py), invariant to adding a constant to every
logit of a sentence: a bias on the logit head and the final LayerNorm's bias (both add the same
constant to every token), and the attention key bias (the same constant to every key of a
query; flax's use_bias covers q/k/v/out together, so the attention has none). They are left
out (use_bias=False), so every parameter of the network receives signal (tested).

Span-level scoring: with `unit_ids` (int32 [B, L], -1 = no unit; e.g. whole words from
heuristic.word_units), each token's logit is replaced by the mean of its unit's token logits, so
a unit is scored once; the sampler's unit score (the max over the unit) then equals this mean.

Size at BART-base scale (LM 139,470,681 parameters, vocabulary 50265, d_model 768), for the
default MetaConfig (2 layers, d_model 128, 4 heads, ffn 512, 1024 positions):
  - LM table copied and frozen (default): 625,152 trainable (0.45% of the LM) next to the
    38.6M-entry frozen copy of the table;
  - LM table copied, trainable: 39.2M (28%: the table dominates; not recommended at scale);
  - own 128-wide table: 6.96M (4.99%); own table with d_model 64, ffn 256: 3.38M (2.4%).
`count_params` computes these (shapes only); tests/policies/test_net.py checks them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from meta_mask.batches import PolicyBatch
from meta_mask.config import POLICY_UNITS, SAMPLE_SCORES, MetaConfig
from meta_mask.policies.heuristic import policy_units
from meta_mask.policies.sampler import BatchRng

Array = jax.Array
PyTree = Any

EMBED_INIT_STD = 0.02


class _EncoderLayer(nn.Module):
    """Pre-LN transformer encoder layer (no attention biases: see the module docstring)."""

    d_model: int
    num_heads: int
    ffn_dim: int

    @nn.compact
    def __call__(self, x: Array, attn_mask: Array) -> Array:
        h = nn.LayerNorm(name="attn_norm")(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.d_model, use_bias=False, name="attn"
        )(h, h, mask=attn_mask)
        x = x + h
        h = nn.LayerNorm(name="ffn_norm")(x)
        h = nn.Dense(self.d_model, name="fc2")(jax.nn.gelu(nn.Dense(self.ffn_dim, name="fc1")(h)))
        return x + h


def pool_over_units(logits: Array, unit_ids: Array) -> Array:
    """Each token's logit replaced by the mean over its unit (same example, same unit id);
    tokens with unit id -1 keep their own logit. logits [B, L] float, unit_ids [B, L] int."""
    length = logits.shape[1]

    def one(lg: Array, u: Array) -> Array:
        seg = jnp.where(u >= 0, u, length)  # a dump segment for tokens outside every unit
        total = jax.ops.segment_sum(jnp.where(u >= 0, lg, 0.0), seg, num_segments=length + 1)
        count = jax.ops.segment_sum((u >= 0).astype(lg.dtype), seg, num_segments=length + 1)
        mean = total / jnp.maximum(count, 1.0)
        return jnp.where(u >= 0, mean[seg], lg)

    return jax.vmap(one)(logits, unit_ids)


class PolicyNet(nn.Module):
    """Tokens [B, L] -> mask logits [B, L] (float; -inf where not `valid`).

    `embed_dim` is the token table's width: 0 = d_model; the LM's d_model when the table is
    (initialized from) the LM's shared embedding, followed by a projection to d_model.
    `pad_id` (the tokenizer's, SpecialTokens.pad) is a plain int: a module attribute, saved
    in the policy's policy.json with the other fields.
    """

    vocab_size: int
    pad_id: int
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 512
    max_length: int = 1024
    embed_dim: int = 0
    freeze_embeddings: bool = False
    repeat_buckets: int = 0

    @nn.compact
    def __call__(self, input_ids: Array, valid: Array, unit_ids: Array | None = None) -> Array:
        length = input_ids.shape[1]
        if length > self.max_length:
            raise ValueError(
                f"PolicyNet: sequence length {length} > max_length={self.max_length} "
                "(MetaConfig.policy_max_length)"
            )
        embed_dim = self.embed_dim or self.d_model
        table = self.param(
            "embed", nn.initializers.normal(EMBED_INIT_STD), (self.vocab_size, embed_dim)
        )
        if self.freeze_embeddings:
            # Frozen: exactly zero gradient, so the policy optimizer never moves it.
            table = jax.lax.stop_gradient(table)
        x = jnp.take(table, input_ids, axis=0)
        if embed_dim != self.d_model:
            x = nn.Dense(self.d_model, use_bias=False, name="embed_proj")(x)
        positions = self.param(
            "positions", nn.initializers.normal(EMBED_INIT_STD), (self.max_length, self.d_model)
        )
        x = x + positions[None, :length].astype(x.dtype)
        # Every real token (specials included: they mark sentence boundaries) is attended to.
        attend = input_ids != self.pad_id
        if self.repeat_buckets:
            x = x + self._repeat_embedding(input_ids, valid)
        attn_mask = nn.make_attention_mask(attend, attend)
        for i in range(self.num_layers):
            x = _EncoderLayer(self.d_model, self.num_heads, self.ffn_dim, name=f"layers_{i}")(
                x, attn_mask
            )
        x = nn.LayerNorm(use_bias=False, name="final_norm")(x)
        logits = nn.Dense(
            1, use_bias=False, kernel_init=nn.initializers.normal(EMBED_INIT_STD), name="head"
        )(x)[..., 0]
        if unit_ids is not None:
            logits = pool_over_units(logits, jnp.where(valid, unit_ids, -1))
        return jnp.where(valid, logits, -jnp.inf)

    def _repeat_embedding(self, input_ids: Array, valid: Array) -> Array:
        """A learned vector per `repeat_counts` bucket (repeat_buckets > 0): the net sees how
        often a token recurs in its context, whatever the token."""
        table = self.param(
            "repeats",
            nn.initializers.normal(EMBED_INIT_STD),
            (self.repeat_buckets, self.d_model),
        )
        return jnp.take(table, repeat_counts(input_ids, valid, self.repeat_buckets), axis=0)


def repeat_counts(input_ids: Array, valid: Array, buckets: int) -> Array:
    """int32 [B, L]: how many OTHER valid tokens of the same example have this token's id, capped
    at buckets - 1 (0 off valid). The topic entity of a document (the person a biography is
    about) recurs, a one-off mention does not; token identity alone cannot tell them apart in
    a context the policy has not seen."""
    same = (input_ids[:, :, None] == input_ids[:, None, :]) & valid[:, None, :] & valid[:, :, None]
    others = jnp.sum(same, axis=-1) - valid.astype(jnp.int32)
    return jnp.minimum(others, buckets - 1).astype(jnp.int32)


def policy_net_from_config(
    cfg: MetaConfig, vocab_size: int, lm_d_model: int, pad_id: int
) -> PolicyNet:
    """The PolicyNet a MetaConfig describes, for an LM with `vocab_size` and `lm_d_model`."""
    return PolicyNet(
        vocab_size=vocab_size,
        d_model=cfg.policy_d_model,
        num_layers=cfg.policy_layers,
        num_heads=cfg.policy_heads,
        ffn_dim=cfg.policy_ffn_dim,
        max_length=cfg.policy_max_length,
        embed_dim=lm_d_model if cfg.use_lm_embeddings else 0,
        freeze_embeddings=cfg.freeze_embeddings,
        repeat_buckets=cfg.policy_repeat_buckets,
        pad_id=pad_id,
    )


def init_policy_params(
    net: PolicyNet, rng: Array, lm_embedding: Array | None = None, length: int = 8
) -> PyTree:
    """Fresh policy parameters; with `lm_embedding` ([V, D], the LM's `shared/embedding`) the
    token table starts as a copy of it (its shape must match the net's table)."""
    ids = jnp.full((1, length), net.pad_id, jnp.int32)
    valid = jnp.zeros((1, length), bool)
    params = jax.jit(lambda r: net.init(r, ids, valid)["params"])(rng)
    if lm_embedding is not None:
        want = params["embed"].shape
        if tuple(lm_embedding.shape) != tuple(want):
            raise ValueError(
                f"init_policy_params: lm_embedding has shape {tuple(lm_embedding.shape)} but "
                f"the policy's table 'embed' is {tuple(want)} (vocab_size, embed_dim); build "
                "the net with embed_dim = the LM's d_model"
            )
        params = {**params, "embed": jnp.asarray(lm_embedding, params["embed"].dtype)}
    return params


def count_params(net: PolicyNet, length: int = 8) -> dict[str, int]:
    """{"total", "embedding", "trainable"} parameter counts (shapes only: nothing allocated).
    `trainable` excludes the token table when the net freezes it."""
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    shapes = jax.eval_shape(
        lambda: net.init(
            jax.random.key(0), jnp.zeros(ids.shape, ids.dtype), jnp.zeros((1, length), bool)
        )
    )["params"]
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    embedding = int(np.prod(shapes["embed"].shape))
    trainable = total - embedding if net.freeze_embeddings else total
    return {"total": total, "embedding": embedding, "trainable": trainable}


class LearnedScorer:
    """A trained PolicyNet as a Scorer: (padded host batch, BatchRng) -> (scores, unit_ids).

    scores are the network's logits (float32 [B, L], -inf off `valid`), or with
    scores="log_probability" their log-sigmoid (a per-token objective's log probability of
    being a target: the sampler then draws units in proportion to that probability, not to its
    odds). unit_ids are token positions (units="token"), whole words (units="word", logits
    mean-pooled per word, needs batch["word_ids"]) or entities (units="entity": each
    batch["entity_spans"] span one unit, every other word another; logits mean-pooled per
    unit). The forward pass is jitted once per padded shape; the scorer draws no randomness of
    its own (the sampler's Gumbel noise does the sampling).
    """

    def __init__(
        self, net: PolicyNet, params: PyTree, *, units: str = "token", scores: str = "logits"
    ) -> None:
        if units not in POLICY_UNITS:
            raise ValueError(f"LearnedScorer units={units!r}; valid: {POLICY_UNITS}")
        if scores not in SAMPLE_SCORES:
            raise ValueError(f"LearnedScorer scores={scores!r}; valid: {SAMPLE_SCORES}")
        self.net = net
        self.params = params
        self.units = units
        self.scores = scores
        squash = jax.nn.log_sigmoid if scores == "log_probability" else (lambda x: x)
        self._forward = jax.jit(
            lambda p, ids, valid, unit_ids: squash(net.apply({"params": p}, ids, valid, unit_ids))
        )

    def unit_ids(self, batch: PolicyBatch) -> np.ndarray:
        valid = np.asarray(batch["valid"], bool)
        units = policy_units(batch, self.units)
        if units is not None:
            return units
        pos = np.arange(valid.shape[1], dtype=np.int32)
        return np.where(valid, pos, -1).astype(np.int32)

    def __call__(self, batch: PolicyBatch, rng: BatchRng) -> tuple[np.ndarray, np.ndarray]:
        unit_ids = self.unit_ids(batch)
        scores = self._forward(
            self.params,
            jnp.asarray(batch["input_ids"], jnp.int32),
            jnp.asarray(batch["valid"], bool),
            jnp.asarray(unit_ids) if self.units != "token" else None,
        )
        return np.asarray(scores, np.float32), unit_ids
