"""Tests of the synthetic knowledge world, its tokenizer and the span-aware tokenizer."""

import dataclasses

import numpy as np
import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from meta_mask.config import WorldConfig
from meta_mask.data.tokenize import char_to_token_span, tokenize_sentences
from meta_mask.data.world import (
    ATTRIBUTES,
    GENERIC_QA_TASK,
    QA_VARIANTS,
    SUMMARY_TASK,
    TASKS,
    WorldConfigError,
    build_world,
    world_task,
    world_texts,
)
from meta_mask.data.world_tokenizer import NUM_SENTINELS, sentinel_token, world_tokenizer
from tests.data.tokenizer_helpers import bpe_tokenizer
from tests.data.world_digest import world_digest
from tests.processes import run_module

SMALL = WorldConfig(num_people=40, num_bios=3)


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig())


@pytest.fixture(scope="module")
def tok(world):
    return world_tokenizer(world)


# --- the world -------------------------------------------------------------------------


def test_same_seed_same_world_other_seed_other_world():
    a, b = build_world(SMALL), build_world(SMALL)
    assert a.people == b.people
    assert a.sentences == b.sentences and a.documents == b.documents
    assert a.splits == b.splits
    assert world_task(a, "world_qa") == world_task(b, "world_qa")
    c = build_world(dataclasses.replace(SMALL, seed=1))
    assert [p.name for p in c.people] != [p.name for p in a.people]
    assert [s["text"] for s in c.sentences] != [s["text"] for s in a.sentences]
    assert c.splits != a.splits


def test_world_is_the_same_in_another_process_with_another_hash_seed():
    # Sets and dicts must never decide the world: a fresh interpreter with a different
    # PYTHONHASHSEED builds the identical corpus.
    digests = set()
    for seed in ("1", "2"):
        proc = run_module(
            "tests.data.world_digest", SMALL.num_people, SMALL.num_bios,
            env={"PYTHONHASHSEED": seed}, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        digests.add(proc.stdout.strip())
    assert digests == {world_digest(build_world(SMALL))}


def test_names_unique_and_distinct_from_other_person_values(world):
    names = [p.name for p in world.people]
    assert len(set(names)) == len(names) == world.config.num_people
    others = {
        p.attributes[a]
        for p in world.people
        for a in p.attributes
        if ATTRIBUTES[a].kind == "person"
    }
    assert not others & set(names)  # a question's name never names a spouse or friend
    for a in (*world.config.attributes, *world.config.distractors):  # unique_values=True
        values = [p.attributes[a] for p in world.people]
        assert len(set(values)) == len(values), a
    for p in world.people:
        for v in p.attributes.values():
            assert 1 <= len(v.split()) <= 2


def test_gold_spans_are_the_values_they_claim(world):
    for s in world.sentences:
        person = world.people[s["person_id"]]
        assert s["text"].count(person.name) >= 1  # every sentence names its person
        lo, hi = s["value_span"]
        assert s["text"][lo:hi] == person.attributes[s["attribute"]]
        claimed = {att for *_, att in s["entities"]}
        assert "name" in claimed
        # Only named-entity attributes are visible to the "NER"; hobby is not an entity.
        assert (s["attribute"] in claimed) == (ATTRIBUTES[s["attribute"]].label is not None)
        for start, end, label, att in s["entities"]:
            want = person.name if att == "name" else person.attributes[att]
            assert s["text"][start:end] == want
            assert label == ("PERSON" if att == "name" else ATTRIBUTES[att].label)
    for d in world.documents:
        person = world.people[d["person_id"]]
        assert d["text"] == " ".join(world.sentences[i]["text"] for i in d["sentence_ids"])
        for start, end, _, att in d["entities"]:
            want = person.name if att == "name" else person.attributes[att]
            assert d["text"][start:end] == want


def test_bios_are_paraphrases(world):
    cfg = world.config
    n_sent = len(cfg.attributes) + cfg.distractors_per_bio
    assert len(world.sentences) == cfg.num_people * cfg.num_bios * n_sent
    for p in world.people[:50]:
        docs = world.documents[p.id * cfg.num_bios : (p.id + 1) * cfg.num_bios]
        assert {d["person_id"] for d in docs} == {p.id}
        assert len({d["text"] for d in docs}) == cfg.num_bios
        for a in cfg.attributes:  # every bio states every asked-about attribute ...
            texts = [
                world.sentences[i]["text"]
                for d in docs
                for i in d["sentence_ids"]
                if world.sentences[i]["attribute"] == a
            ]
            assert len(texts) == cfg.num_bios
            # ... in min(bios, templates) different wordings.
            assert len(set(texts)) == min(cfg.num_bios, cfg.templates_per_attribute)
        distractors = {
            world.sentences[i]["attribute"] for d in docs for i in d["sentence_ids"]
        } - set(cfg.attributes)
        assert distractors <= set(cfg.distractors) and distractors


def test_splits_partition_people(world):
    parts = [set(world.splits[s]) for s in ("train", "dev", "test")]
    assert sum(map(len, parts)) == world.config.num_people
    assert set().union(*parts) == set(range(world.config.num_people))
    n = world.config.num_people
    assert [len(p) for p in parts] == [round(0.5 * n), round(0.1 * n), n - round(0.6 * n)]


@pytest.mark.parametrize("variant", list(QA_VARIANTS))
def test_qa_is_closed_book(world, variant):
    task = world_task(world, variant)
    test_people = set(world.splits["test"])
    seen = [ex for split in ("train", "dev") for ex in task[split]]
    seen_text = " ".join(ex["source"] + " " + " ".join(ex["targets"]) for ex in seen)
    for ex in task["test"]:
        person = world.people[ex["person_id"]]
        assert ex["person_id"] in test_people
        assert person.name not in seen_text  # the person never appears in train/dev
        for answer in ex["targets"]:
            assert answer not in seen_text  # nor does the answer: only the corpus has it
    assert {ex["person_id"] for ex in seen}.isdisjoint(test_people)
    # 2 question templates per asked attribute per person.
    n_q = world.config.question_templates * len(QA_VARIANTS[variant])
    assert len(task["test"]) == len(test_people) * n_q
    assert len({ex["source"] for ex in task["test"]}) == len(task["test"])


@pytest.mark.parametrize("variant", list(QA_VARIANTS))
def test_every_test_answer_is_in_the_corpus_with_its_person(world, variant):
    corpus = {}
    for s in world.sentences:
        corpus.setdefault(s["person_id"], []).append(s["text"])
    for ex in world_task(world, variant)["test"]:
        name, answer = world.people[ex["person_id"]].name, ex["targets"][0]
        assert any(name in t and answer in t for t in corpus[ex["person_id"]])
        assert len(ex["contexts"]) >= 2  # paraphrases of the same fact
        for ctx in ex["contexts"]:
            assert ctx["text"] in corpus[ex["person_id"]]
            (lo, hi), *_ = ctx["answer_spans"]
            assert ctx["text"][lo:hi] == answer


@pytest.mark.parametrize("variant", list(QA_VARIANTS))
def test_paraphrased_questions_share_one_fact_id(world, variant):
    facts: dict[str, list[dict]] = {}
    for split in ("train", "dev", "test"):
        for ex in world_task(world, variant)[split]:
            facts.setdefault(ex["fact"], []).append(ex)
    asked = QA_VARIANTS[variant]
    assert len(facts) == world.config.num_people * len(asked)  # one per person and attribute
    for fact, examples in facts.items():
        assert fact == f"{examples[0]['person_id']}:{examples[0]['attribute']}"
        assert len(examples) == world.config.question_templates
        assert len({ex["source"] for ex in examples}) == len(examples)  # paraphrases
        assert len({tuple(ex["targets"]) for ex in examples}) == 1  # of one answer
    summaries = world_task(world, SUMMARY_TASK)["test"]
    assert {ex["fact"] for ex in summaries} == {f"{p}:summary" for p in world.splits["test"]}


def test_variants_ask_disjoint_attributes_and_never_distractors(world):
    asked = [set(attrs) for attrs in QA_VARIANTS.values()]
    assert len(asked) >= 3
    for i in range(len(asked)):
        for j in range(i + 1, len(asked)):
            assert asked[i].isdisjoint(asked[j])
    for variant in QA_VARIANTS:
        got = {ex["attribute"] for ex in world_task(world, variant)["train"]}
        assert got == set(QA_VARIANTS[variant])
        assert got.isdisjoint(world.config.distractors)


def test_summary_facts_are_in_its_source(world):
    task = world_task(world, SUMMARY_TASK)
    assert set(task) == {"train", "dev", "test"}
    for ex in task["test"][:40]:
        person = world.people[ex["person_id"]]
        target = ex["targets"][0]
        want = f"{person.name}, born in {person.attributes['birth_city']}, "
        want += f"works for {person.attributes['employer']}."
        assert target == want
        for a in world.config.summary_attributes:
            assert person.attributes[a] in ex["source"]
        ctx = ex["contexts"][0]
        assert sorted(ctx["text"][lo:hi] for lo, hi in ctx["answer_spans"]) == sorted(
            [person.attributes[a] for a in world.config.summary_attributes]
        )


def test_config_errors_name_the_field():
    with pytest.raises(WorldConfigError, match="attributes.*'birth_town'"):
        build_world(WorldConfig(attributes=("birth_town",)))
    with pytest.raises(ValueError, match="place_words"):
        build_world(WorldConfig(num_people=500, place_words=10))
    with pytest.raises(ValueError, match="'birth_date' needs 1300 distinct values"):
        build_world(WorldConfig(num_people=1300, first_names=200, place_words=200, org_words=400))
    with pytest.raises(ValueError, match="first_names"):
        build_world(WorldConfig(first_names=10**6))
    with pytest.raises(ValueError, match="distractors_per_bio"):
        WorldConfig(distractors_per_bio=9)
    w = build_world(dataclasses.replace(SMALL, attributes=("birth_city", "employer")))
    assert w.available_tasks() == ("world_qa", SUMMARY_TASK)
    with pytest.raises(WorldConfigError, match="world_qa_dates.*birth_date"):
        world_task(w, "world_qa_dates")
    with pytest.raises(ValueError, match="valid"):
        world_task(w, "nq")


def test_size_knobs_scale_the_corpus():
    base = build_world(SMALL)
    per_bio = len(SMALL.attributes) + SMALL.distractors_per_bio
    assert len(base.sentences) == 40 * 3 * per_bio
    more_bios = build_world(dataclasses.replace(SMALL, num_bios=6))
    assert len(more_bios.sentences) == 2 * len(base.sentences)
    assert more_bios.people == base.people  # other knobs leave the people alone
    more_people = build_world(dataclasses.replace(SMALL, num_people=80))
    assert len(more_people.sentences) == 2 * len(base.sentences)
    fewer = build_world(dataclasses.replace(SMALL, distractors_per_bio=0))
    assert len(fewer.sentences) == 40 * 3 * len(SMALL.attributes)
    one_t = build_world(dataclasses.replace(SMALL, templates_per_attribute=1))
    assert len({s["text"] for s in one_t.sentences}) < len({s["text"] for s in base.sentences})
    shared = build_world(dataclasses.replace(SMALL, unique_values=False, place_words=2))
    assert len({p.attributes["birth_city"] for p in shared.people}) <= 2 * 8


def test_default_world_sizes():
    """The default world's documented size (build time is reported, not asserted: timings
    belong in benchmarks)."""
    cfg = WorldConfig()
    w = build_world(cfg)
    per_bio = len(cfg.attributes) + cfg.distractors_per_bio
    assert len(w.documents) == cfg.num_people * cfg.num_bios
    assert len(w.sentences) == cfg.num_people * cfg.num_bios * per_bio
    tok = world_tokenizer(w)
    assert 500 < len(tok) < 1000


# --- the tokenizer ---------------------------------------------------------------------


def test_special_and_sentinel_ids(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token == "<mask>" and tok.mask_token_id == 4
    ids = tok.convert_tokens_to_ids([sentinel_token(i) for i in range(NUM_SENTINELS)])
    assert ids == list(range(5, 5 + NUM_SENTINELS))
    text = f"Where {sentinel_token(0)} born {tok.mask_token} {sentinel_token(99)}?"
    enc = tok(text)
    assert enc.tokens() == ["<s>", "Where", "<extra_id_0>", "born", "<mask>", "<extra_id_99>"] + [
        "?",
        "</s>",
    ]
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "Where born?"
    with pytest.raises(ValueError):
        sentinel_token(NUM_SENTINELS)


def test_tokenizer_round_trips_all_world_text_without_unk(world, tok):
    texts = sorted(set(world_texts(world)))
    enc = tok(texts)
    for text, ids in zip(texts, enc["input_ids"], strict=True):
        assert ids[0] == 0 and ids[-1] == 2
        assert 3 not in ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text
    # Word level: each whitespace/punctuation-separated word is one token.
    s = world.sentences[0]["text"]
    assert len(tok(s)["input_ids"]) == len(s.replace(".", " .").split()) + 2


def test_tokenizer_is_deterministic_and_seed_dependent(tok):
    again = world_tokenizer(build_world(WorldConfig()))
    assert again.get_vocab() == tok.get_vocab()
    other = world_tokenizer(build_world(WorldConfig(seed=3)))
    assert other.get_vocab() != tok.get_vocab()
    assert len(tok) < 1000  # a small vocabulary: tiny models stay tiny


def test_offsets_and_word_ids(world, tok):
    s = world.sentences[0]["text"]
    enc = tok(s, return_offsets_mapping=True)
    words = enc.word_ids()
    assert words[0] is None and words[-1] is None
    assert words[1:-1] == list(range(len(enc["input_ids"]) - 2))
    for (lo, hi), token in zip(enc["offset_mapping"][1:-1], enc.tokens()[1:-1], strict=True):
        assert s[lo:hi] == token


def test_save_and_load_like_any_tokenizer(tok, tmp_path, world):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.mask_token_id, loaded.pad_token_id) == (4, 1)
    texts = [s["text"] for s in world.sentences[:20]] + [f"a {sentinel_token(7)} b"]
    assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]


# --- tokenize_sentences ----------------------------------------------------------------


def test_token_spans_line_up_with_char_spans(world, tok):
    records = world.sentences[:500]
    out = tokenize_sentences(records, tok)
    assert len(out) == len(records)
    for rec, t in zip(records, out, strict=True):
        assert t["input_ids"].dtype == np.int32 and t["word_ids"].dtype == np.int32
        assert t["input_ids"][0] == 0 and t["input_ids"][-1] == 2
        assert t["word_ids"][0] == -1 and t["word_ids"][-1] == -1
        assert t["entity_spans"].shape == (len(rec["entities"]), 2)
        assert t["entity_labels"] == [e[2] for e in rec["entities"]]
        assert t["entity_attributes"] == [e[3] for e in rec["entities"]]
        for (lo, hi), (cs, ce, *_) in zip(t["entity_spans"], rec["entities"], strict=True):
            want = tok(rec["text"][cs:ce], add_special_tokens=False)["input_ids"]
            assert t["input_ids"][lo:hi].tolist() == want


def _tiny_bpe():
    """A BPE tokenizer that splits unseen words into pieces, to test span alignment."""
    return bpe_tokenizer(
        ["the cat sat on the mat"] * 5,
        vocab_size=40,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        pre_tokenizer=pre_tokenizers.Whitespace(),
    )


def test_spans_grow_to_cover_subword_tokens_and_truncation_drops_cut_entities():
    tok = _tiny_bpe()
    text = "the tomcat sat on the mat"
    # Tokens: <s> the t o m cat sat on the mat </s>  (tomcat is unseen: 4 pieces)
    assert tok(text).tokens() == ["<s>", "the", "t", "o", "m", "cat", "sat", "on", "the"] + [
        "mat",
        "</s>",
    ]
    ents = [(4, 10, "ANIMAL"), (6, 8, "PART"), (11, 21, "PHRASE"), (22, 25, "THING")]
    (full,) = tokenize_sentences([{"text": text, "entities": ents}], tok)
    # "mc" cuts the token "cat", so its span grows to cover m + cat.
    assert full["entity_spans"].tolist() == [[2, 6], [4, 6], [6, 9], [9, 10]]
    assert full["entity_labels"] == ["ANIMAL", "PART", "PHRASE", "THING"]
    assert full["entity_attributes"] == [None] * 4
    assert full["word_ids"].tolist() == [-1, 0, 1, 1, 1, 1, 2, 3, 4, 5, -1]
    (cut,) = tokenize_sentences([{"text": text, "entities": ents}], tok, max_length=9)
    assert cut["input_ids"].tolist()[-2:] == [tok.convert_tokens_to_ids("on"), 2]
    # "sat on the" lost "the" and "mat" is gone: half an entity is dropped too.
    assert cut["entity_labels"] == ["ANIMAL", "PART"]
    (none,) = tokenize_sentences([{"text": text}], tok)
    assert none["entity_spans"].shape == (0, 2) and none["entity_labels"] == []


def test_char_to_token_span_by_hand():
    offsets = [(0, 0), (0, 3), (3, 5), (6, 9), (0, 0)]
    special = [True, False, False, False, True]
    assert char_to_token_span(offsets, special, 0, 5) == (1, 3)
    assert char_to_token_span(offsets, special, 4, 7) == (2, 4)
    assert char_to_token_span(offsets, special, 6, 9) == (3, 4)
    assert char_to_token_span(offsets, special, 10, 12) is None
    assert char_to_token_span(offsets, special, 5, 6) is None  # the space between words


def test_every_task_is_listed_and_registered(world):
    from meta_mask.data import tasks

    assert set(TASKS) == {*QA_VARIANTS, SUMMARY_TASK, GENERIC_QA_TASK}
    assert set(TASKS) <= set(tasks.TASKS)
    assert tasks.get_task(SUMMARY_TASK).metric == "rouge"
    data = tasks.read_task("world_qa", "test", world=world)
    want = world_task(world, "world_qa")["test"]
    assert [(e.source, e.targets) for e in data.examples] == [
        (r["source"], r["targets"]) for r in want
    ]
    assert data.examples[0].meta["person_id"] == want[0]["person_id"]


V2 = WorldConfig(
    num_people=40,
    generic_people=10,
    num_bios=2,
    split_fractions=(0.4, 0.2, 0.4),
    corpus_unit="passage",
)


def test_generic_population_is_never_in_the_task_corpus_and_never_asked():
    world = build_world(V2)
    generic = set(world.splits["generic"])
    assert len(generic) == 10 and sum(len(world.splits[s]) for s in ("train", "dev", "test")) == 30
    assert not generic & {p for s in ("train", "dev", "test") for p in world.splits[s]}
    task_rows, generic_rows = world.corpus_records("task"), world.corpus_records("generic")
    assert {r["person_id"] for r in task_rows}.isdisjoint(generic)
    assert {r["person_id"] for r in generic_rows} == generic
    for variant in QA_VARIANTS:
        for rows in world_task(world, variant).values():
            assert not {r["person_id"] for r in rows} & generic
    generic_qa = world_task(world, GENERIC_QA_TASK)
    assert set(generic_qa) == {"train"}
    assert {r["person_id"] for r in generic_qa["train"]} == generic
    # Every attribute with questions is asked about the generic population.
    assert {r["attribute"] for r in generic_qa["train"]} == set(V2.attributes)


def test_passages_are_whole_biographies_with_typed_gold_entities():
    world = build_world(V2)
    rows = world.corpus_records("task")
    assert len(rows) == 30 * V2.num_bios
    for row in rows[:6]:
        doc = world.documents[row["doc_id"]]
        assert row["text"] == doc["text"]
        kinds = {e[3] for e in row["entities"]}
        entity_attributes = {a for a in V2.attributes if ATTRIBUTES[a].label}  # not hobbies
        assert "name" in kinds and entity_attributes <= kinds
        for start, end, _, kind in row["entities"]:
            if kind != "name":
                assert row["text"][start:end] == world.people[row["person_id"]].attributes[kind]
    # QA contexts are the person's biographies, with the answer's span and the gold entities.
    ex = world_task(world, "world_qa")["test"][0]
    assert len(ex["contexts"]) == V2.num_bios
    for ctx in ex["contexts"]:
        ((start, end),) = ctx["answer_spans"]
        assert ctx["text"][start:end] == ex["targets"][0]
        assert any(e[3] == ex["attribute"] for e in ctx["entities"])


def test_without_a_generic_population_the_sentence_world_is_unchanged():
    # The sentence world (experiments/world_sentences.flags) keeps its people, split and corpus.
    world = build_world(SMALL)
    assert world.splits["generic"] == ()
    assert world.corpus_records("task") == [dict(s) for s in world.sentences]
    assert GENERIC_QA_TASK not in world.available_tasks()
    with pytest.raises(WorldConfigError, match="generic_people"):
        world_task(world, GENERIC_QA_TASK)
