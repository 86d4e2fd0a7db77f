"""Tokenizers built in-process for the tests (no hub download)."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from meta_mask.data.world_tokenizer import SPECIAL_TOKENS, train_word_level_tokenizer


def fast_tokenizer(
    backend: Tokenizer, mask_token: str | None = "<mask>"
) -> PreTrainedTokenizerFast:
    """`backend` as a transformers fast tokenizer with BART's special-token names (<s>, </s>,
    <pad>, <unk> and, unless None, `mask_token`)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token=mask_token,
    )


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A tiny word-level fast tokenizer with BART's special ids (<s>=0 <pad>=1 </s>=2 <unk>=3
    <mask>=4, then sentinels): the project's own word-level trainer on `texts`."""
    return train_word_level_tokenizer(texts)


def bpe_tokenizer(
    texts: list[str],
    vocab_size: int = 300,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    pre_tokenizer: pre_tokenizers.PreTokenizer | None = None,
) -> PreTrainedTokenizerFast:
    """A tiny BPE fast tokenizer trained on `texts` with the same special ids (by default;
    `special_tokens` must start <s> <pad> </s> <unk>), splitting words as BERT does unless
    `pre_tokenizer` says otherwise: with a small vocabulary, rare words are several tokens (one
    word id), as with BART's BPE."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if pre_tokenizer is None:
        pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return fast_tokenizer(tok, mask_token="<mask>" if "<mask>" in special_tokens else None)
