"""Tests for meta_mask.data.corpora: sentence records, readers, tokenize-once caching."""

from __future__ import annotations

import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meta_mask.data import corpora
from meta_mask.data.corpora import (
    CorpusError,
    CorpusSource,
    SentenceFilter,
    build_corpus,
    document_sentences,
    file_documents,
    iter_sentences,
    task_documents,
    tokenizer_fingerprint,
    wikipedia_documents,
)
from meta_mask.data.sentences import split_sentences
from meta_mask.data.tokenize import tokenize_sentences
from tests.data.corpus_helpers import SENTENCES, world_corpus, world_like_records
from tests.data.tokenizer_helpers import word_tokenizer

# ------------------------------------------------------------------------------------------
# Helpers


def counting(fn):
    """Wrap a tokenize function, counting the sentences it tokenizes."""
    calls = {"sentences": 0}

    def wrapped(records, tok):
        calls["sentences"] += len(records)
        return fn(records, tok)

    return wrapped, calls


# ------------------------------------------------------------------------------------------
# Sentence records and filtering


def test_document_sentences_shift_entities_and_drop_crossing_ones():
    text = "Alice Moreau was born in Lyon. She moved to Paris later."
    paris = text.index("Paris")
    doc = {
        "text": text,
        "doc_id": 7,
        "entities": [
            (paris, paris + 5, "GPE", "visited"),
            (0, 12, "PERSON", "name"),
            (text.index("Lyon"), text.index("She") + 3, "BAD", ""),  # crosses the boundary
        ],
    }
    counts: dict[str, int] = {}
    recs = document_sentences(doc, counts)
    assert [r["text"] for r in recs] == [
        "Alice Moreau was born in Lyon.",
        "She moved to Paris later.",
    ]
    assert recs[0]["entities"] == [(0, 12, "PERSON", "name")]
    s = recs[1]["text"].index("Paris")
    assert recs[1]["entities"] == [(s, s + 5, "GPE", "visited")]
    assert recs[1]["text"][s : s + 5] == "Paris"
    assert recs[0]["doc_id"] == "7"
    assert counts["entities_crossing"] == 1


def test_sentence_filter_and_max_sentences():
    f = SentenceFilter(min_chars=10, max_chars=60, min_words=3, max_words=8)
    assert f.reject_reason("Too short.") == "too_few_words"
    assert f.reject_reason("Tiny one") == "too_few_chars"
    assert f.reject_reason("one two three four five six seven eight nine ten.") == "too_many_words"
    assert f.reject_reason("x" * 61 + " a b") == "too_many_chars"
    assert f.reject_reason("This one is fine.") is None
    docs = [{"text": "Short. " + " ".join(SENTENCES[:4]), "doc_id": 0}]
    counts: dict[str, int] = {}
    kept = list(iter_sentences(docs, SentenceFilter(min_words=3), max_sentences=3, counts=counts))
    assert [r["text"] for r in kept] == SENTENCES[:3]
    assert counts["too_few_chars"] == 1 and counts["sentences_kept"] == 3
    with pytest.raises(ValueError, match="min_words"):
        SentenceFilter(min_words=9, max_words=2)


# ------------------------------------------------------------------------------------------
# Readers


def test_txt_line_and_paragraph_modes(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("First doc line one.\nSecond doc.\n\nThird doc starts\nand wraps here.\n")
    lines = list(file_documents(path))
    assert [d["text"] for d in lines] == [
        "First doc line one.",
        "Second doc.",
        "Third doc starts",
        "and wraps here.",
    ]
    assert lines[1]["doc_id"] == "c.txt:2"
    paras = list(file_documents(path, txt_unit="paragraph"))
    assert [d["text"] for d in paras] == [
        "First doc line one. Second doc.",
        "Third doc starts and wraps here.",
    ]
    assert [d["doc_id"] for d in paras] == ["c.txt:1", "c.txt:4"]
    with pytest.raises(ValueError, match="txt_unit"):
        list(file_documents(path, txt_unit="page"))


def test_jsonl_custom_field_entities_and_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [
        {"body": "Alice Moreau was born in Lyon. She left.", "ents": [[25, 29, "GPE"]], "id": "a"},
        {"body": "No entities here at all."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = list(file_documents(path, text_field="body", entities_field="ents"))
    assert [d["doc_id"] for d in docs] == ["a", "c.jsonl:2"]
    assert docs[0]["entities"] == [(25, 29, "GPE")]
    assert docs[1]["entities"] == []

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + '{"body": "unterminated\n')
    with pytest.raises(ValueError, match=rf"{bad}:2: malformed JSON"):
        list(file_documents(bad, text_field="body"))
    with pytest.raises(ValueError, match=rf"{path}:1: .*string field 'text'"):
        list(file_documents(path))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"text": "Hello there.", "entities": [["a", 3, "X"]]}) + "\n")
    with pytest.raises(ValueError, match=rf"{wrong}:1: .*integer character offsets"):
        list(file_documents(wrong))
    with pytest.raises(ValueError, match=r"valid: \.txt, \.jsonl"):
        list(file_documents(tmp_path / "x.csv"))


def write_wiki_parquet(path, articles: list[str]) -> None:
    table = pa.table(
        {
            "id": [str(100 + i) for i in range(len(articles))],
            "url": [f"https://en.wikipedia.org/wiki?curid={100 + i}" for i in range(len(articles))],
            "title": [f"Title {i}" for i in range(len(articles))],
            "text": articles,
        }
    )
    pq.write_table(table, path)


def test_wikipedia_streams_local_parquet(tmp_path, monkeypatch):
    import datasets

    path = tmp_path / "wiki.parquet"
    write_wiki_parquet(path, ["Heading\nAlice was here. Bob was there.", "Carol sang."])
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kw):
        ds = real(*args, **kw)
        calls.append((args, kw, type(ds)))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", spy)
    docs = list(wikipedia_documents(data_files=str(path)))
    assert [d["doc_id"] for d in docs] == ["100", "101"]
    assert docs[0]["title"] == "Title 0"
    assert split_sentences(docs[0]["text"]) == ["Heading", "Alice was here.", "Bob was there."]
    (args, kw, kind) = calls[0]
    assert args == ("parquet",) and kw["streaming"] is True
    assert kind is datasets.IterableDataset
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"id": ["1"], "body": ["Some text."]}), wrong)
    with pytest.raises(ValueError, match=r"need columns id, url, title, text.*\['body', 'id'\]"):
        list(wikipedia_documents(data_files=str(wrong)))


def test_wikipedia_hub_offline_error_says_how_to_use_local_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="data_files="):
        next(wikipedia_documents("20231101.en"))


def test_task_documents_contexts_summaries_and_qa_without_contexts(tmp_path):
    rows = {
        "train": [
            {
                "source": "Where was Alice born?",
                "targets": ["Lyon"],
                "contexts": [
                    {"text": "Alice was born in Lyon.", "answer_spans": [(18, 22)]},
                    {"text": "Alice grew up in Lyon.", "answer_spans": [(17, 21)]},
                ],
            },
            {
                "source": "Which city raised Alice?",
                "targets": ["Lyon"],
                "contexts": [{"text": "Alice grew up in Lyon.", "answer_spans": [(17, 21)]}],
            },
        ]
    }
    # A task in meta_mask's own schema (a world task's files), contexts included.
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "train.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows["train"])
    )
    docs = list(task_documents("world_qa", "train", data_dir=tmp_path / "own"))
    assert [d["text"] for d in docs] == ["Alice was born in Lyon.", "Alice grew up in Lyon."]
    # Without files a world task has no documents of its own: the world's corpus is the world.
    with pytest.raises(CorpusError, match="synthetic world.*corpus 'world'"):
        list(task_documents("world_qa", "train"))

    (tmp_path / "train.jsonl").write_text(
        "\n".join(
            json.dumps({"id": str(i), "document": f"Article {i} text. More.", "summary": "S."})
            for i in range(3)
        )
    )
    docs = list(task_documents("xsum", "train", data_dir=tmp_path))
    assert [d["text"] for d in docs] == [f"Article {i} text. More." for i in range(3)]

    (tmp_path / "nq").mkdir()
    (tmp_path / "nq" / "train.jsonl").write_text(
        json.dumps({"question": "who?", "answer": ["me"]}) + "\n"
    )
    with pytest.raises(ValueError, match="no contexts"):
        list(task_documents("nq", "train", data_dir=tmp_path / "nq"))
    src = list(task_documents("nq", "train", data_dir=tmp_path / "nq", field="source"))
    assert [d["text"] for d in src] == ["who?"]


def test_corpus_source_specs_and_validation(tmp_path):
    assert CorpusSource.from_spec("wikipedia").config == "20231101.en"
    assert CorpusSource.from_spec("wikipedia:20231101.fr").config == "20231101.fr"
    assert CorpusSource.from_spec("file:/x/y.jsonl").path == "/x/y.jsonl"
    t = CorpusSource.from_spec("task:nq:validation")
    assert (t.kind, t.task, t.split) == ("task", "nq", "validation")
    assert CorpusSource.from_spec("/d/c.jsonl", text_field="body").text_field == "body"
    assert CorpusSource.from_spec("/d/c.txt").kind == "file"
    w = CorpusSource.from_spec("/d/wiki-*.parquet")
    assert (w.kind, w.data_files) == ("wikipedia", ("/d/wiki-*.parquet",))
    own = CorpusSource.from_spec("task", task="tqa", data_dir="/d")
    assert (own.task, own.split, own.data_dir) == ("tqa", "train", "/d")
    with pytest.raises(ValueError, match="needs task"):
        CorpusSource.from_spec("task")
    with pytest.raises(ValueError, match="valid forms"):
        CorpusSource.from_spec("books:foo")
    with pytest.raises(ValueError, match="valid"):
        CorpusSource(kind="web")
    with pytest.raises(ValueError, match="needs path"):
        CorpusSource(kind="file")


# ------------------------------------------------------------------------------------------
# Tokenize once, cache on disk


def test_build_corpus_matches_tokenize_sentences_and_counts_truncation(
    tmp_path, sentence_tokenizer
):
    records = world_like_records()
    src = CorpusSource(kind="records", records=records, name="world")
    corpus = build_corpus(
        src, sentence_tokenizer, tmp_path, sentence_filter=SentenceFilter(min_words=1), max_length=9
    )
    ds = corpus.dataset
    assert len(ds) == len(records)
    ref = tokenize_sentences(records, sentence_tokenizer)
    n_trunc = 0
    for row, r, rec in zip(ds, ref, records, strict=True):
        assert row["text"] == rec["text"] and row["doc_id"] == str(rec["doc_id"])
        full = list(r["input_ids"])
        if len(full) > 9:
            n_trunc += 1
            assert row["input_ids"] == full[:8] + [sentence_tokenizer.eos_token_id]
            assert row["truncated"]
        else:
            assert row["input_ids"] == full
            assert row["word_ids"] == list(r["word_ids"])
        assert row["length"] == len(row["input_ids"]) <= 9
        # Entities survive truncation only when wholly inside the kept tokens.
        keep = [
            j for j, (s, e) in enumerate(r["entity_spans"].tolist()) if e <= 8 or len(full) <= 9
        ]
        assert row["entity_spans"] == [r["entity_spans"].tolist()[j] for j in keep]
        assert row["entity_labels"] == [r["entity_labels"][j] for j in keep]
        assert row["entity_types"] == [r["entity_attributes"][j] for j in keep]
    assert n_trunc > 0
    assert corpus.stats["truncated"] == n_trunc == sum(ds["truncated"])
    assert corpus.stats["tokens"] == sum(len(x) for x in ds["input_ids"])
    assert corpus.stats["sentences"] == len(records)
    assert ds._fingerprint == corpus.fingerprint
    # The Lyon entity keeps its attribute type through tokenization.
    assert "birth_city" in ds[0]["entity_types"]


def test_cache_reloads_without_retokenizing_and_rebuilds_on_changes(
    tmp_path, sentence_tokenizer, monkeypatch, caplog
):
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("\n".join(SENTENCES) + "\n")
    src = CorpusSource(kind="file", path=str(corpus_file))
    cache = tmp_path / "cache"
    fn, calls = counting(tokenize_sentences)
    reads = {"n": 0}
    real_reader = corpora.file_documents

    def counting_reader(*args, **kw):
        reads["n"] += 1
        return real_reader(*args, **kw)

    monkeypatch.setattr(corpora, "file_documents", counting_reader)

    def build(**kw):
        tok = kw.pop("tok", sentence_tokenizer)
        args = {"sentence_filter": SentenceFilter(), "max_length": 16, "tokenize_fn": fn}
        return build_corpus(src, tok, cache, **(args | kw))

    with caplog.at_level(logging.INFO, logger="meta_mask.data.corpora"):
        first = build()
    assert not first.from_cache and calls["sentences"] == len(SENTENCES)
    assert f"built {len(SENTENCES)} sentences, {first.stats['tokens']} tokens" in caplog.text
    again = build()
    assert again.from_cache and calls["sentences"] == len(SENTENCES)  # nothing re-tokenized
    assert reads["n"] == 1  # nor re-read
    assert again.fingerprint == first.fingerprint
    assert again.dataset["input_ids"] == first.dataset["input_ids"]
    assert again.stats == first.stats

    # Every setting is part of the key: each change rebuilds (and re-tokenizes).
    seen = {first.fingerprint}
    for kw in (
        {"max_length": 12},
        {"sentence_filter": SentenceFilter(min_words=8)},
        {"max_sentences": 4},
        {"tok": word_tokenizer(SENTENCES + ["extra words make another vocabulary"])},
    ):
        before = calls["sentences"]
        c = build(**kw)
        assert not c.from_cache and calls["sentences"] > before, kw
        assert c.fingerprint not in seen
        seen.add(c.fingerprint)
    assert len(build(max_sentences=4).dataset) == 4
    # Sentences are cached apart from tokens: a new max_length or tokenizer re-tokenizes the
    # cached sentences without reading the source again; a new filter or limit re-reads.
    assert reads["n"] == 1 + 2

    # A changed source file is a changed source.
    corpus_file.write_text("\n".join(SENTENCES[:5]) + "\n")
    os.utime(corpus_file, ns=(1, 1))
    changed = build()
    assert not changed.from_cache and len(changed.dataset) == 5


def test_tokenizer_fingerprint_depends_on_content_not_object(sentence_tokenizer):
    same = word_tokenizer(SENTENCES)
    other = word_tokenizer(SENTENCES[:3])
    assert tokenizer_fingerprint(same) == tokenizer_fingerprint(sentence_tokenizer)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(sentence_tokenizer)


def test_build_from_local_wikipedia_parquet(tmp_path, sentence_tokenizer):
    path = tmp_path / "wiki.parquet"
    write_wiki_parquet(path, [" ".join(SENTENCES[:5]), "Heading\n" + " ".join(SENTENCES[5:])])
    src = CorpusSource.from_spec(str(tmp_path / "wik*.parquet"))
    corpus = build_corpus(
        src, sentence_tokenizer, tmp_path / "cache", max_sentences=7, max_length=32
    )
    assert corpus.dataset["text"] == SENTENCES[:7]  # "Heading" is filtered out by length
    assert corpus.dataset["doc_id"] == ["100"] * 5 + ["101"] * 2
    assert corpus.stats["counts"]["too_few_chars"] == 1
    with pytest.raises(FileNotFoundError, match="matches no file"):
        build_corpus(
            CorpusSource.from_spec(str(tmp_path / "none-*.parquet")), sentence_tokenizer, tmp_path
        )


def test_multiprocess_build_reloads_from_its_shards(tmp_path, sentence_tokenizer):
    src = CorpusSource(kind="records", records=world_like_records(), name="mp")
    kw = {"sentence_filter": SentenceFilter(min_words=1), "max_length": 16, "num_proc": 2}
    built = build_corpus(src, sentence_tokenizer, tmp_path, **kw)
    assert len(built.files) == 2 and all(f.exists() for f in built.files)
    fn, calls = counting(tokenize_sentences)
    again = build_corpus(src, sentence_tokenizer, tmp_path, tokenize_fn=fn, **kw)
    assert again.from_cache and calls["sentences"] == 0
    assert again.dataset["input_ids"] == built.dataset["input_ids"]
    single = build_corpus(src, sentence_tokenizer, tmp_path / "one", **(kw | {"num_proc": None}))
    assert single.dataset["input_ids"] == built.dataset["input_ids"]
    assert single.fingerprint == built.fingerprint  # num_proc changes how, not what


def test_build_corpus_surfaces_the_readers_own_errors(tmp_path, sentence_tokenizer, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "A fine first sentence here."}) + "\n{oops\n")
    with pytest.raises(ValueError, match=rf"{bad}:2: malformed JSON"):
        build_corpus(CorpusSource.from_spec(str(bad)), sentence_tokenizer, tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="data_files="):
        build_corpus(CorpusSource.from_spec("wikipedia"), sentence_tokenizer, tmp_path / "cache")
    # A failed build leaves no cache entry behind: after fixing the file it builds.
    bad.write_text(json.dumps({"text": "A fine first sentence here."}) + "\n")
    fixed = build_corpus(CorpusSource.from_spec(str(bad)), sentence_tokenizer, tmp_path / "cache")
    assert fixed.dataset["text"] == ["A fine first sentence here."]


def test_world_sentences_as_a_records_corpus(tmp_path):
    from meta_mask.config import WorldConfig
    from meta_mask.data.world import build_world
    from meta_mask.data.world_tokenizer import world_tokenizer

    world = build_world(WorldConfig(num_people=6))
    tok = world_tokenizer(world)
    corpus = world_corpus(world, tmp_path, tok, sentence_filter=SentenceFilter(min_words=1))
    assert len(corpus) == len(world.sentences) and corpus.stats["truncated"] == 0
    for row, rec in zip(corpus.dataset, world.sentences, strict=True):
        types = [t for *_, t in rec["entities"]]
        assert row["entity_types"] == types  # the attribute of each gold span survives
        for (s, e), (cs, ce, *_) in zip(row["entity_spans"], rec["entities"], strict=True):
            assert tok.decode(row["input_ids"][s:e]) == rec["text"][cs:ce]


def test_ner_annotation_of_real_text_is_cached_with_the_corpus(tmp_path):
    """Salient spans on real text: spaCy's real pipeline annotates sentences without gold spans."""
    path = tmp_path / "bios.txt"
    text = (
        "Barack Obama was born in Hawaii on August 4, 1961.\n"
        "Marie Curie worked in Paris for many years of her life.\n"
    )
    path.write_text(text)
    tok = word_tokenizer(text.split("\n"))
    source = corpora.CorpusSource(kind="file", path=str(path))
    plain = corpora.build_corpus(source, tok, tmp_path / "cache", max_length=32)
    assert all(len(s) == 0 for s in plain.dataset["entity_spans"])
    ner = corpora.build_corpus(
        source, tok, tmp_path / "cache", max_length=32, ner_labels=("PERSON", "GPE", "DATE")
    )
    assert ner.fingerprint != plain.fingerprint and not ner.from_cache
    found = {}
    for row in ner.dataset:
        for (a, b), label in zip(row["entity_spans"], row["entity_labels"], strict=True):
            found[tok.decode(row["input_ids"][a:b]).strip()] = label
    assert found.get("Barack Obama") == "PERSON"
    assert found.get("Hawaii") == "GPE"
    assert found.get("Paris") == "GPE"
    assert any(label == "DATE" and "1961" in t for t, label in found.items())
    again = corpora.build_corpus(
        source, tok, tmp_path / "cache", max_length=32, ner_labels=("PERSON", "GPE", "DATE")
    )
    assert again.from_cache and again.fingerprint == ner.fingerprint
