"""Tests for meta_mask.data.contexts: answer matching and (context, question, answer) triples."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from meta_mask.config import WorldConfig
from meta_mask.data.contexts import (
    AnswerIndex,
    add_token_spans,
    context_triples,
    corpus_triples,
    find_answer_spans,
    merge_spans,
    policy_triples,
)
from meta_mask.data.tasks import Example, example_from_dict
from meta_mask.data.world import build_world, world_task
from tests.data.tokenizer_helpers import word_tokenizer


def ex(question: str, *answers: str, contexts=(), id_: str = "q") -> Example:
    return Example(source=question, targets=list(answers), id=id_, contexts=list(contexts))


def spans_of(index: AnswerIndex, text: str) -> list[tuple]:
    return [(m.key, text[m.start : m.end]) for m in index.find(text)]


# ------------------------------------------------------------------------------------------
# Matching


def test_word_boundaries_case_and_multiple_occurrences():
    index = AnswerIndex([("paris", "Paris")])
    text = "PARIS is big; the Parisian cafe near paris, and Paris's river, not Parisx."
    got = index.find(text)
    assert [text[m.start : m.end] for m in got] == ["PARIS", "paris", "Paris"]
    assert [m.start for m in got] == [0, 37, 48]
    assert index.find("Parisian Comparison") == []


def test_aliases_multiword_and_surface_form():
    index = AnswerIndex(
        [("nyc", "New York City"), ("nyc", "NYC"), ("ny", "New York"), ("att", "AT&T")]
    )
    text = "In new  york city (NYC) the New York office of AT&T, not AT & T, opened."
    got = spans_of(index, text)
    assert ("nyc", "new  york city") in got  # whitespace runs match a single space
    assert ("nyc", "NYC") in got
    assert ("ny", "new  york") in got and ("ny", "New York") in got
    assert ("att", "AT&T") in got
    assert not any(s == "AT & T" for _, s in got)  # symbols must be written the same way
    assert ("nyc", "New York") not in got


def test_stopword_and_short_answers_are_not_indexed():
    index = AnswerIndex([(0, "The"), (1, "a"), (2, "X"), (3, "The Who")], min_chars=2)
    assert index.num_aliases == 1
    assert spans_of(index, "The band The Who played a set at X.") == [(3, "The Who")]


def test_matches_equal_a_regex_reference_on_random_text():
    rng = random.Random(0)
    vocab = ["red", "Red", "fox", "FOX", "run", "runs", "big", "bigger", "sky", "o'neil", "u.s."]
    aliases = sorted({" ".join(rng.choices(vocab, k=rng.randint(1, 3))) for _ in range(40)})
    index = AnswerIndex(enumerate(aliases))
    total = 0
    for _ in range(200):
        text = " ".join(rng.choices(vocab, k=rng.randint(1, 12))) + rng.choice([".", "!", ""])
        got = sorted((m.key, m.start, m.end) for m in index.find(text))
        ref = []
        for key, alias in enumerate(aliases):
            # Lookahead finds overlapping occurrences; (?<!\w)/(?!\w) are word boundaries that
            # also hold for aliases that end in a symbol ("u.s.").
            pat = re.compile(rf"(?=(?<!\w)({re.escape(alias)})(?!\w))", re.IGNORECASE)
            ref += [(key, m.start(1), m.end(1)) for m in pat.finditer(text)]
        assert got == sorted(ref), text
        total += len(got)
    assert total > 100  # the comparison is not vacuous


def test_merge_and_find_answer_spans():
    assert merge_spans([(5, 9), (0, 13), (20, 25), (22, 24), (20, 25)]) == [(0, 13), (20, 25)]
    text = "New York City is not York."
    assert find_answer_spans(text, ["York", "New York City"]) == [(0, 13), (21, 25)]
    assert find_answer_spans(text, ["Boston"]) == []


# ------------------------------------------------------------------------------------------
# Triples from task contexts


def test_context_triples_given_spans_searched_spans_and_sentence_cuts():
    passage = "Alice Moreau was born in Lyon. She later moved to Paris. Lyon is on the Rhone."
    lyon2 = passage.rindex("Lyon")
    examples = [
        ex(
            "Where was Alice born?",
            "Lyon",
            contexts=[{"text": passage, "answer_spans": [(25, 29), (lyon2, lyon2 + 4)]}],
            id_="a",
        ),
        ex(
            "Where did Alice move?",
            "paris",
            contexts=[
                {"text": passage, "answer_spans": []},
                {"text": "Nothing here.", "answer_spans": []},
            ],
            id_="b",
        ),
    ]
    triples = list(context_triples(examples))
    assert [(t["example_id"], t["text"]) for t in triples] == [
        ("a", "Alice Moreau was born in Lyon."),
        ("a", "Lyon is on the Rhone."),
        ("b", "She later moved to Paris."),
    ]
    for t in triples:
        assert [t["text"][s:e].casefold() for s, e in t["answer_spans"]] == [t["answer"].casefold()]
        assert t["origin"] == "context"
    assert triples[0]["question"] == "Where was Alice born?"
    whole = list(context_triples(examples[:1], sentence_level=False))
    assert len(whole) == 1 and whole[0]["text"] == passage
    assert whole[0]["answer_spans"] == [(25, 29), (lyon2, lyon2 + 4)]


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(num_people=12))


def test_world_contexts_and_corpus_search_agree(world):
    rows = world_task(world, "world_qa")["train"]
    examples = [example_from_dict(r, f"train-{i}") for i, r in enumerate(rows)]
    from_contexts = list(context_triples(examples))
    assert len(from_contexts) == sum(len(e.contexts) for e in examples)
    for t in from_contexts:
        assert [t["text"][s:e] for s, e in t["answer_spans"]] == [t["answer"]]

    from_corpus = list(corpus_triples([s["text"] for s in world.sentences], examples))
    by_question: dict[str, set[str]] = {}
    for t in from_corpus:
        assert all(t["text"][s:e] == t["answer"] for s, e in t["answer_spans"])
        assert world.sentences[t["sentence_index"]]["text"] == t["text"]
        by_question.setdefault(t["example_id"], set()).add(t["text"])
    # Every sentence the world says states the answer is found by the corpus search.
    for e in examples:
        assert {c["text"] for c in e.contexts} <= by_question[e.id]


def test_world_summary_contexts_are_cut_into_sentences(world):
    rows = world_task(world, "world_summary")["train"][:3]
    examples = [example_from_dict(r, f"s-{i}") for i, r in enumerate(rows)]
    triples = list(context_triples(examples))
    persons = {p.id: p for p in world.people}
    assert all(len(r["contexts"][0]["answer_spans"]) >= 1 for r in rows)
    for t in triples:
        pid = next(
            r["person_id"] for r, e in zip(rows, examples, strict=True) if e.id == t["example_id"]
        )
        values = {persons[pid].attributes[a] for a in world.config.summary_attributes}
        assert all(t["text"][s:e] in values for s, e in t["answer_spans"])
        assert t["text"].endswith(".") and t["text"].count(". ") == 0  # one sentence
    assert len(triples) == sum(len(r["contexts"][0]["answer_spans"]) for r in rows)


# ------------------------------------------------------------------------------------------
# Triples from corpus sentences


SENTENCES = [
    "Paris is the capital of France.",
    "The Parisian metro is old.",
    "Victor Hugo lived in PARIS and in Guernsey.",
    "Marie Curie was born in Warsaw.",
    "The Eiffel Tower is in Paris, France.",
]


def test_corpus_triples_hand_made():
    examples = [
        ex("Capital of France?", "Paris", id_="cap"),
        ex("Where was Curie born?", "Warsaw", "Warszawa", id_="curie"),
        ex("Which country is Paris in?", "France", "French Republic", id_="fr"),
        ex("Unmatched?", "Berlin", id_="none"),
    ]
    triples = list(corpus_triples(({"text": s} for s in SENTENCES), examples))
    got = [
        (t["sentence_index"], t["example_id"], [t["text"][s:e] for s, e in t["answer_spans"]])
        for t in triples
    ]
    assert got == [
        (0, "cap", ["Paris"]),
        (0, "fr", ["France"]),
        (2, "cap", ["PARIS"]),
        (3, "curie", ["Warsaw"]),
        (4, "cap", ["Paris"]),
        (4, "fr", ["France"]),
    ]
    assert triples[3]["answers"] == ["Warsaw", "Warszawa"] and triples[3]["origin"] == "corpus"

    capped = list(corpus_triples(SENTENCES, examples, max_sentences_per_question=1))
    assert [(t["sentence_index"], t["example_id"]) for t in capped] == [
        (0, "cap"),
        (0, "fr"),
        (3, "curie"),
    ]
    one = list(corpus_triples(SENTENCES, examples, max_questions_per_sentence=1))
    assert [(t["sentence_index"], t["example_id"]) for t in one] == [
        (0, "cap"),
        (2, "cap"),
        (3, "curie"),
        (4, "cap"),
    ]


def test_shared_answers_give_one_triple_per_question():
    examples = [ex("q1", "Paris", id_="1"), ex("q2", "paris", id_="2")]
    triples = list(corpus_triples(["Paris and Paris again."], examples))
    assert [t["example_id"] for t in triples] == ["1", "2"]
    assert all(t["answer_spans"] == [(0, 5), (10, 15)] for t in triples)


# ------------------------------------------------------------------------------------------
# Token spans


def test_add_token_spans_marks_answer_tokens():
    tokenizer = word_tokenizer(SENTENCES)
    examples = [ex("Where is the tower?", "Paris, France", "Paris", id_="t")]
    triples = list(corpus_triples(SENTENCES, examples))
    out = add_token_spans(triples, tokenizer)
    assert [t["sentence_index"] for t in out] == [0, 2, 4]
    for t in out:
        ids = t["input_ids"]
        assert ids[0] == 0 and ids[-1] == 2
        for (s, e), (cs, ce) in zip(
            t["answer_token_spans"].tolist(), t["answer_spans"], strict=True
        ):
            assert tokenizer.decode(ids[s:e]).replace(" ,", ",") == t["text"][cs:ce]
        expected = np.zeros(len(ids), np.int32)
        for s, e in t["answer_token_spans"]:
            expected[s:e] = 1
        np.testing.assert_array_equal(t["answer_labels"], expected)
    # "Paris, France" (longest) wins over the overlapping "Paris" in the last sentence.
    assert out[2]["answer_token_spans"].tolist() == [[6, 9]]
    # An answer past max_length is cut off: the triple has no positives and is dropped.
    assert [t["sentence_index"] for t in add_token_spans(triples, tokenizer, max_length=4)] == [0]


def test_policy_triples_merge_contexts_and_corpus_without_duplicates():
    tokenizer = word_tokenizer(SENTENCES + ["Curie left Warsaw in 1891."])
    examples = [
        ex(
            "Where was Curie born?",
            "Warsaw",
            contexts=[{"text": "Curie left Warsaw in 1891.", "answer_spans": [(11, 17)]}],
            id_="curie",
        )
    ]
    corpus = SENTENCES + ["Curie left Warsaw in 1891."]
    triples = policy_triples(examples, corpus_sentences=corpus, tokenizer=tokenizer)
    assert [(t["origin"], t["text"]) for t in triples] == [
        ("context", "Curie left Warsaw in 1891."),
        ("corpus", "Marie Curie was born in Warsaw."),
    ]
    assert all(t["answer_labels"].sum() == 1 for t in triples)
    assert len(policy_triples(examples)) == 1


def test_question_entities_join_the_answer_spans_only_when_asked_for():
    text = "Ada Lovelace was born in London. Ada Lovelace met Babbage."
    entities = [
        (0, 12, "PERSON", "name"),
        (25, 31, "GPE", ""),
        (33, 45, "PERSON", "name"),
        (50, 57, "PERSON", ""),
    ]
    examples = [
        ex(
            "Where was ada lovelace born?",
            "London",
            contexts=[{"text": text, "entities": entities}],
        )
    ]
    plain = policy_triples(examples, sentence_level=False)
    assert plain[0]["answer_spans"] == [(25, 31)]
    named = policy_triples(examples, sentence_level=False, question_entities=True)
    # Both mentions of the person asked about (case-insensitive), not the other person.
    assert named[0]["answer_spans"] == [(0, 12), (25, 31), (33, 45)]
    assert [named[0]["text"][s:e] for s, e in named[0]["answer_spans"]] == [
        "Ada Lovelace",
        "London",
        "Ada Lovelace",
    ]


def test_merge_contexts_labels_every_question_about_a_text_in_one_triple():
    text = "Ada Lovelace was born in London. Ada Lovelace works for Acme."
    other = "Alan Turing works for Bletchley."
    examples = [
        ex("Where was Ada Lovelace born?", "London", contexts=[{"text": text}], id_="1"),
        ex("Who employs Ada Lovelace?", "Acme", contexts=[{"text": text}], id_="2"),
        ex("Who employs Alan Turing?", "Bletchley", contexts=[{"text": other}], id_="3"),
    ]
    separate = policy_triples(examples, sentence_level=False)
    # One triple per question: London is a target in the first and a negative in the second.
    assert [t["answer_spans"] for t in separate] == [[(25, 31)], [(56, 60)], [(22, 31)]]
    merged = policy_triples(examples, sentence_level=False, merge_contexts=True)
    assert [t["text"] for t in merged] == [text, other]
    assert merged[0]["answer_spans"] == [(25, 31), (56, 60)]
    assert merged[0]["answers"] == ["London", "Acme"]
    assert merged[0]["example_id"] == "1" and merged[1] == separate[2]


def test_question_entity_tokens_are_labelled_2_and_survive_merging():
    text = "Ada Lovelace was born in London. Ada Lovelace works for Acme."
    entities = [(0, 12, "PERSON", "name"), (33, 45, "PERSON", "name")]
    context = [{"text": text, "entities": entities}]
    examples = [
        ex("Where was Ada Lovelace born?", "London", contexts=context, id_="1"),
        ex("Who employs Ada Lovelace?", "Acme", contexts=context, id_="2"),
    ]
    tokenizer = word_tokenizer([text])
    merged = policy_triples(
        examples,
        tokenizer=tokenizer,
        sentence_level=False,
        question_entities=True,
        merge_contexts=True,
    )
    assert len(merged) == 1 and merged[0]["question_entity_spans"] == [(0, 12), (33, 45)]
    words = tokenizer.convert_ids_to_tokens(merged[0]["input_ids"].tolist())
    kinds = dict(zip(words, merged[0]["answer_labels"].tolist(), strict=False))
    assert (kinds["Ada"], kinds["Lovelace"], kinds["London"], kinds["Acme"]) == (2, 2, 1, 1)
    assert kinds["born"] == kinds["works"] == 0
    # Without question entities every target is an answer (label 1), as before.
    plain = policy_triples(examples, tokenizer=tokenizer, sentence_level=False)
    assert {int(x) for t in plain for x in t["answer_labels"]} == {0, 1}
