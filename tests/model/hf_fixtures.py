"""Tiny random PyTorch BART references for model tests (plain functions, importable by others).

`make_torch_bart(**overrides)` builds a seeded `transformers.BartForConditionalGeneration` in eval
mode whose every weight (layer norms and final_logits_bias included) is perturbed away from its
default init, so a swapped scale/bias or a dropped bias shows up in the logits.
`save_and_load(model, tmp_path)` writes it with save_pretrained(safe_serialization=True) and reads
it back through our loader: (ModelConfig, params). `torch_logits(...)` runs the reference and
`jax_logits(config, params, ...)` ours (jitted once per config: op-by-op dispatch is slow).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch
import transformers

from meta_mask.config import ModelConfig
from meta_mask.model.bart import Bart
from meta_mask.model.hf import load_hf

TINY = dict(
    vocab_size=96,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=32,
    activation_function="gelu",
    scale_embedding=False,
    dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_eos_token_id=2,
)


def make_torch_bart(
    seed: int = 0, noise: float = 0.1, **overrides: Any
) -> transformers.BartForConditionalGeneration:
    """A seeded tiny torch BART (eval mode), all weights perturbed by N(0, noise)."""
    torch.manual_seed(seed)
    config = transformers.BartConfig(**{**TINY, **overrides})
    model = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # the tied embedding appears once
            p.add_(noise * torch.randn_like(p))
        model.final_logits_bias.add_(noise * torch.randn_like(model.final_logits_bias))
    return model


def save_torch_bart(model: transformers.BartForConditionalGeneration, path: Path) -> Path:
    model.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def save_and_load(
    model: transformers.BartForConditionalGeneration, path: Path, **config_overrides: Any
) -> tuple[ModelConfig, dict]:
    """save_pretrained to `path`, then our `load_hf(path)` -> (ModelConfig, params)."""
    save_torch_bart(model, path)
    return load_hf(str(path), **config_overrides)


def torch_logits(
    model: transformers.BartForConditionalGeneration,
    input_ids: np.ndarray,
    decoder_input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    decoder_attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Reference logits [B,T,V] float32 (no cache)."""

    def t(x: np.ndarray | None) -> torch.Tensor | None:
        return None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.long)

    with torch.no_grad():
        out = model(
            input_ids=t(input_ids),
            attention_mask=t(attention_mask),
            decoder_input_ids=t(decoder_input_ids),
            decoder_attention_mask=t(decoder_attention_mask),
            use_cache=False,
        )
    return out.logits.float().numpy()


def padded_batch(
    lengths: list[int],
    vocab_size: int,
    seed: int,
    pad_token_id: int = 1,
    max_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random ids <s> w... </s> right-padded to max_len: (ids int32 [B,L], mask int32 [B,L])."""
    rng = np.random.default_rng(seed)
    max_len = max_len or max(lengths)
    ids = np.full((len(lengths), max_len), pad_token_id, np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(4, vocab_size, n)
        ids[i, 0], ids[i, n - 1] = 0, 2
    return ids, (ids != pad_token_id).astype(np.int32)


@functools.cache
def _jitted_forward(config: ModelConfig):
    model = Bart(config)
    return jax.jit(
        lambda p, ids, dec, mask, dec_mask: model.apply({"params": p}, ids, dec, mask, dec_mask)
    )


def jax_logits(
    config: ModelConfig,
    params: Any,
    input_ids: np.ndarray,
    decoder_input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    decoder_attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Our teacher-forced logits [B,T,V] float32, jitted per config."""
    fn = _jitted_forward(config)
    return np.asarray(
        fn(params, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask)
    )
