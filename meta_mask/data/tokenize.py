"""Tokenizing text records that carry character spans into the shared tokenized format.

Owns the conversion of {"text", "entities": [(char_start, char_end, label, ...)]} records
(from the synthetic world's gold spans or from an NER pass over a real corpus) into
{"input_ids", "word_ids", "entity_spans", "entity_labels"} with token-level spans, for any
fast tokenizer (offsets come from the tokenizer's offset mapping).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase


def char_to_token_span(
    offsets: Sequence[tuple[int, int]], is_special: Sequence[bool], start: int, end: int
) -> tuple[int, int] | None:
    """The half-open token span [first, last + 1) of the tokens overlapping [start, end).

    A span that cuts a token (subword tokenizers) grows to the covering tokens; one that
    overlaps no non-special token (e.g. cut off by truncation) gives None.
    """
    hit = [
        i
        for i, ((s, e), special) in enumerate(zip(offsets, is_special, strict=True))
        if not special and s < end and e > start and e > s
    ]
    if not hit:
        return None
    return hit[0], hit[-1] + 1


def tokenize_sentences(
    records: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    batch_size: int = 1024,
) -> list[dict]:
    """Tokenize records (with <s> ... </s>) and map their entity char spans to tokens.

    Each record needs "text" and may have "entities": a sequence of (char_start, char_end,
    label[, attribute]). Returns per record {"input_ids": int32 [L], "word_ids": int32 [L]
    (-1 on special tokens), "entity_spans": int32 [E, 2], "entity_labels": [str] * E,
    "entity_attributes": [str | None] * E}; entities not wholly inside the kept tokens
    (truncation at `max_length`) are dropped.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenize_sentences needs a fast tokenizer (offset mapping); got {type(tokenizer)}"
        )
    out: list[dict] = []
    for lo in range(0, len(records), batch_size):
        chunk = records[lo : lo + batch_size]
        enc = tokenizer(
            [r["text"] for r in chunk],
            add_special_tokens=True,
            return_offsets_mapping=True,
            truncation=max_length is not None,
            max_length=max_length,
        )
        for i, rec in enumerate(chunk):
            word_ids = enc.word_ids(i)
            is_special = [w is None for w in word_ids]
            offsets = enc["offset_mapping"][i]
            # Characters past the last kept token were cut by truncation.
            kept = [e for (_, e), sp in zip(offsets, is_special, strict=True) if not sp]
            kept_end = max(kept, default=0)
            spans, labels, attrs = [], [], []
            for ent in rec.get("entities", ()):
                span = char_to_token_span(offsets, is_special, ent[0], ent[1])
                if span is None or ent[1] > kept_end:  # half an entity is not an entity
                    continue
                spans.append(span)
                labels.append(str(ent[2]))
                attrs.append(ent[3] if len(ent) > 3 else None)
            out.append(
                {
                    "input_ids": np.asarray(enc["input_ids"][i], np.int32),
                    "word_ids": np.asarray([-1 if w is None else w for w in word_ids], np.int32),
                    "entity_spans": np.asarray(spans, np.int32).reshape(len(spans), 2),
                    "entity_labels": labels,
                    "entity_attributes": attrs,
                }
            )
    return out
