"""(d) Host-side intermediate batches per heuristic policy, on the path a run takes.

A synthetic corpus is tokenized and cached by data.corpora.build_corpus; each policy's scorer is
heuristic.corpus_scorer's (what the pipeline builds: the pmi policy's n-grams are found once
per corpus row and cached next to the corpus); policies.mlm_batches.for_corpus (the pipeline's
own constructor) turns a step into its batch (stream rows -> scorer -> sampler -> corrupt_np).
One step's seconds / its sentences give sentences/s, against the sentences/s the train step
of (a) consumes.

The corpus: sentences of `seq` tokens or more (cut to `seq`) of pseudo-words under a small BPE
trained here, so that rare words are 2-3 tokens as under BART's; every sentence holds two
planted multi-word collocations (what PMI finds) and two entity spans of 1-3 words.
"""

from __future__ import annotations

import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.sizes import BenchSizes
from bench.timing import interleave, median, timed

SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")
CORPUS_BATCHES = 16  # corpus sentences = CORPUS_BATCHES * mask_batch (an epoch of batches)


def synthetic_documents(n: int, words: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` sentence records {"text", "doc_id", "entities"} of `words` pseudo-words each."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def word() -> str:
        return "".join(rng.choice(SYLLABLES, size=int(rng.integers(1, 4))))

    fillers = [word() for _ in range(4000)]
    phrases = [[word() for _ in range(int(rng.integers(2, 5)))] for _ in range(max(2, n // 50))]
    docs = []
    for i in range(n):
        sentence = list(rng.choice(fillers, size=words))
        # Collocations and entities in the first half, which survives the cut to `seq` tokens.
        for p in rng.choice(len(phrases), size=2, replace=False):
            at = int(rng.integers(0, words // 2))
            sentence[at:at] = phrases[p]
        starts = np.cumsum([0] + [len(w) + 1 for w in sentence])
        entities = []
        for at in sorted(rng.choice(max(words // 2, 1), size=2, replace=False)):
            end = min(int(at) + int(rng.integers(1, 4)), len(sentence))
            entities.append((int(starts[at]), int(starts[end] - 1), "PERSON"))
        docs.append({"text": " ".join(sentence), "doc_id": str(i), "entities": entities})
    return docs


def bpe_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A BPE fast tokenizer trained on `texts`, with the world tokenizer's special-token layout
    (BART's <s>=0, <pad>=1, </s>=2, <unk>=3, then <mask> and the sentinels)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from meta_mask.data.world_tokenizer import NUM_SENTINELS, SPECIAL_TOKENS, sentinel_token

    sentinels = [sentinel_token(i) for i in range(NUM_SENTINELS)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *sentinels], show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens=sentinels,
    )


def build_bench_corpus(sz: BenchSizes, cache_dir: pathlib.Path):
    """(corpus, tokenizer): the synthetic corpus, built and cached as a run builds its own."""
    from meta_mask.data.corpora import CorpusSource, SentenceFilter, build_corpus

    docs = synthetic_documents(CORPUS_BATCHES * sz.mask_batch, sz.seq)
    tokenizer = bpe_tokenizer([d["text"] for d in docs])
    corpus = build_corpus(
        CorpusSource(kind="records", records=docs, name="bench"),
        tokenizer,
        cache_dir,
        sentence_filter=SentenceFilter(max_chars=10**9, max_words=10**9),
        max_length=sz.seq,
    )
    return corpus, tokenizer


def mlm_batches(corpus, tokenizer, scorer, policy, sz: BenchSizes):
    """The intermediate stage's batches exactly as the pipeline builds them (batch size
    `mask_batch`)."""
    from meta_mask.config import DataConfig
    from meta_mask.policies.mlm_batches import for_corpus
    from meta_mask.special_tokens import SpecialTokens

    return for_corpus(
        corpus,
        scorer,
        tokenizer,
        special=SpecialTokens.of(tokenizer, tokenizer.eos_token_id),
        policy=policy,
        data=DataConfig(mlm_length=sz.seq, mlm_target_length=sz.seq),
        seed=0,
        batch_size=sz.mask_batch,
    )


def masking_section(sz: BenchSizes, consumed: float, log: Callable[[str], None]) -> dict:
    """(d): sentences/s of each heuristic policy's intermediate batches against `consumed`
    sentences/s of the train step; plus the pmi policy's n-gram build and cached load times."""
    import numpy as np

    from meta_mask.config import HEURISTIC_POLICIES, PolicyConfig
    from meta_mask.policies.heuristic import corpus_scorer

    log("building the masking corpus ...")
    with tempfile.TemporaryDirectory() as tmp:
        corpus, tokenizer = build_bench_corpus(sz, pathlib.Path(tmp))
        fns, pmi = {}, {}
        # The heuristic scorers (the learned policies' host cost is their network's forward pass).
        for name in HEURISTIC_POLICIES:
            if name == "none":
                continue
            policy = PolicyConfig(name=name, output_format="full_sentence", infill="span")
            t0 = time.perf_counter()
            scorer = corpus_scorer(policy, corpus)
            if name == "pmi":  # the first call found the n-grams; a second run loads them
                pmi["build_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                scorer = corpus_scorer(policy, corpus)
                pmi["load_s"] = time.perf_counter() - t0
                pmi["ngrams"] = len(scorer.pmi.table.ngrams)
            batches = mlm_batches(corpus, tokenizer, scorer, policy, sz)
            steps = iter(range(1 << 62))

            def one(batches=batches, steps=steps) -> None:
                out = batches(next(steps))
                assert np.isfinite(out["weights"]).all() and out["weights"].any()

            one()
            fns[name] = lambda one=one: timed(one, max(sz.iters, 3)) / sz.mask_batch
        log(f"timing mask generation x{sz.repeats} ...")
        times = interleave(fns, sz.repeats)
    d: dict[str, Any] = {"train_sentences_per_s": consumed, "times": times, "policies": {}}
    for name in fns:
        per_s = 1.0 / median(times[name])
        d["policies"][name] = {"sentences_per_s": per_s, "over_train": per_s / consumed}
    return d | {"corpus_sentences": len(corpus), **{f"pmi_{k}": v for k, v in pmi.items()}}
