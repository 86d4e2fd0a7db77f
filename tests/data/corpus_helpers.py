"""Sentence records and corpora for the tests: SENTENCES and world_like_records() (ten
sentences in world.py's record format, with gold entity spans), and world_corpus (a synthetic
world's sentences built into a corpus as a run builds one)."""

from __future__ import annotations

import pathlib
from typing import Any

from meta_mask.data.corpora import Corpus, CorpusSource, build_corpus
from meta_mask.data.world import World
from meta_mask.data.world_tokenizer import world_tokenizer

SENTENCES = [
    "Alice Moreau was born in Lyon in 1950.",
    "She worked for the Acme company for ten years.",
    "Bob Stone lives in Paris with his two cats.",
    "The river flows north through the old town.",
    "Carol Diaz studied music at the city school.",
    "Every summer the family visited the sea coast.",
    "Dan Brown wrote several long books about art.",
    "The museum opened its doors in the spring of 1901.",
    "Eve Adams plays chess on Sunday mornings in the park.",
    "The bridge was built from stone and iron beams.",
]


def world_like_records() -> list[dict]:
    """Sentence records in world.py's format, with gold entity spans."""
    records = []
    for i, text in enumerate(SENTENCES):
        words = text.split()
        name = " ".join(words[:2])
        ents = [(0, len(name), "PERSON", "name")] if words[0][0].isupper() and i % 2 == 0 else []
        if "Lyon" in text:
            s = text.index("Lyon")
            ents.append((s, s + 4, "GPE", "birth_city"))
        records.append({"text": text, "doc_id": i // 2, "person_id": i // 2, "entities": ents})
    return records


def world_corpus(
    world: World, cache_dir: pathlib.Path, tokenizer: Any = None, **build_kwargs: Any
) -> Corpus:
    """The world's sentences as a records corpus (build_corpus with `build_kwargs`), tokenized
    by `tokenizer`, by default the world's own word-level tokenizer."""
    source = CorpusSource(kind="records", records=list(world.sentences), name="world")
    tokenizer = world_tokenizer(world) if tokenizer is None else tokenizer
    return build_corpus(source, tokenizer, cache_dir, **build_kwargs)
