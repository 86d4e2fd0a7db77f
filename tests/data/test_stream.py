"""Tests for meta_mask.data.stream: deterministic, resumable, multi-host corpus batches."""

from __future__ import annotations

import numpy as np
import pytest

from meta_mask.data.stream import CorpusStream
from tests.helpers import BART_SPECIAL as SPECIAL  # word_tokenizer's ids


def test_stream_resume_equals_uninterrupted_pass(records_corpus):
    stream = CorpusStream(
        records_corpus.dataset, batch_size=4, max_length=16, seed=3, special=SPECIAL
    )
    full = [stream.batch_at(4 * i) for i in range(20)]
    resumed_at = 9 * 4  # crosses the epoch boundary (7 batches per epoch)
    fresh = CorpusStream(
        records_corpus.dataset, batch_size=4, max_length=16, seed=3, special=SPECIAL
    )
    tail = [fresh.batch_at(resumed_at + 4 * i) for i in range(11)]
    for a, b in zip(full[9:], tail, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other_seed = CorpusStream(
        records_corpus.dataset, batch_size=4, max_length=16, seed=4, special=SPECIAL
    )
    assert not np.array_equal(other_seed.batch_at(0)["indices"], stream.batch_at(0)["indices"])


def test_stream_epochs_are_permutations(records_corpus):
    stream = CorpusStream(
        records_corpus.dataset, batch_size=4, max_length=16, seed=0, special=SPECIAL
    )
    assert stream.batches_per_epoch == 7
    for epoch in range(2):
        rows = np.concatenate([stream.indices_at((epoch * 7 + s) * 4) for s in range(7)])
        assert len(set(rows.tolist())) == 28  # no repeats within an epoch
        np.testing.assert_array_equal(rows, stream.permutation(epoch)[:28])
    assert not np.array_equal(stream.permutation(0), stream.permutation(1))


def test_stream_batches_are_padded_rows_of_the_corpus(records_corpus, sentence_tokenizer):
    ds = records_corpus.dataset
    # max_entities is a lower bound: no row's entity is ever dropped.
    most = max(len(spans) for spans in ds["entity_spans"])
    assert most > 1
    stream = CorpusStream(ds, batch_size=6, max_length=16, seed=1, max_entities=1, special=SPECIAL)
    batch = stream.batch_at(12)
    assert batch["input_ids"].shape == (6, 16) and batch["input_ids"].dtype == np.int32
    assert batch["entity_spans"].shape == (6, most, 2)
    for i, r in enumerate(batch["indices"]):
        row = ds[int(r)]
        n = len(row["input_ids"])
        assert batch["lengths"][i] == n
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert (batch["input_ids"][i, n:] == sentence_tokenizer.pad_token_id).all()
        assert batch["word_ids"][i, :n].tolist() == row["word_ids"]
        assert (batch["word_ids"][i, n:] == -1).all()
        e = len(row["entity_spans"])
        assert batch["num_entities"][i] == e
        assert batch["entity_spans"][i, :e].tolist() == row["entity_spans"][:e]
    assert stream.entity_labels(batch["indices"]) == [
        ds[int(r)]["entity_labels"] for r in batch["indices"]
    ]
    assert stream.entity_types(batch["indices"]) == [
        ds[int(r)]["entity_types"] for r in batch["indices"]
    ]


def test_stream_hosts_get_disjoint_shards_of_each_global_batch(records_corpus):
    glob = CorpusStream(
        records_corpus.dataset, batch_size=6, max_length=16, seed=5, special=SPECIAL
    )
    hosts = [
        CorpusStream(
            records_corpus.dataset,
            batch_size=6,
            max_length=16,
            seed=5,
            process_index=i,
            process_count=3,
            special=SPECIAL,
        )
        for i in range(3)
    ]
    for pos in (0, 6, 24, 30):
        parts = [h.batch_at(pos) for h in hosts]
        assert all(p["input_ids"].shape == (2, 16) for p in parts)
        joined = np.concatenate([p["indices"] for p in parts])
        assert len(set(joined.tolist())) == 6
        np.testing.assert_array_equal(joined, glob.batch_at(pos)["indices"])


def test_stream_errors(records_corpus):
    stream = CorpusStream(
        records_corpus.dataset, batch_size=4, max_length=16, seed=0, special=SPECIAL
    )
    with pytest.raises(ValueError, match="multiple of the global batch_size=4"):
        stream.batch_at(6)
    with pytest.raises(ValueError, match="max_length=5 is shorter"):
        CorpusStream(records_corpus.dataset, batch_size=4, max_length=5, seed=0, special=SPECIAL)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        CorpusStream(
            records_corpus.dataset,
            batch_size=4,
            max_length=16,
            seed=0,
            process_count=3,
            special=SPECIAL,
        )
    with pytest.raises(ValueError, match="fewer than batch_size"):
        CorpusStream(records_corpus.dataset, batch_size=64, max_length=16, seed=0, special=SPECIAL)


def test_stream_accepts_a_corpus_and_a_selected_view(records_corpus):
    from_corpus = CorpusStream(records_corpus, batch_size=4, max_length=16, seed=2, special=SPECIAL)
    from_dataset = CorpusStream(
        records_corpus.dataset, batch_size=4, max_length=16, seed=2, special=SPECIAL
    )
    np.testing.assert_array_equal(
        from_corpus.batch_at(8)["input_ids"], from_dataset.batch_at(8)["input_ids"]
    )
    rows = [3, 7, 11, 12, 20, 25]
    view = records_corpus.dataset.select(rows)
    stream = CorpusStream(view, batch_size=6, max_length=16, seed=0, special=SPECIAL)
    batch = stream.batch_at(0)
    for i, r in enumerate(batch["indices"]):
        n = batch["lengths"][i]
        assert (
            batch["input_ids"][i, :n].tolist() == records_corpus.dataset[rows[int(r)]]["input_ids"]
        )
