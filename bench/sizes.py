"""The benchmark's sizes: the defaults, the --quick ones, the model config they give, and a
synthetic batch for it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BenchSizes:
    d_model: int = 256
    layers: int = 4  # encoder and decoder layers each
    heads: int = 4
    ffn_dim: int = 1024
    vocab: int = 8192
    seq: int = 128  # encoder and decoder length of the train step (a, b)
    batch: int = 16
    meta_batch: int = 8  # sentences per inner batch (c)
    meta_len: int = 64  # inner sentence length (c)
    meta_k: tuple[int, ...] = (1, 2, 4, 8)  # K values timed (c)
    # K values whose compiled memory is reported: flat up to 8, nested from 4 (c)
    meta_mem_k: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
    mask_batch: int = 64  # sentences per host masking call (d)
    gen_batch: int = 8
    gen_src: int = 64
    gen_len: int = 32
    beams: int = 4
    peak_n: int = 2048  # jnp.dot size for the matmul peak
    repeats: int = 5
    iters: int = 3  # steps per timed repeat
    dtype: str = "float32"


def quick_sizes() -> BenchSizes:
    """A tiny configuration (seconds) for tests/test_bench.py."""
    return BenchSizes(
        d_model=32,
        layers=1,
        heads=2,
        ffn_dim=64,
        vocab=128,
        seq=16,
        batch=4,
        meta_batch=2,
        meta_len=16,
        meta_k=(1, 2),
        meta_mem_k=(1, 2, 4),
        mask_batch=8,
        gen_batch=2,
        gen_src=8,
        gen_len=6,
        beams=2,
        peak_n=256,
        repeats=2,
        iters=1,
    )


def model_config(sz: BenchSizes):
    from meta_mask.config import ModelConfig

    return ModelConfig(
        vocab_size=sz.vocab,
        d_model=sz.d_model,
        encoder_layers=sz.layers,
        decoder_layers=sz.layers,
        encoder_attention_heads=sz.heads,
        decoder_attention_heads=sz.heads,
        encoder_ffn_dim=sz.ffn_dim,
        decoder_ffn_dim=sz.ffn_dim,
        max_position_embeddings=max(sz.seq, sz.gen_src, sz.gen_len, sz.meta_len, 64),
        dtype=sz.dtype,
    )


def synthetic_batch(cfg, batch: int, src: int, tgt: int, seed: int = 0) -> dict:
    """A full (no padding) seq2seq batch in the train step's format (numpy)."""
    import numpy as np

    from meta_mask.batches import shift_right

    rng = np.random.default_rng(seed)
    ids = rng.integers(4, cfg.vocab_size, size=(batch, src), dtype=np.int32)
    labels = rng.integers(4, cfg.vocab_size, size=(batch, tgt), dtype=np.int32)
    return {
        "input_ids": ids,
        "decoder_input_ids": shift_right(labels, cfg.decoder_start_token_id),
        "labels": labels,
        "weights": np.ones((batch, tgt), np.float32),
    }
