"""Shared test setup: a persistent JAX compilation cache so re-runs skip XLA compiles (and
the offline environment every test and child process runs in), and the fixtures that tests
in several folders share."""

import os
import pathlib

import pytest

# Must be set before jax is imported anywhere.
_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "meta_mask_jax")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def sentence_tokenizer():
    """The word-level tokenizer (BART's special ids) of tests/data/corpus_helpers.SENTENCES."""
    from tests.data.corpus_helpers import SENTENCES
    from tests.data.tokenizer_helpers import word_tokenizer

    return word_tokenizer(SENTENCES)


@pytest.fixture(scope="session")
def records_corpus(sentence_tokenizer, tmp_path_factory):
    """world_like_records() three times over (30 sentences, gold entity spans) built into a
    corpus with sentence_tokenizer: every sentence kept, at most 16 tokens."""
    from meta_mask.data.corpora import CorpusSource, SentenceFilter, build_corpus
    from tests.data.corpus_helpers import world_like_records

    return build_corpus(
        CorpusSource(kind="records", records=world_like_records() * 3, name="records"),
        sentence_tokenizer,
        tmp_path_factory.mktemp("records_corpus"),
        sentence_filter=SentenceFilter(min_words=1),
        max_length=16,
    )
