"""Device-memory estimates for the train step and the meta step, to choose batch and mesh sizes.

Owns the arithmetic behind launch/README.md's memory table (launch/memory_table.py prints it).
Bytes per device = training state (fp32 params, fp32 gradients, Adam's two fp32 moments; divided
by the fsdp size when sharded) + activations saved for the backward pass (per-device batch).

The activation counts are what jax saves for BART's backward pass, counted per layer from the
residuals of `jax.vjp` of our model (tests/training/test_memory.py checks them against every
batch-shaped residual and against XLA's `memory_analysis()` of the compiled step on tiny configs):
  encoder layer   B*S*(D*(6 f32 + 8 c + 2 r) + F*(4 c + a) + (8 + 2 H) f32)
                  + B*H*S*S*(2 f32 + c + 1 + p)
  decoder layer   B*T*(D*(9 f32 + 11 c + 3 r) + F*(4 c + a) + (12 + 4 H) f32) + 4 c*B*S*D
                  + B*H*(T*T + T*S)*(2 f32 + c + 1 + p)
  outside layers  B*S*(D*(3 f32 + r) + 20) + B*T*(D*(3 f32 + c + r) + V f32 + 32)
with c the compute dtype's bytes (4 fp32, 2 bf16). A dropout keeps its output and a byte mask:
r = c + 1 with `dropout` (else 0), a = c + 1 with `activation_dropout`, p = f32 + 1 with
`attention_dropout`. Where that comes from, per layer: each LayerNorm keeps 3 f32 [.., D]
tensors and 4 f32 statistics per token; every Dense keeps its 2-D input rows (q, k and v each
their own copy); attention keeps q, k, v split into heads, and per score the masked scores and
their exp in f32, the probabilities in c and the broadcast boolean mask, plus 2 f32 softmax
statistics per head and query; gelu (BART's activation) keeps 3 c tensors of [.., F]; the
decoder's cross-attention keeps the encoder output's k/v rows and heads (the 4 c*B*S*D).
Outside the layers: the embeddings' LayerNorm, dropout and int32 token ids, then the final
hidden rows (c), the float32 logits [B*T, V] (the fused LM head + cross-entropy keeps no other
[B*T, V] array) and per target token the log-sum-exp, label and weight.

With remat each layer keeps only its input (c*B*S*D or c*B*T*D), plus the encoder output the
decoder layers read and the two boolean [B, 1, 1, S] key masks; one layer's activations are
rebuilt at a time during the backward pass, which the peak adds once.

The count is an upper bound on what the compiled step keeps: XLA holds one buffer for the copies
jax saves of one array and fuses elementwise residuals away (on CPU, fp32 without remat, its
temporaries are 66-76% of gradients + this count, from the tests' tiny configs to BART-base).
"""

from __future__ import annotations

from dataclasses import dataclass

from meta_mask.config import MetaConfig, ModelConfig

F32 = 4


def num_params(cfg: ModelConfig) -> int:
    """Parameter count of our BART (shared embedding, learned positions, biases, LayerNorms)."""
    d, v = cfg.d_model, cfg.vocab_size
    attn = 4 * (d * d + d)
    ln = 2 * d
    enc = (
        attn + ln + (d * cfg.encoder_ffn_dim + cfg.encoder_ffn_dim) + (cfg.encoder_ffn_dim * d + d)
    )
    enc += ln
    dec = 2 * attn + 2 * ln
    dec += (d * cfg.decoder_ffn_dim + cfg.decoder_ffn_dim) + (cfg.decoder_ffn_dim * d + d) + ln
    positions = 2 * (cfg.max_position_embeddings + 2) * d
    return v * d + v + positions + 2 * ln + cfg.encoder_layers * enc + cfg.decoder_layers * dec


def _compute_bytes(cfg: ModelConfig) -> int:
    return {"float32": 4, "bfloat16": 2, "float64": 8}[cfg.dtype]


def _dropout_bytes(rate: float, nbytes: int) -> int:
    """Bytes per element a dropout keeps for the backward pass: its output and a byte mask."""
    return nbytes + 1 if rate > 0 else 0


def encoder_layer_bytes(cfg: ModelConfig, batch: int, src: int) -> int:
    """Activations one encoder layer saves for its backward pass (no remat)."""
    c, d, f, h = _compute_bytes(cfg), cfg.d_model, cfg.encoder_ffn_dim, cfg.encoder_attention_heads
    r = _dropout_bytes(cfg.dropout, c)
    per_token = (
        d * (6 * F32 + 8 * c + 2 * r)
        + f * (4 * c + _dropout_bytes(cfg.activation_dropout, c))
        + (8 + 2 * h) * F32
    )
    per_score = 2 * F32 + c + 1 + _dropout_bytes(cfg.attention_dropout, F32)
    return batch * src * per_token + batch * h * src * src * per_score


def decoder_layer_bytes(cfg: ModelConfig, batch: int, src: int, tgt: int) -> int:
    """Activations one decoder layer saves for its backward pass (no remat)."""
    c, d, f, h = _compute_bytes(cfg), cfg.d_model, cfg.decoder_ffn_dim, cfg.decoder_attention_heads
    r = _dropout_bytes(cfg.dropout, c)
    per_token = (
        d * (9 * F32 + 11 * c + 3 * r)
        + f * (4 * c + _dropout_bytes(cfg.activation_dropout, c))
        + (12 + 4 * h) * F32
    )
    per_score = 2 * F32 + c + 1 + _dropout_bytes(cfg.attention_dropout, F32)
    cross_kv = 4 * c * batch * src * d  # the encoder output's k/v: input rows and heads
    return batch * tgt * per_token + cross_kv + batch * h * (tgt * tgt + tgt * src) * per_score


def saved_activation_bytes(cfg: ModelConfig, batch: int, src: int, tgt: int) -> int:
    """Bytes of activations kept from the forward pass until the backward pass needs them."""
    c, d = _compute_bytes(cfg), cfg.d_model
    r = _dropout_bytes(cfg.dropout, c)
    # Embedding LayerNorm (3 f32 [.., D], 4 f32 statistics) and dropout, int32 token ids.
    embedding = d * (3 * F32 + r) + 4 * F32 + 4
    # The fused head + loss keeps the hidden rows, the f32 logits and each token's log-sum-exp,
    # label and weight.
    head = c * d + F32 * cfg.vocab_size + 3 * 4
    outside = batch * src * embedding + batch * tgt * (embedding + head)
    if cfg.remat:
        # Each layer's input, the encoder output the decoder layers read, two bool key masks.
        inputs = c * d * batch * (cfg.encoder_layers * src + src + cfg.decoder_layers * tgt)
        return outside + inputs + 2 * batch * src
    return (
        outside
        + cfg.encoder_layers * encoder_layer_bytes(cfg, batch, src)
        + cfg.decoder_layers * decoder_layer_bytes(cfg, batch, src, tgt)
    )


def activation_peak_bytes(cfg: ModelConfig, batch: int, src: int, tgt: int) -> int:
    """Saved activations plus, with remat, the one layer rebuilt at a time in the backward."""
    saved = saved_activation_bytes(cfg, batch, src, tgt)
    if not cfg.remat:
        return saved
    rebuilt = max(encoder_layer_bytes(cfg, batch, src), decoder_layer_bytes(cfg, batch, src, tgt))
    return saved + rebuilt


@dataclass(frozen=True)
class Estimate:
    """Bytes per device, by part."""

    params: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.gradients + self.optimizer + self.activations


def train_step_memory(
    cfg: ModelConfig, batch: int, src: int, tgt: int, *, fsdp: int = 1
) -> Estimate:
    """One AdamW train step on `batch` sequences per device (src/tgt tokens), params sharded
    over `fsdp` devices (the data axis replicates them)."""
    p = F32 * num_params(cfg)
    return Estimate(
        params=p // fsdp,
        gradients=p // fsdp,
        optimizer=2 * p // fsdp,
        activations=activation_peak_bytes(cfg, batch, src, tgt),
    )


def stored_thetas(inner_steps: int, remat_segment: int = 0) -> int:
    """Copies of theta (with its inner optimizer state) the unroll keeps for its backward pass:
    every theta_k of the scan, or with nested checkpointing (policies/unroll.py, remat_segment
    = S < K) the K // S segment starts plus the S theta_k of the segment being differentiated
    (a shorter last segment's start is freed before the full segments' turn)."""
    if 0 < remat_segment < inner_steps:
        return inner_steps // remat_segment + remat_segment
    return inner_steps


def meta_step_memory(
    cfg: ModelConfig,
    meta: MetaConfig,
    *,
    src: int,
    tgt: int,
    outer_src: int,
    outer_tgt: int,
    policy_params: int = 0,
    devices: int = 1,
    fsdp: int = 1,
) -> Estimate:
    """The second-order meta step (policies/meta.py) per device: K differentiable inner steps
    of `meta.inner_batch_size` sentences (src -> tgt tokens) and an outer batch of
    `meta.outer_batch_size` (outer_src -> outer_tgt), every batch split over `devices` (data x
    fsdp), theta split over `fsdp`, the policy replicated.

    - params: theta, and the policy's parameters;
    - gradients: theta's cotangent and the Hessian-vector product of the inner step being
      differentiated (two theta-sized buffers), and the policy's gradient;
    - optimizer: the copies of theta (with the inner optimizer's state: Adam's two moments)
      kept for the backward pass (`stored_thetas`), and the policy's Adam;
    - activations: the largest of one inner microbatch's forward-and-backward pass (the
      step's gradient), the outer loss's, and for K >= 2 the second-order backward pass of a
      step, which keeps the step's forward and backward activations for its tangents (twice
      the first; three times with inner Adam, whose update also needs the gradient's value,
      as XLA's memory_analysis shows). K = 1 has no such pass: theta_0 does not depend on the
      policy, so its step's backward is a forward-mode product. Without meta.remat every
      step's residuals stay live.
    """
    theta = F32 * num_params(cfg) // fsdp
    phi = F32 * policy_params
    state = theta * (3 if meta.inner_optimizer == "adam" else 1)
    micro = max(meta.inner_batch_size // (devices * meta.inner_microbatches), 1)
    step = activation_peak_bytes(cfg, micro, src, tgt)
    outer = activation_peak_bytes(
        cfg, max(meta.outer_batch_size // devices, 1), outer_src, outer_tgt
    )
    k = meta.inner_steps
    second_order = (3 if meta.inner_optimizer == "adam" else 2) * step if k >= 2 else 0
    if meta.remat:
        activations = max(step, outer, second_order)
        stored = stored_thetas(k, meta.remat_segment)
    else:
        activations = max(outer, k * max(step, second_order))
        stored = k
    return Estimate(
        params=theta + phi,
        gradients=2 * theta + phi,
        optimizer=stored * state + 2 * phi,
        activations=activations,
    )
