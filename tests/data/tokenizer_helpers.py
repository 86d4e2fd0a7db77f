"""Tokenizers built in-process for the data tests (no hub download)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from meta_mask.data.world_tokenizer import SPECIAL_TOKENS, train_word_level_tokenizer


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A tiny word-level fast tokenizer with BART's special ids (<s>=0 <pad>=1 </s>=2 <unk>=3
    <mask>=4, then sentinels): the project's own word-level trainer on `texts`."""
    return train_word_level_tokenizer(texts)


def bpe_tokenizer(texts: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A tiny BPE fast tokenizer trained on `texts` with the same special ids: with a small
    vocabulary, rare words are several tokens (one word id), as with BART's BPE."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
