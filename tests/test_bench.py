"""The benchmark harness (`python -m bench`, the bench/ folder) in --quick mode: it runs end to
end and writes a complete JSON whose every measurement is finite and positive. No timing
thresholds: speed is what the benchmark reports, not what a test on a shared machine can
assert."""

import json
import math
import subprocess
import sys

import pytest

from bench import cli, flops, profile, sizes, train_step
from bench import load as load_lib
from meta_mask.config import ModelConfig
from tests.processes import run_module


def _numbers(tree, path=""):
    """Every (path, number) leaf of a JSON tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}/{i}")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield path, tree


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert cli.main(["--quick", f"--out={out}"]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow  # the quick benchmark end to end (~40 s idle)
def test_quick_run_writes_every_section(results):
    torch = results["train_vs_torch"]
    for key in ("ours_s", "ours_tokens_per_s", "tokens_per_step"):
        assert key in torch
    if train_step.torch_available():
        assert {"torch_s", "torch_tokens_per_s", "ratio", "torch_mfu"} <= set(torch)
    mfu = results["mfu"]
    assert {"mfu", "peak_flops_per_s", "model_flops_per_s", "xla_flops_per_step"} <= set(mfu)
    meta = results["meta"]
    assert meta["timed_k"] == [1, 2]
    assert meta["meta_k2_bound"] == 2.4 and meta["meta_k2_over_k1"] > 0
    assert len(meta["loadavg"]["meta_k2"]) == len(meta["times"]["meta_k2"])
    # Flat for every K, nested checkpointing (remat_segment = round(sqrt K)) from K = 4.
    assert set(meta["memory_bytes"]) == {"1", "2", "4", "4/S=2"}
    for mem in meta["memory_bytes"].values():
        assert mem["peak"] == mem["temp"] + mem["argument"] + mem["output"] - mem["alias"]
    masking = results["masking"]
    assert set(masking["policies"]) == {
        "random_tokens",
        "random_spans",
        "whole_words",
        "salient_spans",
        "pmi",
    }
    # The pmi policy masked the corpus's n-grams (found once, then loaded from the cache).
    assert masking["pmi_ngrams"] > 0 and masking["corpus_sentences"] == 16 * 8
    assert set(results["generation"]["searches"]) == {"greedy", "beam2"}
    sizes = results["sizes"]
    for times in (torch["times"], meta["times"], results["generation"]["times"]):
        assert all(len(t) == sizes["repeats"] for t in times.values())
    assert "| (b) MFU |" in results["table"]


@pytest.mark.slow  # the quick benchmark end to end (~40 s idle)
def test_every_section_records_its_load_and_the_cpu_is_described(results):
    for section in ("train_vs_torch", "mfu", "meta", "masking", "generation"):
        load = results[section]["load"]
        assert len(load["load_average_before"]) == len(load["load_average_after"]) == 3
        assert load["wall_s"] > 0 and load["background_load"] >= 0
        assert load["reliable"] == (load["background_load"] <= 1.5)
        if not load["reliable"]:
            assert "**UNRELIABLE**" in results["table"]
    machine = results["machine"]
    assert machine["cpu"] and isinstance(machine["cpu_flags"], list)
    assert results["table"].startswith(f"CPU: {machine['cpu']}")
    assert ("AVX-512" in results["table"]) == ("avx512f" in machine["cpu_flags"])


def test_unreliable_load_is_flagged():
    record = {"load_average_before": [3.0, 2, 1], "load_average_after": [3.5, 2, 1]}
    assert "**UNRELIABLE**" in load_lib.describe(
        {**record, "background_load": 2.0, "reliable": False}
    )
    assert "UNRELIABLE" not in load_lib.describe(
        {**record, "background_load": 0.2, "reliable": True}
    )
    _, measured = load_lib.measure(lambda: sum(range(10_000)))
    assert measured["reliable"] == (measured["background_load"] <= load_lib.UNRELIABLE_LOAD)


def test_a_child_process_cpu_counts_as_the_sections_own():
    # PyTorch's reference runs in a worker process (bench/torch_worker.py): its CPU time is the
    # benchmark's, not background load.
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass"
    _, measured = load_lib.measure(lambda: subprocess.run([sys.executable, "-c", burn], check=True))
    assert measured["own_cpus"] > 0.5


@pytest.mark.slow  # the quick benchmark end to end (~40 s idle)
def test_every_measurement_is_finite_and_positive(results):
    # Skipped: the config echo, the machine (load average), memory breakdowns (alias may be 0).
    skip = ("/sizes/", "/machine/", "memory_bytes/", "/load/")
    numbers = [(p, x) for p, x in _numbers(results) if not any(s in p for s in skip)]
    assert len(numbers) > 40
    for path, x in numbers:
        assert math.isfinite(x) and x > 0, (path, x)
    memories = [*results["meta"]["memory_bytes"].values(), results["meta"]["plain_memory_bytes"]]
    for mem in memories:
        assert mem["peak"] > 0 and mem["argument"] > 0 and mem["output"] > 0, mem
        assert mem["temp"] >= 0 and mem["alias"] >= 0, mem


def test_profile_finds_every_matmul_flop_of_the_step(tmp_path):
    # The traced dot thunks' FLOPs (from the compiled HLO) add up to the analytical count: every
    # matmul of the step was timed and categorized, none twice.
    out = tmp_path / "profile.json"
    assert profile.main(["--quick", "--steps=1", f"--out={out}"]) == 0
    res = json.loads(out.read_text())
    cats = res["categories"]
    sz = sizes.quick_sizes()
    expected = flops.train_flops(sizes.model_config(sz), sz.batch, sz.seq, sz.seq)
    traced = sum(c["gflop_per_step"] for c in cats.values()) * 1e9
    assert traced == pytest.approx(expected, rel=1e-9)
    assert {"matmul: dense", "matmul: attention", "matmul: LM head", "dropout rng"} <= set(cats)
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)
    assert res["peak_flops_per_s"] > 0 and res["ops"][0]["ms_per_step"] > 0


def test_flop_formula_matches_hand_count():
    # One layer each side, D = 4, F = 8, V = 10, B = 1, S = 2, T = 3, by hand:
    # encoder tokens: 2 * (4*16 + 2*4*8) = 256, cross k,v: 2 * 2*16 = 64
    # decoder tokens: 3 * (6*16 + 2*4*8 + 4*10) = 3 * 200 = 600
    # attention: 4*4*1*(2*2 + 3*3 + 3*2) = 16 * 19 = 304
    cfg = ModelConfig(
        vocab_size=10,
        d_model=4,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=1,
        decoder_attention_heads=1,
        encoder_ffn_dim=8,
        decoder_ffn_dim=8,
    )
    assert flops.forward_flops(cfg, 1, 2, 3) == 2 * (256 + 64 + 600) + 304
    assert flops.train_flops(cfg, 1, 2, 3) == 3 * flops.forward_flops(cfg, 1, 2, 3)
    assert flops.matmul_params(cfg) == (4 * 16 + 64) + (8 * 16 + 64) + 40


def test_flags_are_validated():
    with pytest.raises(SystemExit):
        cli.parse_args(["--repeats=2"])  # full mode needs >= 5 repeats
    with pytest.raises(SystemExit):
        cli.parse_args(["--sections=train,bogus"])
    sz, args = cli.parse_args(["--quick", "--meta_k=1,3", "--meta_mem_k=1,16", "--d_model=64"])
    assert sz.meta_k == (1, 3) and sz.meta_mem_k == (1, 16) and sz.d_model == 64 and args.quick


def test_the_documented_command_runs_from_the_repository_root():
    proc = run_module("bench", "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m bench")
    for flag in ("--quick", "--sections", "--repeats", "--out", "--no_torch", "--seq"):
        assert flag in proc.stdout
