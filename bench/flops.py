"""Model FLOPs of one train step (forward x 3: the backward pass costs two forwards).

With D = d_model, F = ffn dim, V = vocab, Le / Ld layers, B batch, S / T encoder / decoder
lengths:

    forward = 2 * [ B*S * Le*(4 D^2 + 2 D F)                 encoder q,k,v,o and fc1, fc2
                  + B*S * Ld*(2 D^2)                         cross-attention k,v of the encoder
                  + B*T * (Ld*(6 D^2 + 2 D F) + D V) ]     decoder q,k,v,o, cross q,o, ffn, head
            + 4 D * B * (Le S^2 + Ld T^2 + Ld T S)           attention scores and values
    train   = 3 * forward

(Decoder self-attention is counted over the full T x T block, as computed; embedding lookups,
layer norms, softmax, GELU and the optimizer are not counted: they are memory-bound.)
"""

from __future__ import annotations


def forward_flops(cfg, batch: int, src: int, tgt: int) -> float:
    """Matmul FLOPs of one forward pass (the module docstring's formula)."""
    d, v = cfg.d_model, cfg.vocab_size
    le, ld = cfg.encoder_layers, cfg.decoder_layers
    enc = batch * src * (le * (4 * d * d + 2 * d * cfg.encoder_ffn_dim) + ld * 2 * d * d)
    dec = batch * tgt * (ld * (6 * d * d + 2 * d * cfg.decoder_ffn_dim) + d * v)
    attn = 4 * d * batch * (le * src * src + ld * tgt * tgt + ld * tgt * src)
    return 2.0 * (enc + dec) + attn


def train_flops(cfg, batch: int, src: int, tgt: int) -> float:
    """Matmul FLOPs of one train step: 3 forward passes."""
    return 3.0 * forward_flops(cfg, batch, src, tgt)


def matmul_params(cfg) -> int:
    """Parameters that take part in matmuls (Dense kernels and the tied output embedding)."""
    d = cfg.d_model
    enc = cfg.encoder_layers * (4 * d * d + 2 * d * cfg.encoder_ffn_dim)
    dec = cfg.decoder_layers * (8 * d * d + 2 * d * cfg.decoder_ffn_dim)
    return enc + dec + d * cfg.vocab_size


def xla_flops(compiled) -> float:
    """FLOPs of a compiled function by XLA's cost analysis."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))
