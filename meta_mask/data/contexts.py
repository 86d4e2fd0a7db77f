"""(context sentence, question, answer, answer spans) triples: the learned policies' training data.

The supervised policy learns to put its mask on the tokens a downstream question asks about;
the meta-learned policy optionally trains on a context before the question step. Both need
sentences paired with questions and the character (and token) spans of the answers in them.
This module makes such triples from two places:

1. `context_triples`: the contexts a task's examples carry (world contexts, TriviaQA evidence,
   KILT provenance passages), using the given `answer_spans` or, where there are none, finding
   the answers in the context; passages are cut into sentences that contain an answer.
2. `corpus_triples`: corpus sentences that mention an answer. Matching is case-insensitive, on
   word boundaries ("Paris" does not match "Parisian"), over every alias. All answers go into
   one token trie (`AnswerIndex`) and each sentence is scanned once, so the cost grows with
   the corpus length times the longest answer, not with answers x sentences.

A triple is a dict {"text", "question", "answer" (the first target), "answers" (all targets),
"answer_spans" [(start, end)] (char, half-open, sorted, non-overlapping), "example_id",
"origin" ("context" | "corpus")}, plus "sentence_index" for corpus triples (the row of the
sentence in the corpus). `add_token_spans` adds "input_ids", "word_ids",
"answer_token_spans" int32 [K, 2] (token, half-open) and "answer_labels" int32 [L] (1 on
answer tokens): the positives of the supervised policy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from meta_mask.data.sentences import sentence_spans

logger = logging.getLogger(__name__)

# Words and single non-space symbols: matching on these tokens is matching on word boundaries.
_TOKEN = re.compile(r"\w+|[^\w\s]")
# Answers that are only a function word would match nearly every sentence; they are skipped.
STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or but not no is are was were be been it "
    "its he she they we i you his her their this that these those as".split()
)


def normalize(text: str) -> str:
    """Case-folded, whitespace-collapsed text: the form answers are compared in."""
    return " ".join(text.casefold().split())


def _tokens(text: str) -> list[tuple[str, int, int]]:
    """(case-folded token, start, end) for every word / symbol token of `text`."""
    return [(m.group(0).casefold(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


class Match(NamedTuple):
    """One occurrence of an answer: its key, the char span [start, end), the alias matched."""

    key: Hashable
    start: int
    end: int
    alias: str


class AnswerIndex:
    """A trie over the word tokens of many answer strings, for one-pass matching.

    `answers` yields (key, alias) pairs; a key (e.g. an example index) may have many aliases
    and an alias may belong to many keys. `find(text)` returns every occurrence of every
    alias in `text` whose tokens match case-insensitively and whose characters match up to
    case and whitespace (so "AT & T" does not match the alias "AT&T").
    """

    _END = "\0keys"  # trie leaf marker; cannot collide with a token (tokens have no NUL)

    def __init__(self, answers: Iterable[tuple[Hashable, str]], *, min_chars: int = 1) -> None:
        self._root: dict = {}
        self.num_aliases = 0
        for key, alias in answers:
            norm = normalize(alias)
            if len(norm) < min_chars or norm in STOPWORDS:
                continue
            toks = [t for t, _, _ in _tokens(alias)]
            if not toks:
                continue
            node = self._root
            for t in toks:
                node = node.setdefault(t, {})
            forms = node.setdefault(self._END, {}).setdefault(key, set())
            if norm not in forms:
                forms.add(norm)
                self.num_aliases += 1

    def find(self, text: str) -> list[Match]:
        """Every (key, start, end, alias) occurrence in `text`, sorted by position then key."""
        toks = _tokens(text)
        out: list[Match] = []
        for i, (tok, start, _) in enumerate(toks):
            node = self._root.get(tok)
            j = i
            while node is not None:
                leaf = node.get(self._END)
                if leaf:
                    end = toks[j][2]
                    surface = normalize(text[start:end])
                    out.extend(
                        Match(key, start, end, text[start:end])
                        for key, forms in leaf.items()
                        if surface in forms
                    )
                j += 1
                node = node.get(toks[j][0]) if j < len(toks) else None
        return out


def merge_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping spans: of overlapping ones the earliest, then longest, wins.

    ("New York City" and "York" in the same place keep "New York City".)
    """
    out: list[tuple[int, int]] = []
    for s, e in sorted(set(spans), key=lambda x: (x[0], -x[1])):
        if out and s < out[-1][1]:
            continue
        out.append((s, e))
    return out


def find_answer_spans(text: str, answers: Sequence[str]) -> list[tuple[int, int]]:
    """Char spans of any of `answers` in `text` (case-insensitive, word boundaries), merged."""
    index = AnswerIndex((0, a) for a in answers)
    return merge_spans((m.start, m.end) for m in index.find(text))


def _triple(
    example: Any, text: str, spans: list[tuple[int, int]], origin: str, entities=None
) -> dict:
    triple = {
        "text": text,
        "question": example.source,
        "answer": example.targets[0],
        "answers": list(example.targets),
        "answer_spans": spans,
        "example_id": str(example.id),
        "origin": origin,
    }
    if entities:
        triple["entities"] = [tuple(e) for e in entities]
    return triple


def context_triples(
    examples: Iterable[Any], *, sentence_level: bool = True
) -> Iterator[dict[str, Any]]:
    """Triples from the contexts the examples carry (`Example.contexts`).

    A context's `answer_spans` are used when given; otherwise its answers (all targets) are
    searched for. With `sentence_level` a context is cut into sentences and each sentence
    holding a whole answer span becomes one triple (spans shifted to the sentence); otherwise
    the whole context is the triple's text. Contexts without any answer yield nothing. A
    context's gold "entities" (char spans) are kept on triples of the whole context, and
    shifted onto each sentence that holds them whole.
    """
    counts = {"contexts": 0, "without_answer": 0, "triples": 0}
    for ex in examples:
        for ctx in ex.contexts:
            counts["contexts"] += 1
            text = ctx["text"]
            given = [tuple(s) for s in ctx.get("answer_spans") or ()]
            spans = merge_spans(given) if given else find_answer_spans(text, ex.targets)
            if not spans:
                counts["without_answer"] += 1
                continue
            entities = ctx.get("entities") or ()
            if not sentence_level:
                counts["triples"] += 1
                yield _triple(ex, text, spans, "context", entities)
                continue
            for a, b in sentence_spans(text):
                inside = [(s - a, e - a) for s, e in spans if a <= s and e <= b]
                if inside:
                    counts["triples"] += 1
                    ents = [(s - a, e - a, *rest) for s, e, *rest in entities if a <= s and e <= b]
                    yield _triple(ex, text[a:b], inside, "context", ents)
    logger.info(
        "context triples: %d from %d contexts (%d contexts without an answer)",
        counts["triples"],
        counts["contexts"],
        counts["without_answer"],
    )


def corpus_triples(
    sentences: Iterable[str | dict],
    examples: Sequence[Any],
    *,
    max_sentences_per_question: int | None = None,
    max_questions_per_sentence: int | None = None,
    min_answer_chars: int = 1,
) -> Iterator[dict[str, Any]]:
    """Triples from corpus sentences that mention an example's answer (any alias).

    `sentences` are strings or records with "text" (e.g. a corpus dataset's rows); each
    triple's "sentence_index" is the sentence's position in that iterable. Output order is
    deterministic: sentences in order, then examples in order. The caps bound the output
    when many questions share an answer ("United States") or an answer is frequent.
    Answers shorter than `min_answer_chars` or that are a stopword are not searched for.
    """
    examples = list(examples)
    index = AnswerIndex(
        ((i, alias) for i, ex in enumerate(examples) for alias in ex.targets),
        min_chars=min_answer_chars,
    )
    per_question = [0] * len(examples)
    scanned = matched = produced = 0
    for row, sentence in enumerate(sentences):
        text = sentence if isinstance(sentence, str) else sentence["text"]
        scanned += 1
        hits: dict[int, list[tuple[int, int]]] = {}
        for m in index.find(text):
            hits.setdefault(m.key, []).append((m.start, m.end))
        if not hits:
            continue
        matched += 1
        emitted = 0
        for i in sorted(hits):
            if max_questions_per_sentence is not None and emitted >= max_questions_per_sentence:
                break
            if max_sentences_per_question is not None:
                if per_question[i] >= max_sentences_per_question:
                    continue
            per_question[i] += 1
            emitted += 1
            produced += 1
            triple = _triple(examples[i], text, merge_spans(hits[i]), "corpus")
            triple["sentence_index"] = row
            yield triple
    logger.info(
        "corpus triples: %d sentences scanned, %d mention an answer, %d triples, "
        "%d of %d questions covered (%d aliases indexed)",
        scanned,
        matched,
        produced,
        sum(1 for c in per_question if c),
        len(examples),
        index.num_aliases,
    )


def add_token_spans(
    triples: Sequence[dict[str, Any]], tokenizer: Any, *, max_length: int | None = None
) -> list[dict[str, Any]]:
    """Tokenize triples and map their answer char spans to token spans.

    Uses `meta_mask.data.tokenize.tokenize_sentences` (the answers passed as entities), so the
    ids are exactly those of the tokenized corpus. Triples whose answers are all cut off by
    `max_length` are dropped (logged). Adds "input_ids", "word_ids", "answer_token_spans"
    int32 [K, 2] and "answer_labels" int32 [L] (1 on tokens inside an answer span, 2 inside one
    of the triple's "question_entity_spans", 0 elsewhere); a triple
    with gold "entities" (char spans) also gets their token spans as "entity_spans" int32
    [E, 2], with "entity_labels" and "entity_types" (what policies.heuristic.collate reads).
    """
    from meta_mask.data.tokenize import tokenize_sentences  # another helper's module

    def entities(t: Mapping[str, Any]) -> list[tuple]:
        named = {tuple(span) for span in t.get("question_entity_spans", ())}
        answers = [
            (s, e, "ANSWER", "question" if (s, e) in named else "") for s, e in t["answer_spans"]
        ]
        gold = [
            (s, e, label, kind[0] if kind else "") for s, e, label, *kind in t.get("entities", ())
        ]
        return answers + gold

    records = [{"text": t["text"], "entities": entities(t)} for t in triples]
    tokenized = tokenize_sentences(records, tokenizer, max_length=max_length)
    out, dropped = [], 0
    for triple, tok in zip(triples, tokenized, strict=True):
        all_spans = np.asarray(tok["entity_spans"], np.int32).reshape(-1, 2)
        is_answer = np.asarray([lab == "ANSWER" for lab in tok["entity_labels"]], bool)
        spans = all_spans[is_answer] if len(all_spans) else all_spans
        if len(spans) == 0:
            dropped += 1
            continue
        labels = np.zeros(len(tok["input_ids"]), np.int32)
        attributes = tok.get("entity_attributes") or [""] * len(is_answer)
        target_kinds = [a for a, answer in zip(attributes, is_answer, strict=True) if answer]
        for (s, e), kind in zip(spans, target_kinds, strict=True):
            labels[s:e] = 2 if kind == "question" else 1
        extra = {}
        if triple.get("entities"):
            keep = np.flatnonzero(~is_answer)
            kinds = tok.get("entity_attributes") or [""] * len(is_answer)
            extra = {
                "entity_spans": all_spans[keep],
                "entity_labels": [tok["entity_labels"][i] for i in keep],
                "entity_types": [str(kinds[i] or "") for i in keep],
            }
        out.append(
            triple
            | {
                "input_ids": np.asarray(tok["input_ids"], np.int32),
                "word_ids": np.asarray(tok["word_ids"], np.int32),
                "answer_token_spans": spans,
                "answer_labels": labels,
                **extra,
            }
        )
    if dropped:
        logger.info("add_token_spans: dropped %d triples whose answers were truncated", dropped)
    return out


def policy_triples(
    examples: Sequence[Any],
    *,
    corpus_sentences: Iterable[str | dict] | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    sentence_level: bool = True,
    ner_labels: Sequence[str] | None = None,
    question_entities: bool = False,
    merge_contexts: bool = False,
    **corpus_kw: Any,
) -> list[dict[str, Any]]:
    """All triples for a task's examples: from their contexts, then from corpus sentences.

    A corpus triple with the same example and text as a context triple is dropped (the
    world's contexts are its corpus sentences). `corpus_kw` goes to `corpus_triples`; with a
    `tokenizer`, `add_token_spans` adds token ids, spans and labels. With `ner_labels`, triples
    without gold entities get spaCy's named entities of those labels (and dates): the entity
    units of a learned policy on real text are the spans salient-span masking uses. With
    `question_entities`, the entities the question names join the answer spans
    (`add_question_entities`). With `merge_contexts`, the triples of one text become one
    (`merge_by_text`).
    """
    triples = list(context_triples(examples, sentence_level=sentence_level))
    if corpus_sentences is not None:
        seen = {(t["example_id"], t["text"]) for t in triples}
        for t in corpus_triples(corpus_sentences, examples, **corpus_kw):
            if (t["example_id"], t["text"]) not in seen:
                seen.add((t["example_id"], t["text"]))
                triples.append(t)
    if ner_labels is not None:
        _add_ner_entities(triples, ner_labels)
    if question_entities:
        triples = [add_question_entities(t) for t in triples]
    if merge_contexts:
        triples = merge_by_text(triples)
    if tokenizer is not None:
        triples = add_token_spans(triples, tokenizer, max_length=max_length)
    return triples


def add_question_entities(triple: dict[str, Any]) -> dict[str, Any]:
    """The triple with every entity of its text that its question names (the same words, up to
    case) added to its answer spans: the context's mentions of what the question is about.
    They are also listed as "question_entity_spans" (add_token_spans labels their tokens 2)."""
    text, question = triple["text"], triple["question"]
    named = [
        (s, e)
        for s, e, *_ in triple.get("entities", ())
        if find_answer_spans(question, [text[s:e]])
    ]
    if not named:
        return triple
    return triple | {
        "answer_spans": merge_spans([*triple["answer_spans"], *named]),
        "question_entity_spans": named,
    }


def merge_by_text(triples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One triple per distinct text (in first-seen order): the first triple's fields, with the
    union of the answer spans and answers of every triple of that text. A context asked about
    twice then labels both answers in one example, instead of labelling each answer in one
    example and calling it a negative in the other."""
    merged: dict[str, dict[str, Any]] = {}
    for t in triples:
        first = merged.get(t["text"])
        if first is None:
            merged[t["text"]] = {**t, "answers": list(t["answers"])}
            continue
        first["answer_spans"] = merge_spans([*first["answer_spans"], *t["answer_spans"]])
        first["answers"] += [a for a in t["answers"] if a not in first["answers"]]
        named = [*first.get("question_entity_spans", ()), *t.get("question_entity_spans", ())]
        if named:
            first["question_entity_spans"] = merge_spans(named)
    return list(merged.values())


def _add_ner_entities(triples: list[dict[str, Any]], labels: Sequence[str]) -> None:
    from meta_mask.data import ner

    todo = [t for t in triples if not t.get("entities")]
    if not todo:
        return
    result = ner.annotate_texts([t["text"] for t in todo], nlp=ner.load_spacy(), labels=labels)
    for triple, spans in zip(todo, result.spans, strict=True):
        triple["entities"] = [(s, e, label, "ner") for s, e, label in spans]
