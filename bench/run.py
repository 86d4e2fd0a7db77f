"""The run: every asked section in one process, each section's contenders interleaved."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from bench.generation import generation_section
from bench.load import measure
from bench.masking import masking_section
from bench.meta_step import meta_section
from bench.report import machine_info
from bench.sizes import BenchSizes, model_config
from bench.train_step import train_section

SECTIONS = ("train", "meta", "masking", "generation")


def run(
    sz: BenchSizes,
    *,
    with_torch: bool = True,
    sections: tuple[str, ...] = SECTIONS,
    log: Callable[[str], None] = print,
    keep_host_buffers: bool = False,
) -> dict:
    """The sections (train = a + b, always: the others compare against its step); returns the
    JSON-able results. keep_host_buffers: whether this process keeps freed host buffers
    (training/host_heap.py), passed on to PyTorch's worker process."""
    import jax

    cfg = model_config(sz)
    results: dict[str, Any] = {"sizes": dataclasses.asdict(sz), "machine": machine_info()}
    results["machine"]["jax"] = jax.__version__
    results["machine"]["devices"] = [str(d) for d in jax.devices()]
    # Every section carries its load record ("load": load averages before / after, background
    # load, reliable); see bench/load.py.
    train, load = measure(lambda: train_section(cfg, sz, with_torch, log, keep_host_buffers))
    for part in train.values():
        part["load"] = load
    results |= train
    if "meta" in sections:
        results["meta"], load = measure(lambda: meta_section(cfg, sz, log))
        results["meta"]["load"] = load
    if "masking" in sections:
        consumed = sz.batch / results["train_vs_torch"]["ours_s"]  # sentences/s of the step
        results["masking"], load = measure(lambda: masking_section(sz, consumed, log))
        results["masking"]["load"] = load
    if "generation" in sections:
        results["generation"], load = measure(lambda: generation_section(cfg, sz, log))
        results["generation"]["load"] = load
    return results
