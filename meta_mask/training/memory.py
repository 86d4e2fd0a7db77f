"""Device-memory estimates for the train step and the meta step, to choose batch and mesh sizes.

Owns the arithmetic behind launch/README.md's memory table (launch/memory_table.py prints it).
Bytes per device = training state (fp32 params, fp32 gradients, Adam's two fp32 moments; divided
by the fsdp size when sharded) + activations saved for the backward pass (per-device batch).

The activation counts are what jax saves for BART's backward pass, counted per layer from the
residuals of `jax.vjp` of our model (tests/training/test_memory.py checks them against those
residuals and against XLA's `memory_analysis()` of the compiled step on tiny configs):
  encoder layer   B*S*D*(6 f32 + 8 c) + 4c*B*S*F + B*H*S*S*(2 f32 + c)  [+ dropout masks]
  decoder layer   B*T*D*(9 f32 + 12 c) + 2c*B*S*D + 4c*B*T*F + B*H*(T*T + T*S)*(2 f32 + c)
  outside layers  B*S*D*(3 f32 + 2 c) + B*T*D*(3 f32 + c) + B*T*V*(2 f32 + 1) (the loss)
with c the compute dtype's bytes (4 fp32, 2 bf16); dropout adds one byte-mask per dropped
tensor. With remat each layer keeps only its input; one layer's activations are rebuilt at a
time during the backward pass, which the peak adds once.
"""

from __future__ import annotations

from dataclasses import dataclass

from meta_mask.config import ModelConfig

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


def encoder_layer_bytes(cfg: ModelConfig, batch: int, src: int) -> int:
    """Activations one encoder layer saves for its backward pass (no remat)."""
    c, d, h = _compute_bytes(cfg), cfg.d_model, cfg.encoder_attention_heads
    drop = 1 if cfg.dropout > 0 else 0
    tokens = batch * src
    per_token = d * (6 * F32 + 8 * c + 2 * drop) + 4 * c * cfg.encoder_ffn_dim
    return tokens * per_token + batch * h * src * src * (2 * F32 + c + drop)


def decoder_layer_bytes(cfg: ModelConfig, batch: int, src: int, tgt: int) -> int:
    """Activations one decoder layer saves for its backward pass (no remat)."""
    c, d, h = _compute_bytes(cfg), cfg.d_model, cfg.decoder_attention_heads
    drop = 1 if cfg.dropout > 0 else 0
    per_token = d * (9 * F32 + 12 * c + 3 * drop) + 4 * c * cfg.decoder_ffn_dim
    scores = batch * h * (tgt * tgt + tgt * src) * (2 * F32 + c + drop)
    return batch * tgt * per_token + 2 * c * batch * src * d + scores


def saved_activation_bytes(cfg: ModelConfig, batch: int, src: int, tgt: int) -> int:
    """Bytes of activations kept from the forward pass until the backward pass needs them."""
    c, d = _compute_bytes(cfg), cfg.d_model
    drop = 1 if cfg.dropout > 0 else 0
    # The loss keeps two f32 [B,T,V] arrays (shifted logits and their exp) and a one-hot mask.
    logits = (2 * F32 + 1) * batch * tgt * cfg.vocab_size
    embeddings = batch * d * (src * (3 * F32 + 2 * c + drop) + tgt * (3 * F32 + c + drop))
    outside = embeddings + logits
    if cfg.remat:
        return outside + batch * d * c * (cfg.encoder_layers * src + cfg.decoder_layers * tgt)
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


def meta_step_memory(
    cfg: ModelConfig,
    *,
    inner_steps: int,
    inner_batch: int,
    outer_batch: int,
    src: int,
    tgt: int,
    outer_src: int,
    outer_tgt: int,
    inner_optimizer: str = "sgd",
    policy_params: int = 0,
    fsdp: int = 1,
) -> Estimate:
    """The second-order meta step (policies/meta.py): K differentiable inner steps on theta.

    The unroll keeps theta_k for every inner step (K fp32 copies of the LM; with inner Adam also
    its two moments), the gradient and its cotangent (two more), and each inner step's forward
    and backward activations (twice the train step's; K times without remat, once with it),
    plus the outer loss's activations. The policy's own parameters and Adam are small.
    """
    p = F32 * num_params(cfg)
    inner_state = 3 if inner_optimizer == "adam" else 1
    step_acts = 2 * activation_peak_bytes(cfg, inner_batch, src, tgt)
    inner = step_acts if cfg.remat else inner_steps * step_acts
    return Estimate(
        params=(p + F32 * policy_params) // fsdp,
        gradients=(2 * p + F32 * policy_params) // fsdp,
        optimizer=(inner_steps * inner_state * p + 2 * F32 * policy_params) // fsdp,
        activations=inner + activation_peak_bytes(cfg, outer_batch, outer_src, outer_tgt),
    )
