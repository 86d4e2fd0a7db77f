"""Heuristic scorers + the shared sampler, as properties over many random sentences, and on real
text tokenized by a tiny fast tokenizer built here."""

import dataclasses

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from meta_mask.config import HEURISTIC_POLICIES, LEARNED_POLICIES, PolicyConfig, WorldConfig
from meta_mask.data.pmi import build_corpus_pmi, find_ngrams
from meta_mask.data.stream import CorpusStream
from meta_mask.data.world import build_world
from meta_mask.data.world_tokenizer import world_tokenizer
from meta_mask.policies.corrupt import corrupt_np
from meta_mask.policies.heuristic import (
    FILL_SCORE,
    NoMask,
    PmiNgrams,
    RandomSpans,
    RandomTokens,
    SalientSpans,
    WholeWords,
    collate,
    corpus_scorer,
    make_scorer,
    span_length_probs,
    span_units,
    word_units,
)
from meta_mask.policies.mlm_batches import policy_batch
from meta_mask.policies.sampler import BatchRng, mask_batch_np
from meta_mask.special_tokens import sentinel_ids
from tests.data.corpus_helpers import world_corpus
from tests.data.tokenizer_helpers import bpe_tokenizer
from tests.helpers import BART_SPECIAL as SPECIAL


def random_records(rng, n, max_words=20, entity_prob=0.2):
    """Sentences of 0..max_words words of 1-3 tokens, with word-aligned entity spans."""
    recs = []
    for _ in range(n):
        ids, wids, starts = [0], [-1], []
        for w in range(int(rng.integers(0, max_words + 1))):
            starts.append(len(ids))
            k = int(rng.integers(1, 4))
            ids += rng.integers(5, 120, k).tolist()
            wids += [w] * k
        starts.append(len(ids))
        ids.append(2)
        wids.append(-1)
        spans, labels, w = [], [], 0
        while w < len(starts) - 1:
            if rng.random() < entity_prob:
                width = int(min(rng.integers(1, 4), len(starts) - 1 - w))
                spans.append([starts[w], starts[w + width]])
                labels.append(["PERSON", "DATE", "CARDINAL"][len(spans) % 3])
                w += width + 1  # never adjacent, so entities stay separate spans in the mask
            else:
                w += 1
        recs.append(
            {
                "input_ids": np.asarray(ids, np.int32),
                "word_ids": np.asarray(wids, np.int32),
                "entity_spans": np.asarray(spans, np.int32).reshape(-1, 2),
                "entity_labels": labels,
            }
        )
    return recs


def runs(row_mask):
    """Half-open runs of True in a 1-D mask."""
    padded = np.r_[False, row_mask, False].astype(int)
    d = np.diff(padded)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True))


@pytest.fixture(scope="module")
def batch():
    return collate(random_records(np.random.default_rng(0), 400), length=64, special=SPECIAL)


def rng_for(batch, step=0, seed=0):
    return BatchRng(seed=seed, step=step, example_ids=batch["example_ids"])


def test_collate_pads_and_marks_specials(batch):
    assert batch["input_ids"].shape == (400, 64)
    assert not batch["valid"][np.isin(batch["input_ids"], [0, 1, 2])].any()
    assert (batch["valid"] == (batch["word_ids"] >= 0)).all()
    with pytest.raises(ValueError, match="length=3"):
        collate(random_records(np.random.default_rng(0), 5), length=3, special=SPECIAL)


def check_common(batch, mask):
    assert mask.shape == batch["input_ids"].shape and mask.dtype == bool
    assert not (mask & ~batch["valid"]).any()  # never special or pad


def word_ok(batch, mask):
    """Every word is masked entirely or not at all."""
    for i in range(len(mask)):
        for w in np.unique(batch["word_ids"][i][mask[i]]):
            assert mask[i][batch["word_ids"][i] == w].all()


@pytest.mark.parametrize(
    "scorer", [RandomTokens(), WholeWords(), RandomSpans(tuple(span_length_probs("geometric")))]
)
def test_rate_budget(batch, scorer):
    mask = mask_batch_np(scorer, batch, rng_for(batch), mask_rate=0.15)
    check_common(batch, mask)
    n = batch["valid"].sum(1)
    target = np.minimum(n, np.maximum(np.floor(0.15 * n + 0.5), n > 0))
    assert (mask.sum(1) >= target).all()
    rate = mask.sum() / n.sum()
    if isinstance(scorer, RandomTokens):
        assert (mask.sum(1) == target).all()  # single-token units hit the target exactly
    else:
        word_ok(batch, mask)
        # Multi-token units overshoot the target by part of the last unit: spans of ~3.8 words
        # (~7.6 tokens here) on ~20-token sentences overshoot most.
        assert 0.15 <= rate < (0.25 if isinstance(scorer, WholeWords) else 0.4)


def test_truncate_last_unit_gives_the_exact_rate_for_spans(batch):
    cfg = PolicyConfig(name="random_spans", mask_rate=0.15, truncate_last_unit=True)
    mask = mask_batch_np(make_scorer(cfg), batch, rng_for(batch), **cfg.budget())
    check_common(batch, mask)
    n = batch["valid"].sum(1)
    np.testing.assert_array_equal(
        mask.sum(1), np.minimum(n, np.maximum(np.floor(0.15 * n + 0.5), n > 0))
    )
    for i in range(len(mask)):
        assert len(runs(mask[i])) >= 1 if n[i] else not mask[i].any()


def test_no_mask_masks_nothing(batch):
    assert not mask_batch_np(NoMask(), batch, rng_for(batch), mask_rate=0.5).any()


def test_random_spans_are_contiguous_whole_words(batch):
    scorer = RandomSpans(tuple(span_length_probs("poisson", max_length=None, lam=3.0)))
    mask = mask_batch_np(scorer, batch, rng_for(batch), num_units=1)
    check_common(batch, mask)
    word_ok(batch, mask)
    for i in range(len(mask)):
        assert len(runs(mask[i])) == (1 if batch["valid"][i].any() else 0)


@pytest.mark.parametrize(
    "dist,kw,mean",
    [
        ("geometric", dict(p=0.2, max_length=10), 3.79),
        ("poisson", dict(lam=3.0), 3 / (1 - np.e**-3)),
    ],
)
def test_random_span_lengths_follow_the_distribution(dist, kw, mean):
    probs = span_length_probs(dist, **kw)
    np.testing.assert_allclose((np.arange(1, len(probs) + 1) * probs).sum(), mean, atol=0.01)
    # Long one-token-per-word sentences: interior units (not first, not cut by the end).
    b, length = 300, 200
    ids = np.full((b, length), 7, np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    wids = np.broadcast_to(np.r_[-1, np.arange(length - 2), -1], (b, length)).astype(np.int32)
    bt = {"input_ids": ids, "word_ids": wids, "valid": wids >= 0, "example_ids": np.arange(b)}
    _, units = RandomSpans(tuple(probs))(bt, BatchRng(0, 0, np.arange(b)))
    lengths = []
    for row in units:
        _, counts = np.unique(row[row >= 0], return_counts=True)
        lengths += counts[1:-1].tolist()
    hist = np.bincount(lengths, minlength=len(probs) + 1)[1:] / len(lengths)
    np.testing.assert_allclose(hist[: len(probs)], probs, atol=0.01)


def entity_sets(batch, i, labels=None):
    return [
        (int(s), int(e))
        for (s, e), lab in zip(batch["entity_spans"][i], batch["entity_labels"][i], strict=False)
        if s >= 0 and (labels is None or lab in labels)
    ]


def test_salient_realm_one_entity_per_sentence(batch):
    mask = mask_batch_np(SalientSpans(), batch, rng_for(batch), num_units=1)
    check_common(batch, mask)
    seen = set()
    for i in range(len(mask)):
        ents = entity_sets(batch, i)
        got = [(int(s), int(e)) for s, e in runs(mask[i])]
        assert len(got) == min(1, len(ents))
        if ents:
            assert got[0] in ents
            seen.add(ents.index(got[0]))
    assert len(seen) > 2  # not always the first entity


def test_salient_rate_variant_and_label_filter(batch):
    scorer = SalientSpans(labels=frozenset({"PERSON", "DATE"}))
    mask = mask_batch_np(scorer, batch, rng_for(batch), mask_rate=0.15)
    check_common(batch, mask)
    for i in range(len(mask)):
        ents = entity_sets(batch, i, {"PERSON", "DATE"})
        got = [(int(s), int(e)) for s, e in runs(mask[i])]
        assert set(got) <= set(ents)  # exactly entity spans (whole), of the kept labels only
        if ents:
            assert got


def test_salient_fill_with_words_takes_all_entities_first(batch):
    scores, units = SalientSpans(fill_with_words=True)(batch, rng_for(batch))
    assert set(np.unique(scores)) <= {0.0, FILL_SCORE}
    mask = mask_batch_np(SalientSpans(fill_with_words=True), batch, rng_for(batch), mask_rate=0.5)
    check_common(batch, mask)
    word_ok(batch, mask)
    for i in range(len(mask)):
        ents = entity_sets(batch, i)
        in_ent = np.zeros(64, bool)
        for s, e in ents:
            in_ent[s:e] = True
        if (mask[i] & ~in_ent).any():  # a filler word was taken: every entity is masked
            assert mask[i][in_ent].all()


def test_determinism_per_step(batch):
    scorer = RandomSpans(tuple(span_length_probs("geometric")))
    a = mask_batch_np(scorer, batch, rng_for(batch, step=1), mask_rate=0.15)
    b = mask_batch_np(scorer, batch, rng_for(batch, step=1), mask_rate=0.15)
    c = mask_batch_np(scorer, batch, rng_for(batch, step=2), mask_rate=0.15)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.05
    # An example's mask does not depend on its batch-mates.
    sub = {k: (v[5:9] if k != "entity_labels" else v[5:9]) for k, v in batch.items()}
    d = mask_batch_np(scorer, sub, rng_for(sub, step=1), mask_rate=0.15)
    np.testing.assert_array_equal(d, a[5:9])


def collocation_corpus(rng, n=600):
    """Words: 'new york city' (one word each) always together; the others independent."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "new": 5, "york": 6}
    vocab["city"] = 7
    fillers = [f"w{i}" for i in range(30)]
    vocab.update({w: 8 + i for i, w in enumerate(fillers)})
    texts = []
    for _ in range(n):
        words = list(rng.choice(fillers, size=int(rng.integers(3, 12))))
        if rng.random() < 0.5:
            pos = int(rng.integers(0, len(words) + 1))
            words[pos:pos] = ["new", "york", "city"]
        texts.append(" ".join(words))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    records = []
    for t in texts:
        enc = fast(t)
        records.append(
            {
                "input_ids": np.r_[0, enc["input_ids"], 2].astype(np.int32),
                "word_ids": np.r_[-1, enc.word_ids(), -1].astype(np.int32),
            }
        )
    return records


def test_pmi_ngrams_are_masked_whole():
    records = collocation_corpus(np.random.default_rng(0))
    scorer = PmiNgrams(build_corpus_pmi(records, max_n=5, min_count=5, top_k=5))
    batch = collate(records, special=SPECIAL)  # example_ids: the records' rows
    has = np.array([5 in r["input_ids"] for r in records])
    coll = np.isin(batch["input_ids"], [5, 6, 7])
    for step in range(3):
        mask = mask_batch_np(scorer, batch, rng_for(batch, step), mask_rate=0.15)
        check_common(batch, mask)
        for i in np.flatnonzero(has):
            assert mask[i][coll[i]].all() or not mask[i][coll[i]].any()
        assert mask[has][coll[has]].any()  # and the collocation is sometimes masked
    _, units = scorer(batch, rng_for(batch))
    for i in np.flatnonzero(has):
        assert len(np.unique(units[i][coll[i]])) == 1


def test_pmi_scorer_needs_the_corpus_ngrams_and_its_rows():
    with pytest.raises(ValueError, match="corpus_scorer"):
        make_scorer(PolicyConfig(name="pmi"))
    records = collocation_corpus(np.random.default_rng(0))
    scorer = PmiNgrams(build_corpus_pmi(records, max_n=5, min_count=5, top_k=5))
    # rows 0..2, other sentences
    other = collate(random_records(np.random.default_rng(0), 3), special=SPECIAL)
    with pytest.raises(ValueError, match="example_ids"):
        scorer(other, rng_for(other))


def world_corpus_and_tokenizer(tmp_path, tokenizer_kind):
    """A real small corpus: the synthetic world's sentences, tokenized and cached by
    data.corpora.build_corpus as a run does, with its word-level tokenizer or a tiny BPE (whose
    rare words are several tokens)."""
    world = build_world(WorldConfig(num_people=20, num_bios=2))
    texts = [s["text"] for s in world.sentences]
    tok = world_tokenizer(world) if tokenizer_kind == "word" else bpe_tokenizer(texts)
    return world_corpus(world, tmp_path / "corpora", tok, max_length=48), tok


def pmi_units_per_sentence(batch, table):
    """The PMI units as the scorer found them before the spans were precomputed per corpus
    row: each batch sentence's n-grams found with the table (find_ngrams), then every other
    word a unit. The reference the gathered spans must reproduce."""
    pairs = zip(batch["input_ids"], batch["word_ids"], strict=True)
    found = [find_ngrams(ids, wids, table) for ids, wids in pairs]
    spans = np.full((len(found), max([len(f) for f in found] + [1]), 2), -1, np.int32)
    for i, f in enumerate(found):
        spans[i, : len(f)] = f
    units = span_units(spans, batch["valid"])
    rest = batch["valid"] & (units < 0)
    return np.where(rest, word_units(batch["word_ids"], rest), units)


@pytest.mark.parametrize("tokenizer_kind", ["word", "bpe"])
def test_pmi_scorer_gathers_the_units_finding_them_per_sentence_gives(tmp_path, tokenizer_kind):
    """The run's PMI scorer (corpus_scorer: every row's n-grams found once, cached) gives the
    same units (and all-zero scores) as finding each batch sentence's n-grams with the table,
    on stream batches of a real corpus."""
    corpus, tok = world_corpus_and_tokenizer(tmp_path, tokenizer_kind)
    cfg = PolicyConfig(name="pmi", pmi_min_count=5)
    scorer = corpus_scorer(cfg, corpus)
    stream = CorpusStream(corpus.dataset, batch_size=16, max_length=48, seed=0, special=SPECIAL)
    multi_word = multi_token_words = 0
    for step in range(2 * stream.batches_per_epoch):  # every row, twice
        sb = stream.batch_at(step * 16)
        batch = policy_batch(sb, stream.entity_labels(sb["indices"]), SPECIAL)
        scores, units = scorer(batch, rng_for(batch, step))
        np.testing.assert_array_equal(units, pmi_units_per_sentence(batch, scorer.pmi.table))
        np.testing.assert_array_equal(scores, np.zeros(units.shape, np.float32))
        for i in range(len(units)):
            for u in np.unique(units[i][units[i] >= 0]):
                words = batch["word_ids"][i][units[i] == u]
                multi_word += len(np.unique(words)) > 1
                multi_token_words += len(words) > 1 and len(np.unique(words)) == 1
    assert multi_word > 100  # the corpus's collocations ("was born in", ...) are units
    assert (multi_token_words > 100) == (tokenizer_kind == "bpe")


TEXTS = [
    "Barack Obama was born in Honolulu , Hawaii on August 4 , 1961 .",
    "Marie Curie won the Nobel Prize in 1903 .",
]
ENTS = [["Barack Obama", "Honolulu", "Hawaii", "August 4 , 1961"], ["Marie Curie", "1903"]]


def real_text_records():
    """A WordLevel fast tokenizer with sentinels; gold char spans -> token spans via offsets
    (as data/tokenize.py does)."""
    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({w: 5 + i for i, w in enumerate(words)})
    for i in range(4):
        vocab[f"<extra_id_{i}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    records = []
    for text, names in zip(TEXTS, ENTS, strict=True):
        enc = fast(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        spans = []
        for name in names:
            s = text.index(name)
            e = s + len(name)
            toks = [j for j, (a, b) in enumerate(offsets) if a >= s and b <= e]
            spans.append([toks[0] + 1, toks[-1] + 2])  # +1 for <s>
        records.append(
            {
                "input_ids": np.r_[0, enc["input_ids"], 2].astype(np.int32),
                "word_ids": np.r_[-1, enc.word_ids(), -1].astype(np.int32),
                "entity_spans": np.asarray(spans, np.int32),
                "entity_labels": ["PERSON", "GPE", "GPE", "DATE"][: len(spans)],
            }
        )
    return fast, records


def test_real_text_salient_spans_with_a_fast_tokenizer():
    fast, records = real_text_records()
    batch = collate(records, special=SPECIAL)
    found = set()
    for step in range(40):
        mask = mask_batch_np(SalientSpans(), batch, rng_for(batch, step), num_units=1)
        for i in range(2):
            text = " ".join(fast.convert_ids_to_tokens(batch["input_ids"][i][mask[i]].tolist()))
            assert text in ENTS[i]
            found.add(text)
    assert found == {e for es in ENTS for e in es}


def test_real_text_end_to_end_masked_spans_example():
    """Scorer -> sampler -> corrupt, decoded back to text: the sentinel replaces the entity."""
    fast, records = real_text_records()
    batch = collate(records, length=20, special=SPECIAL)
    cfg = PolicyConfig(name="salient_spans", spans_per_sentence=1)
    mask = mask_batch_np(make_scorer(cfg), batch, rng_for(batch, 3), **cfg.budget())
    # The tokenizer names only <unk> and <pad>: BART's layout, with its sentinels.
    special = dataclasses.replace(SPECIAL, sentinels=tuple(sentinel_ids(fast)))
    out = corrupt_np(batch["input_ids"], mask, output_format=cfg.output_format, enc_len=20,
                     dec_len=12, special=special, infill=cfg.infill)  # fmt: skip
    for i, text in enumerate(TEXTS):
        enc = fast.decode(out["input_ids"][i], skip_special_tokens=False).replace("<pad>", "")
        target = fast.decode(out["labels"][i][out["weights"][i] > 0], skip_special_tokens=False)
        assert target.startswith("<extra_id_0> ") and target.endswith(" </s>")
        entity = target[len("<extra_id_0> ") : -len(" </s>")]
        assert entity in ENTS[i]
        assert enc.split() == ["<s>", *text.replace(entity, "<extra_id_0>").split(), "</s>"]


def test_make_scorer_covers_every_policy(batch):
    for name in HEURISTIC_POLICIES:
        cfg = PolicyConfig(name=name, spans_per_sentence=2 if name == "salient_spans" else 0)
        pmi = build_corpus_pmi(random_records(np.random.default_rng(0), 400), min_count=2)
        scorer = make_scorer(cfg, pmi=pmi if name == "pmi" else None)
        mask = mask_batch_np(scorer, batch, rng_for(batch), **cfg.budget())
        check_common(batch, mask)
        assert mask.any() == (name != "none")
    with pytest.raises(ValueError, match="valid"):
        PolicyConfig(name="salient")
    for name in LEARNED_POLICIES:  # learned scorers come from their checkpoints, not here
        with pytest.raises(ValueError, match="has no scorer"):
            make_scorer(PolicyConfig(name=name))
