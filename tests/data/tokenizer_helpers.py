"""Tokenizers built in-process for the data tests (no hub download)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from meta_mask.data.world_tokenizer import train_word_level_tokenizer


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A tiny word-level fast tokenizer with BART's special ids (<s>=0 <pad>=1 </s>=2 <unk>=3
    <mask>=4, then sentinels): the project's own word-level trainer on `texts`."""
    return train_word_level_tokenizer(texts)
