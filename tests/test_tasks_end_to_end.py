"""End to end on every real task's flagfile: the experiments/<task>.flags settings, shrunk on the
command line to a tiny random BART (Hugging Face format, with a byte-level BPE tokenizer trained
on the fixture text) and the tiny real-schema files of tests/data/fixtures.py, run through
intermediate pre-training -> fine-tuning -> evaluation. Checks that each task's data, corpus,
policy, output format and metric meet in one run; not that the numbers are good."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from tests.data import fixtures
from tests.data.tokenizer_helpers import fast_tokenizer
from tests.helpers import parse_config
from tests.processes import REPO, run_module

pytestmark = pytest.mark.slow


# Sentences with named entities and dates, so spaCy finds salient spans, and repeated n-grams,
# so PMI finds units ("the novel", "was born in").
CORPUS = [
    "Herman Melville wrote the novel Moby Dick in New York in 1851.",
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Jupiter is the largest planet in the Solar System and has dozens of moons.",
    "The First World War started on 28 July 1914 in Europe.",
    "Gustave Eiffel was born in Dijon in France in December 1832.",
    "Apple Inc. has its headquarters in Cupertino, California since 1993.",
    "Barack Obama was born in Honolulu, Hawaii on 4 August 1961.",
    "Charles Dickens wrote the novel Oliver Twist in London in 1838.",
    "Marie Curie was born in Warsaw in Poland on 7 November 1867.",
    "The Amazon River flows through Brazil and Peru into the Atlantic Ocean.",
]
BATCH = 2
MAX_EXAMPLES = 2
# The shrunk lengths fit the tiny model's 64 positions (generation adds the start token); the
# tiny BPE takes up to ~40 tokens for a corpus sentence, which 64 keeps whole.
TINY = [
    "--data.max_corpus_sentences=0",
    "--data.mlm_length=64",
    "--data.mlm_target_length=24",
    "--data.source_length=48",
    "--data.target_length=16",
    "--intermediate.steps=2",
    f"--intermediate.batch_size={BATCH}",
    "--intermediate.checkpoint_every=2",
    "--intermediate.log_every=1",
    "--intermediate.optim.warmup_steps=0",
    "--finetune.steps=2",
    f"--finetune.batch_size={BATCH}",
    "--finetune.checkpoint_every=2",
    "--finetune.log_every=1",
    "--finetune.optim.warmup_steps=0",
    f"--eval.max_examples={MAX_EXAMPLES}",
    f"--eval.batch_size={BATCH}",
]
METRIC_KEYS = {
    "em_f1": {"em", "f1", "n"},
    "kilt_em": {"em", "f1", "n"},
    "accuracy": {"accuracy", "n"},
    "rouge": {"rouge1", "rouge2", "rougeL", "rougeLsum", "n"},
}


def _tokenizer(texts: list[str]):
    """A byte-level BPE with BART's special tokens (<s>=0 <pad>=1 </s>=2 <unk>=3, <mask>) and
    BART's <s> .. </s> post-processor, as a fast transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,  # the 256 byte symbols, the specials and ~140 merges
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    return fast_tokenizer(backend)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Fixture files of the nine tasks, a tiny corpus, and a tiny random BART + tokenizer saved
    in Hugging Face format in one folder (so --init=<folder> loads both)."""
    import jax

    from meta_mask.config import tiny_model_config
    from meta_mask.model import bart, hf

    root = tmp_path_factory.mktemp("e2e")
    task_dirs = fixtures.write_all_tasks(root / "tasks")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    texts = list(CORPUS)
    for name in fixtures.TASK_NAMES:
        for split in fixtures.SPLITS[name]:
            texts += [
                json.dumps(row, ensure_ascii=False) for row in fixtures.task_rows(name, split)
            ]
    tokenizer = _tokenizer(texts)
    config = tiny_model_config(
        vocab_size=len(tokenizer), encoder_layers=1, decoder_layers=1, max_position_embeddings=64
    )
    model_dir = hf.save_hf(bart.init_params(config, jax.random.key(0)), config, root / "bart")
    tokenizer.save_pretrained(str(model_dir))
    return {"model": model_dir, "corpus": corpus, **task_dirs}


def _args(flagfile: str, task: str, assets: dict, extra: list[str]) -> list[str]:
    """The flagfile, then the overrides: later flags win, so the file's settings stand except
    model, data location, sizes and steps."""
    from meta_mask.data import tasks

    summarization = tasks.get_task(task).category == "summarization"
    return [
        f"--flagfile={REPO / 'experiments' / flagfile}",
        f"--init={assets['model']}",
        f"--data.data_dir={assets[task]}",
        # Summarization flagfiles read the task's own articles; the others read Wikipedia,
        # replaced here by the tiny corpus file.
        *([] if summarization else [f"--data.corpus={assets['corpus']}"]),
        *TINY,
        *extra,
    ]


def _check_run(workdir: pathlib.Path, cfg) -> dict:
    from meta_mask.data import tasks

    results = json.loads((workdir / "results.json").read_text())
    assert results["task"] == cfg.data.task and results["policy"] == cfg.policy.name
    metrics = results["metrics"]
    metric = tasks.get_task(cfg.data.task).metric
    assert METRIC_KEYS[metric] <= set(metrics), metrics
    assert metrics["n"] == MAX_EXAMPLES
    for key in METRIC_KEYS[metric] - {"n"}:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    preds = [
        json.loads(x) for x in (workdir / "evaluate" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(preds) == MAX_EXAMPLES and all(isinstance(p["prediction"], str) for p in preds)
    stages = ("finetune",) if cfg.policy.name == "none" else ("intermediate", "finetune")
    assert (workdir / "intermediate" / "done.json").exists() == (cfg.policy.name != "none")
    for stage in stages:
        rows = [json.loads(x) for x in (workdir / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(np.isfinite(r["loss"]) for r in rows), (stage, rows)
    return results


# (flagfile, task, extra overrides): every task's own flagfile with its own policy and output
# format, plus policy variants. nq.flags (salient spans on real text) and tqa_pmi.flags have
# their own tests below, which also look inside the corpus.
RUNS = [
    ("tqa.flags", "tqa", []),
    ("wq.flags", "wq", []),
    ("fever.flags", "fever", []),
    ("zsre.flags", "zsre", []),
    ("trex.flags", "trex", []),
    ("xsum.flags", "xsum", []),
    ("cnndm.flags", "cnndm", []),
    ("samsum.flags", "samsum", []),
    ("nq_full_sentence.flags", "nq", []),
    ("nq_none.flags", "nq", []),
]


@pytest.mark.parametrize(("flagfile", "task", "extra"), RUNS, ids=[r[0] for r in RUNS])
def test_task_flagfile_runs_end_to_end(flagfile, task, extra, assets, tmp_path, monkeypatch):
    from meta_mask import pipeline

    # Nested --flagfile paths in experiments/ are relative to the repository root.
    monkeypatch.chdir(REPO)
    cfg = parse_config(_args(flagfile, task, assets, extra))
    assert cfg.data.task == task and cfg.init == str(assets["model"])
    pipeline.run(cfg, tmp_path / "run")
    _check_run(tmp_path / "run", cfg)


def test_salient_spans_on_real_text_use_spacy_entities(assets, tmp_path, monkeypatch):
    """nq.flags' salient span masking on a real-text corpus: the corpus cache holds spaCy's
    entity spans (the world's are gold; real text has none until NER runs)."""
    import datasets

    from meta_mask import pipeline

    monkeypatch.chdir(REPO)
    cfg = parse_config(_args("nq.flags", "nq", assets, []))
    assert cfg.policy.name == "salient_spans"
    pipeline.run(cfg, tmp_path / "run")
    _check_run(tmp_path / "run", cfg)
    arrows = sorted((tmp_path / "run" / "cache" / "corpora").glob("*.arrow"))
    assert len(arrows) == 1
    stats = json.loads(arrows[0].with_suffix(".json").read_text())
    assert stats["truncated"] == 0  # whole sentences: no entity was cut off
    corpus = datasets.Dataset.from_file(str(arrows[0]))
    labels = [label for row in corpus["entity_labels"] for label in row]
    assert len(corpus) == len(CORPUS)
    # Every corpus sentence names a person, place or date.
    assert sum(len(s) > 0 for s in corpus["entity_spans"]) == len(CORPUS)
    assert {"PERSON", "GPE", "DATE"} <= set(labels), set(labels)


def test_pmi_on_real_text_masks_corpus_ngrams(assets, tmp_path, monkeypatch):
    """tqa_pmi.flags (nested in tqa.flags) on the tiny corpus, with the minimum n-gram count
    lowered from Wikipedia's 10 to 2: the run finishes, and its corpus has PMI n-grams to mask
    ("was born in" appears three times), so the intermediate stage masked real units."""
    import datasets

    from meta_mask import pipeline
    from meta_mask.data import pmi

    monkeypatch.chdir(REPO)
    cfg = parse_config(_args("tqa_pmi.flags", "tqa", assets, ["--policy.pmi_min_count=2"]))
    assert (cfg.data.task, cfg.policy.name, cfg.policy.pmi_min_count) == ("tqa", "pmi", 2)
    pipeline.run(cfg, tmp_path / "run")
    _check_run(tmp_path / "run", cfg)
    (arrow,) = (tmp_path / "run" / "cache" / "corpora").glob("*.arrow")
    corpus = datasets.Dataset.from_file(str(arrow))
    p = cfg.policy
    table = pmi.build_pmi_table(corpus, p.pmi_max_n, p.pmi_min_count, p.pmi_top_k)
    assert table.ngrams
    found = [pmi.find_ngrams(r["input_ids"], r["word_ids"], table) for r in corpus]
    assert sum(len(spans) > 0 for spans in found) >= 3


def test_cli_runs_a_nested_flagfile(assets, tmp_path):
    """The real command line, from the repository root, on a variant flagfile that includes
    its task's flagfile (xsum_salient -> xsum): the nested path resolves and the run finishes."""
    workdir = tmp_path / "cli"
    args = _args("xsum_salient.flags", "xsum", assets, [f"--workdir={workdir}"])
    args[0] = "--flagfile=experiments/xsum_salient.flags"
    proc = run_module("meta_mask.train", *args, env={"JAX_PLATFORMS": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((workdir / "config.json").read_text())
    assert config["policy"]["name"] == "salient_spans"
    assert config["policy"]["output_format"] == "masked_spans"
    assert config["eval"]["num_beams"] == 6  # xsum.flags' setting came through the include
    _check_run(workdir, parse_config(["--flagfile=experiments/xsum_salient.flags", *args[1:]]))


@pytest.mark.parametrize("policy", ["supervised", "meta"])
def test_learned_policies_on_a_real_task(policy, assets, tmp_path, monkeypatch):
    """nq.flags with a learned policy: nq_open has no contexts, so the (sentence, question,
    answer) triples come from corpus sentences that contain the answers (two in the dev split:
    one inner context and one contrast question per meta batch)."""
    from meta_mask import pipeline

    monkeypatch.chdir(REPO)
    learned = [
        f"--policy.name={policy}", "--meta.policy_layers=1", "--meta.policy_d_model=16",
        "--meta.policy_heads=2", "--meta.policy_ffn_dim=32", "--meta.meta_steps=3",
        "--meta.mask_rate=0.15",
        "--meta.inner_batch_size=1", "--meta.outer_batch_size=1", "--supervised.steps=6",
        "--supervised.eval_every=3", "--supervised.batch_size=2",
    ]  # fmt: skip
    cfg = parse_config(_args("nq.flags", "nq", assets, learned))
    pipeline.run(cfg, tmp_path / "run")
    _check_run(tmp_path / "run", cfg)
    folder = tmp_path / "run" / "learn_policy"
    assert json.loads((folder / "policy.json").read_text())["task"] == "nq"
    history = json.loads((folder / "history.json").read_text())
    assert history["evals"], history
    assert (tmp_path / "run" / "intermediate" / "masks.html").exists()
