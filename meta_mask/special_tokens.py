"""The special-token ids of a run, as one value: `SpecialTokens`.

Built once from the tokenizer and the model's decoder start id (`SpecialTokens.of`), then
passed whole to everything that pads, frames, masks or starts a decoder input (the data,
policy and meta code), instead of loose ids with baked-in defaults. Also owns `sentinel_ids`,
the tokenizer's <extra_id_i> ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meta_mask.errors import UserError


class MissingSpecialTokenError(UserError, ValueError):
    """The tokenizer lacks a special token the project needs."""


def sentinel_ids(tokenizer: Any) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... in the tokenizer's vocabulary (empty if none)."""
    vocab = tokenizer.get_vocab()
    out = []
    while f"<extra_id_{len(out)}>" in vocab:
        out.append(vocab[f"<extra_id_{len(out)}>"])
    return out


@dataclass(frozen=True)
class SpecialTokens:
    """A tokenizer's special ids (hashable: a static value under jit).

    pad pads every batch array; bos (<s>) and eos (</s>) frame a sentence; mask is <mask>, the
    infill symbol (and the span symbol of masked_spans when there are no sentinels);
    decoder_start starts every decoder input (batches.shift_right); sentinels are
    <extra_id_0>, <extra_id_1>, ... (masked_spans), empty when the tokenizer has none.
    """

    pad: int
    eos: int
    bos: int
    mask: int
    decoder_start: int
    sentinels: tuple[int, ...] = ()

    @classmethod
    def of(cls, tokenizer: Any, decoder_start_token_id: int) -> SpecialTokens:
        """The ids of `tokenizer` (pad, eos, bos, mask and its sentinels), with the model's
        `decoder_start_token_id` (ModelConfig.decoder_start_token_id)."""
        ids = {}
        for name in ("pad", "eos", "bos", "mask"):
            ids[name] = getattr(tokenizer, f"{name}_token_id", None)
            if ids[name] is None:
                raise MissingSpecialTokenError(
                    f"the tokenizer ({type(tokenizer).__name__}, "
                    f"{getattr(tokenizer, 'name_or_path', '') or 'built in-process'}) has no "
                    f"{name} token; meta_mask needs a BART-style tokenizer with <s>, <pad>, "
                    "</s> and <mask> (--data.tokenizer / --init)"
                )
        return cls(
            **ids,
            decoder_start=int(decoder_start_token_id),
            sentinels=tuple(sentinel_ids(tokenizer)),
        )

    @property
    def unmaskable(self) -> tuple[int, int, int]:
        """(bos, pad, eos): never maskable, even where a record's word_ids says otherwise."""
        return (self.bos, self.pad, self.eos)
