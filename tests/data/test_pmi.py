"""PMI-Masking's n-gram measure (hand-computed and brute force), the top-K table on a corpus
with a true collocation, finding n-grams in a sentence, a corpus's per-row spans (gathered for a
batch of rows), and their cache next to the tokenized corpus."""

import itertools
import math

import numpy as np
import pytest

from meta_mask.config import WorldConfig
from meta_mask.data import pmi
from meta_mask.data.pmi import (
    build_corpus_pmi,
    build_pmi_table,
    corpus_pmi,
    count_ngrams,
    find_ngrams,
    load_corpus_pmi,
    ngram_pmi,
    pmi_scores,
    record_words,
    save_corpus_pmi,
)
from meta_mask.data.world import build_world
from tests.data.corpus_helpers import world_corpus


def rec(words):
    """A record whose words are single tokens with the given ids."""
    return {
        "input_ids": np.asarray([0, *words, 2], np.int32),
        "word_ids": np.asarray([-1, *range(len(words)), -1], np.int32),
    }


def test_bigram_pmi_hand_computed():
    a, b, c, d = 10, 11, 12, 13
    corpus = [rec([a, b]), rec([a, b]), rec([a, c]), rec([d, b])]
    vocab, counts = count_ngrams(corpus, max_n=2)
    scores = pmi_scores(counts, min_count=1)
    ia, ib = vocab[(a,)], vocab[(b,)]
    # p(ab) = 2/4 bigrams; p(a) = p(b) = 3/8 unigrams.
    assert scores[(ia, ib)] == pytest.approx(math.log(2 / 4) - 2 * math.log(3 / 8))
    assert pmi_scores(counts, min_count=2).keys() == {(ia, ib)}


def test_ngram_pmi_is_min_over_all_segmentations():
    rng = np.random.default_rng(0)
    for n in range(2, 6):
        gram = tuple(range(n))
        logp = {gram[i:j]: -rng.uniform(0, 8) for i in range(n) for j in range(i + 1, n + 1)}
        best = math.inf
        for k in range(1, n):  # k cut points: every segmentation into >= 2 parts
            for cuts in itertools.combinations(range(1, n), k):
                bounds = (0, *cuts, n)
                parts = sum(logp[gram[s:e]] for s, e in itertools.pairwise(bounds))
                best = min(best, logp[gram] - parts)
        assert ngram_pmi(gram, logp.__getitem__) == pytest.approx(best)


def collocation_corpus(n=3000, seed=0):
    """Word ids 5, 6, 7 ('new york city') always together; fillers 20..49 independent."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = rng.integers(20, 50, int(rng.integers(3, 12))).tolist()
        if rng.random() < 0.5:
            pos = int(rng.integers(0, len(words) + 1))
            words[pos:pos] = [5, 6, 7]
        out.append(rec(words))
    return out


def test_collocation_gets_high_pmi_independent_pairs_do_not():
    corpus = collocation_corpus()
    vocab, counts = count_ngrams(corpus, max_n=5)
    scores = pmi_scores(counts, min_count=5)
    new, york, city = (vocab[(t,)] for t in (5, 6, 7))
    filler_bigrams = [v for g, v in scores.items() if len(g) == 2 and min(g) > city]
    assert len(filler_bigrams) > 100
    assert scores[(new, york, city)] > 2.0
    assert scores[(new, york)] > 2.0
    # Independent words: PMI near 0 (sampling noise only), far below the collocation.
    assert np.abs(filler_bigrams).mean() < 0.3
    assert max(filler_bigrams) < scores[(new, york, city)] - 1.0
    table = build_pmi_table(corpus, max_n=5, min_count=5, top_k=3)
    assert set(table.ngrams) == {
        tuple(table.vocab[(t,)] for t in g) for g in [(5, 6, 7), (5, 6), (6, 7)]
    }
    # A 4-gram "new york city X" is explained by "new york city" + "X": not a collocation.
    four = [g for g in scores if len(g) == 4 and g[:3] == (new, york, city)]
    assert four and all(scores[g] < 1.0 for g in four)


def test_find_ngrams_longest_first_non_overlapping_token_spans():
    corpus = collocation_corpus()
    table = build_pmi_table(corpus, max_n=5, min_count=5, top_k=3)
    # Multi-token words: "new" = [5], "york" = [6], "city" = [7]; filler word of 2 tokens first.
    ids = np.asarray([0, 20, 21, 5, 6, 7, 5, 6, 30, 2], np.int32)
    wids = np.asarray([-1, 0, 0, 1, 2, 3, 4, 5, 6, -1], np.int32)
    # Filler (20, 21) is not a word of the corpus; "new york city" then "new york".
    np.testing.assert_array_equal(find_ngrams(ids, wids, table), [[3, 6], [6, 8]])
    # Nothing to find in a sentence of unknown words.
    assert find_ngrams(np.array([0, 9, 2]), np.array([-1, 0, -1]), table).shape == (0, 2)
    np.testing.assert_array_equal(find_ngrams(**rec([5, 6, 7]), table=table), [[1, 4]])
    assert find_ngrams(**rec([20, 5]), table=table).shape == (0, 2)


def test_record_words_groups_tokens_by_word_id():
    words = record_words([0, 5, 6, 7, 8, 2], [-1, 0, 0, 1, 2, -1])
    assert words == [((5, 6), 1, 3), ((7,), 3, 4), ((8,), 4, 5)]


def assert_same_corpus_pmi(a, b):
    assert a.table == b.table  # vocab, n-grams with their PMI (exactly), max_n
    for name in ("spans", "offsets", "word_tokens"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_corpus_pmi_file_round_trip(tmp_path):
    built = build_corpus_pmi(collocation_corpus(), max_n=5, min_count=5, top_k=10)
    assert len(built.table.ngrams) == 10 and len(built.spans) > 1000
    save_corpus_pmi(built, tmp_path / "pmi.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["pmi.npz"]  # no temporary file left
    assert_same_corpus_pmi(load_corpus_pmi(tmp_path / "pmi.npz"), built)


def test_batch_spans_are_each_rows_spans_and_rows_are_checked():
    corpus = collocation_corpus(300)
    built = build_corpus_pmi(corpus, max_n=5, min_count=5, top_k=3)
    rows = np.array([7, 0, 7, 299, 5])
    word_ids = np.full((len(rows), 20), -1, np.int32)
    for i, r in enumerate(rows):
        word_ids[i, : len(corpus[r]["word_ids"])] = corpus[r]["word_ids"]
    spans = built.batch_spans(rows, word_ids)
    assert spans.dtype == np.int32 and spans.shape[2] == 2
    for i, r in enumerate(rows):
        found = find_ngrams(corpus[r]["input_ids"], corpus[r]["word_ids"], built.table)
        np.testing.assert_array_equal(spans[i, : len(found)], found)
        assert (spans[i, len(found) :] == -1).all()
    assert (spans >= 0).any() and (spans == -1).any()
    with pytest.raises(ValueError, match="word tokens"):
        built.batch_spans(rows[::-1], word_ids)  # not these rows' sentences
    with pytest.raises(ValueError, match="not rows"):
        built.batch_spans(np.array([300]), word_ids[:1])


def small_world_corpus(cache_dir):
    return world_corpus(
        build_world(WorldConfig(num_people=10, num_bios=2)), cache_dir, max_length=48
    )


def test_corpus_pmi_is_cached_next_to_the_corpus(tmp_path, monkeypatch):
    corpus = small_world_corpus(tmp_path)
    params = {"max_n": 4, "min_count": 3, "top_k": 50}
    first = corpus_pmi(corpus, **params)
    assert first.table.ngrams and len(first) == len(corpus)
    cached = sorted(p.name for p in tmp_path.glob("*.npz"))
    assert cached == [f"{corpus.fingerprint}.pmi-v{pmi.PMI_CACHE_VERSION}-n4-c3-k50.npz"]

    # The corpus rebuilt from its cache, then the same parameters: loaded, not recomputed.
    calls = []

    def counting_build(*args):
        calls.append(args[1:])
        return build_corpus_pmi(*args)

    monkeypatch.setattr(pmi, "build_corpus_pmi", counting_build)
    again = small_world_corpus(tmp_path)
    assert again.from_cache and again.fingerprint == corpus.fingerprint
    assert_same_corpus_pmi(corpus_pmi(again, **params), first)
    assert calls == []
    # Each parameter is part of the key: changing one recomputes (and caches that one too).
    for change in ({"max_n": 3}, {"min_count": 4}, {"top_k": 20}):
        changed = corpus_pmi(again, **(params | change))
        assert calls[-1] == tuple((params | change).values())
        assert changed.table != first.table
    assert len(calls) == 3 and len(list(tmp_path.glob("*.npz"))) == 4


def test_max_n_must_allow_ngrams():
    with pytest.raises(ValueError, match="max_n"):
        build_pmi_table(collocation_corpus(10), max_n=1)
