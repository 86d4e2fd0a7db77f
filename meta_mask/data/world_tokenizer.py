"""The synthetic world's tokenizer: a word-level `tokenizers` model trained offline.

Owns the special-token layout shared with BART (<s>=0, <pad>=1, </s>=2, <unk>=3) plus
<mask>=4 and the sentinels <extra_id_0>..<extra_id_99> (ids 5..104) used by the
masked-spans output format. Every word (and punctuation mark) the world emits is one
token. The result is a `transformers.PreTrainedTokenizerFast`, so callers use it like
any other tokenizer (offsets, word_ids, save_pretrained / AutoTokenizer.from_pretrained).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from meta_mask.data.world import World, world_template_texts, world_texts

SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
NUM_SENTINELS = 100
SENTINEL_OFFSET = len(SPECIAL_TOKENS)  # id of <extra_id_0>


def sentinel_token(i: int) -> str:
    """The i-th sentinel token string (T5 naming), i in [0, NUM_SENTINELS)."""
    if not 0 <= i < NUM_SENTINELS:
        raise ValueError(f"sentinel index {i} outside [0, {NUM_SENTINELS})")
    return f"<extra_id_{i}>"


def train_word_level_tokenizer(
    texts: Iterable[str], *, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on `texts`; ids are a pure function of the word counts.

    Pre-tokenization splits on whitespace and on every punctuation character (BERT's
    rule); the WordPiece decoder with cleanup re-joins "word ." into "word.", so decode
    inverts encode on text whose punctuation is . , ? ! (what the world writes).
    """
    sentinels = [sentinel_token(i) for i in range(NUM_SENTINELS)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # The trainer lists special tokens first, in order, so <s>=0 ... <extra_id_99>=104;
    # other words follow by descending count, ties broken by the word itself.
    trainer = trainers.WordLevelTrainer(
        vocab_size=1 << 30,
        min_frequency=1,
        special_tokens=[*SPECIAL_TOKENS, *sentinels],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",  # BART's pair layout
        special_tokens=[("<s>", bos), ("</s>", eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens=sentinels,
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
        padding_side="right",
        clean_up_tokenization_spaces=False,  # the backend decoder already cleans up
    )


def world_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """The tokenizer of a world: trained on everything it emits; same world, same ids."""
    return train_word_level_tokenizer(
        itertools.chain(world_texts(world), world_template_texts(world))
    )
