"""Heuristic masking policies, each a scorer (see policies/sampler.py for the contract).

Owns: padding tokenized sentence records into a host batch (`collate`), the scorers
- `NoMask`          the "no intermediate pre-training" baseline: masks nothing;
- `RandomTokens`    every maskable token is its own unit (BERT);
- `RandomSpans`     the sentence is cut into consecutive spans whose lengths (in words or
                    tokens) follow SpanBERT's clipped geometric or BART's Poisson; spans are units;
- `WholeWords`      every word is a unit;
- `SalientSpans`    named entities and dates (the records' "entity_spans") are units (REALM /
                    T5 closed-book QA); with the budget num_units=1 this is REALM's one salient
                    span per sentence, with mask_rate the rate-based variant;
- `PmiNgrams`       the corpus's top PMI n-grams (found once per corpus row, data/pmi.py) are
                    units, every other word is a unit of its own (PMI-Masking);
and `make_scorer(PolicyConfig)`, and `corpus_scorer(PolicyConfig, Corpus)`: the scorer a run
builds for its corpus.

Heuristic scores are all zero (uniform over units; the sampler's Gumbel noise does the drawing)
except `SalientSpans(fill_with_words=True)`, whose filler words score FILL_SCORE so that every
entity is taken before any filler word. Unit ids are the position of the unit's first token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from meta_mask.batches import PolicyBatch
from meta_mask.config import PolicyConfig
from meta_mask.data.pmi import CorpusPmi, corpus_pmi
from meta_mask.errors import UserError
from meta_mask.policies.sampler import STREAM_SCORER, BatchRng, Scorer
from meta_mask.special_tokens import SpecialTokens

if TYPE_CHECKING:
    from meta_mask.data.corpora import Corpus

FILL_SCORE = -1e4  # far below any Gumbel draw: filler units come strictly after real ones


def _spans_array(records: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """[B, E, 2] int32 spans padded with -1."""
    spans = [np.asarray(r.get(key, np.zeros((0, 2))), np.int32).reshape(-1, 2) for r in records]
    out = np.full((len(records), max([len(s) for s in spans] + [1]), 2), -1, np.int32)
    for i, s in enumerate(spans):
        out[i, : len(s)] = s
    return out


def collate(
    records: Sequence[Mapping[str, Any]],
    length: int | None = None,
    *,
    special: SpecialTokens,
    example_ids: Sequence[int] | None = None,
) -> PolicyBatch:
    """Pad tokenized sentence records ("input_ids", "word_ids", optional "entity_spans" and
    "entity_labels") into a batches.PolicyBatch for scorers, the sampler and corrupt; example
    ids default to the records' positions."""
    lengths = [len(r["input_ids"]) for r in records]
    length = max(lengths) if length is None else length
    if max(lengths) > length:
        raise ValueError(
            f"collate: a record has {max(lengths)} tokens but length={length}; "
            "truncate when tokenizing or raise the length"
        )
    b = len(records)
    input_ids = np.full((b, length), special.pad, np.int32)
    word_ids = np.full((b, length), -1, np.int32)
    for i, r in enumerate(records):
        input_ids[i, : lengths[i]] = r["input_ids"]
        word_ids[i, : lengths[i]] = r["word_ids"]
    valid = (word_ids >= 0) & ~np.isin(input_ids, np.asarray(special.unmaskable))
    return {
        "input_ids": input_ids,
        "word_ids": word_ids,
        "valid": valid,
        "entity_spans": _spans_array(records, "entity_spans"),
        "entity_labels": [list(r.get("entity_labels", [])) for r in records],
        "example_ids": np.asarray(range(b) if example_ids is None else example_ids, np.int64),
    }


# ---------------------------------------------------------------------------------------------
# unit helpers (all vectorized over [B, L])


def _ids_from_starts(starts: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Unit id = position of the most recent start, on member tokens; -1 elsewhere."""
    pos = np.arange(starts.shape[1], dtype=np.int32)
    last = np.maximum.accumulate(np.where(starts, pos, -1), axis=1)
    return np.where(member, last, -1).astype(np.int32)


def word_starts(word_ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """True on the first valid token of each word."""
    prev_w = np.pad(word_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    prev_v = np.pad(valid, ((0, 0), (1, 0)), constant_values=False)[:, :-1]
    return valid & ((word_ids != prev_w) | ~prev_v)


def word_units(word_ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Whole-word unit ids [B, L]."""
    return _ids_from_starts(word_starts(word_ids, valid), valid)


def entity_units(word_ids: np.ndarray, valid: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Entity units [B, L]: each entity span [B, E, 2] is one unit, every other word another
    (a learned policy with entity units chooses whole entities, as salient spans do)."""
    units = span_units(spans, valid)
    rest = valid & (units < 0)
    return np.where(rest, _ids_from_starts(word_starts(word_ids, rest), rest), units).astype(
        np.int32
    )


def policy_units(batch: PolicyBatch, units: str) -> np.ndarray | None:
    """The unit ids [B, L] a learned policy with `units` pools its logits over (None for
    "token": every token is its own unit)."""
    valid = np.asarray(batch["valid"], bool)
    if units == "word":
        return word_units(np.asarray(batch["word_ids"]), valid)
    if units == "entity":
        return entity_units(np.asarray(batch["word_ids"]), valid, np.asarray(batch["entity_spans"]))
    return None


def span_units(spans: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Unit ids [B, L] from half-open token spans [B, E, 2] (-1 = no span). Tokens outside every
    span get -1. Overlapping spans are split where they overlap (the later start wins), so every
    unit stays contiguous."""
    pos = np.arange(valid.shape[1])[None, None, :]
    start, end = spans[..., :1], spans[..., 1:]
    cover = (pos >= start) & (pos < end) & (start >= 0)
    ids = np.where(cover, start, -1).max(axis=1, initial=-1)
    return np.where(valid, ids, -1).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# scorers


def _zeros(batch: PolicyBatch) -> np.ndarray:
    return np.zeros(batch["input_ids"].shape, np.float32)


@dataclass(frozen=True)
class NoMask:
    """No intermediate pre-training: no units, so the mask is empty (the pipeline skips)."""

    def __call__(self, batch: PolicyBatch, rng: BatchRng) -> tuple[np.ndarray, np.ndarray]:
        return _zeros(batch), np.full(batch["input_ids"].shape, -1, np.int32)


@dataclass(frozen=True)
class RandomTokens:
    """BERT: each maskable token is a unit."""

    def __call__(self, batch: PolicyBatch, rng: BatchRng) -> tuple[np.ndarray, np.ndarray]:
        valid = batch["valid"]
        pos = np.arange(valid.shape[1], dtype=np.int32)
        return _zeros(batch), np.where(valid, pos, -1).astype(np.int32)


@dataclass(frozen=True)
class WholeWords:
    """Whole-word masking: each word (all its tokens) is a unit."""

    def __call__(self, batch: PolicyBatch, rng: BatchRng) -> tuple[np.ndarray, np.ndarray]:
        return _zeros(batch), word_units(batch["word_ids"], batch["valid"])


def span_length_probs(
    distribution: str, *, p: float = 0.2, max_length: int | None = 10, lam: float = 3.0
) -> np.ndarray:
    """P(length = 1..K) as an array [K]. geometric: p(1-p)^(l-1) clipped (renormalized) at
    max_length (SpanBERT: p=0.2, max 10, mean 3.8). poisson: Poisson(lam) conditioned on >= 1
    (BART's zero-length insertions are not units) and, when max_length is None, cut where the
    tail mass is below 1e-12."""
    if distribution == "geometric":
        k = np.arange(1, (max_length or 10) + 1)
        probs = p * (1 - p) ** (k - 1)
    elif distribution == "poisson":
        cap = max_length or int(lam + 20 * np.sqrt(lam) + 20)
        k = np.arange(1, cap + 1)
        log_fact = np.cumsum(np.log(k))
        probs = np.exp(k * np.log(lam) - lam - log_fact)
    else:
        raise ValueError(f"span distribution={distribution!r}; valid: geometric, poisson")
    return probs / probs.sum()


@dataclass(frozen=True)
class RandomSpans:
    """SpanBERT / BART spans: each sentence is cut into consecutive spans of random length
    (counted in words, or tokens with over="token"); each span is a unit. The first span's
    length follows the renewal-process residual law, P(r) ~ P(length >= r), so span boundaries
    do not pile up at the sentence start."""

    probs: tuple[float, ...]  # P(length = 1..K), e.g. from span_length_probs
    over: str = "word"

    def __post_init__(self) -> None:
        if self.over not in ("word", "token"):
            raise ValueError(f"RandomSpans.over={self.over!r}; valid: word, token")

    def __call__(self, batch: PolicyBatch, rng: BatchRng) -> tuple[np.ndarray, np.ndarray]:
        valid = batch["valid"]
        b, length = valid.shape
        atom_start = word_starts(batch["word_ids"], valid) if self.over == "word" else valid
        atom = np.cumsum(atom_start, axis=1) - 1  # atom index of each token
        probs = np.asarray(self.probs)
        cdf = np.cumsum(probs)
        survival = probs[::-1].cumsum()[::-1]  # P(length >= r)
        residual_cdf = np.cumsum(survival / survival.sum())
        u = np.stack([g.random(length) for g in rng.generators(STREAM_SCORER)]).reshape(b, length)
        # `length` spans per row always cover the <= length atoms of the row.
        lens = np.searchsorted(cdf, u, side="right") + 1
        lens[:, 0] = np.searchsorted(residual_cdf, u[:, 0], side="right") + 1
        lens = np.minimum(lens, len(probs))  # guards u ~ 1 against float rounding in the cdf
        ends = np.cumsum(lens, axis=1)
        # One flat searchsorted for the whole batch: offset each row past the previous one.
        offset = (np.arange(b) * (length * len(probs) + length + 1))[:, None]
        flat = np.searchsorted((ends + offset).ravel(), (atom + offset).ravel(), side="right")
        span_id = flat.reshape(b, length) - np.arange(b)[:, None] * length
        prev = np.pad(span_id, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
        prev_valid = np.pad(valid, ((0, 0), (1, 0)), constant_values=False)[:, :-1]
        starts = valid & ((span_id != prev) | ~prev_valid)
        return _zeros(batch), _ids_from_starts(starts, valid)


@dataclass(frozen=True)
class SalientSpans:
    """Salient span masking: the batch's "entity_spans" (filtered to `labels` when given) are the
    units. fill_with_words=True adds every other word as a unit scored FILL_SCORE, taken only
    after all entities."""

    labels: frozenset[str] | None = None
    fill_with_words: bool = False

    def __call__(self, batch: PolicyBatch, rng: BatchRng) -> tuple[np.ndarray, np.ndarray]:
        spans = batch["entity_spans"]
        if self.labels is not None:
            keep = np.zeros(spans.shape[:2], bool)
            for i, labs in enumerate(batch["entity_labels"]):
                keep[i, : len(labs)] = [lab in self.labels for lab in labs]
            spans = np.where(keep[..., None], spans, -1)
        valid = batch["valid"]
        units = span_units(spans, valid)
        scores = _zeros(batch)
        if self.fill_with_words:
            rest = valid & (units < 0)
            words = _ids_from_starts(word_starts(batch["word_ids"], rest), rest)
            scores = np.where(rest, FILL_SCORE, 0.0).astype(np.float32)
            units = np.where(rest, words, units)
        return scores, units


@dataclass(frozen=True)
class Oracle:
    """An analysis policy, never a baseline: the values of the attributes the task asks about
    (gold entity spans typed by attribute: the synthetic world's "entity_types") are the only
    units, so within the budget it masks exactly what the task will ask. The ceiling of what
    choosing which facts to mask can give."""

    attributes: frozenset[str]

    def __call__(self, batch: PolicyBatch, rng: BatchRng) -> tuple[np.ndarray, np.ndarray]:
        if "entity_types" not in batch:
            raise ValueError("the oracle policy needs typed entities (the synthetic world's)")
        spans = batch["entity_spans"]
        keep = np.zeros(spans.shape[:2], bool)
        for i, types in enumerate(batch["entity_types"]):
            keep[i, : len(types)] = [t in self.attributes for t in types]
        units = span_units(np.where(keep[..., None], spans, -1), batch["valid"])
        return _zeros(batch), units


@dataclass(frozen=True)
class PmiNgrams:
    """PMI-Masking: the corpus's top-PMI n-grams are units masked whole; every other word is a
    unit. The n-grams of every corpus row were found once (`pmi`, from data.pmi.corpus_pmi);
    a batch's rows are its "example_ids" (corpus rows, as policies.mlm_batches.policy_batch
    sets them), whose spans are gathered."""

    pmi: CorpusPmi

    def __call__(self, batch: PolicyBatch, rng: BatchRng) -> tuple[np.ndarray, np.ndarray]:
        spans = self.pmi.batch_spans(batch["example_ids"], batch["word_ids"])
        valid = batch["valid"]
        units = span_units(spans, valid)
        rest = valid & (units < 0)
        words = _ids_from_starts(word_starts(batch["word_ids"], rest), rest)
        return _zeros(batch), np.where(rest, words, units)


def make_scorer(
    cfg: PolicyConfig, pmi: CorpusPmi | None = None, asked: Sequence[str] = ()
) -> Scorer:
    """The scorer named by cfg.name (budget: cfg.budget(); output format: policies.corrupt).
    The pmi policy needs its corpus's n-grams, `pmi`: `corpus_scorer` finds (or loads) them;
    the oracle masks the attributes the task asks about, `asked` (or cfg.oracle_types)."""
    if cfg.name == "none":
        return NoMask()
    if cfg.name == "random_tokens":
        return RandomTokens()
    if cfg.name == "whole_words":
        return WholeWords()
    if cfg.name == "random_spans":
        probs = span_length_probs(
            cfg.span_distribution,
            p=cfg.span_geometric_p,
            max_length=cfg.span_max_length if cfg.span_distribution == "geometric" else None,
            lam=cfg.span_poisson_lambda,
        )
        return RandomSpans(probs=tuple(float(x) for x in probs), over=cfg.span_over)
    if cfg.name == "salient_spans":
        return SalientSpans(
            labels=frozenset(cfg.salient_labels), fill_with_words=cfg.salient_fill_with_words
        )
    if cfg.name == "pmi":
        if pmi is None:
            raise ValueError(
                "the pmi policy masks its corpus's PMI n-grams: build its scorer with "
                "heuristic.corpus_scorer(cfg, corpus), or pass make_scorer(cfg, pmi=...) a "
                "data.pmi.CorpusPmi (build_corpus_pmi(records) for in-memory records)"
            )
        return PmiNgrams(pmi)
    if cfg.name == "oracle":
        if cfg.oracle_types:
            return Oracle(frozenset(cfg.oracle_types))
        if not asked:
            raise UserError(
                "the oracle policy masks the values a synthetic-world task asks about: it needs "
                "a world task (--data.task=world_qa, ...)"
            )
        return Oracle(frozenset(asked))
    raise ValueError(f"PolicyConfig.name={cfg.name!r} has no scorer")


def corpus_scorer(cfg: PolicyConfig, corpus: Corpus, asked: Sequence[str] = ()) -> Scorer:
    """The scorer of heuristic policy `cfg` masking the rows of `corpus` (data.corpora.Corpus),
    as a run builds it. The pmi policy's n-grams come from the corpus (data.pmi.corpus_pmi:
    computed once, cached next to the corpus); the oracle's units are the `asked` attributes'
    values."""
    if cfg.name != "pmi":
        return make_scorer(cfg, asked=asked)
    pmi = corpus_pmi(corpus, max_n=cfg.pmi_max_n, min_count=cfg.pmi_min_count, top_k=cfg.pmi_top_k)
    return make_scorer(cfg, pmi)
