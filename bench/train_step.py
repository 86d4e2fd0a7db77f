"""(a) our train step against PyTorch's, and (b) its MFU against a measured matmul peak."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from bench.flops import matmul_params, train_flops, xla_flops
from bench.sizes import BenchSizes, synthetic_batch
from bench.timing import interleave, median, timed
from bench.torch_worker import TorchProcess


def make_peak(n: int, dtype: str = "float32") -> tuple[Callable[[], float], float]:
    """(fn returning seconds of one n x n matmul in `dtype`, the step's compute dtype; FLOPs)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return (lambda: timed(lambda: dot(a, b).block_until_ready(), 2)), 2.0 * n**3


class OurStep:
    """Our jitted train step on a fixed batch; `run()` returns seconds per step."""

    def __init__(self, cfg, batch: dict, iters: int) -> None:
        import jax

        from meta_mask.config import OptimConfig
        from meta_mask.model.bart import Bart, init_params
        from meta_mask.training import sharding as sharding_lib
        from meta_mask.training.steps import create_train_state, make_optimizer, make_train_step

        optim = OptimConfig(total_steps=10_000)
        model = Bart(cfg)
        params = init_params(cfg, jax.random.key(0))
        self.n_params = sum(x.size for x in jax.tree.leaves(params))
        self.state = create_train_state(params, make_optimizer(optim))
        self.step = make_train_step(model, optim)
        mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig())
        self.batch = sharding_lib.shard_batch(batch, mesh)
        self.rng = jax.random.key(1)
        self.iters = iters
        self.state = jax.device_put(self.state, sharding_lib.replicated(mesh))
        compiled = self.step.jitted.lower(self.state, self.batch, self.rng).compile()
        self.compiled = compiled
        self._one()  # compile (cache) and warm up

    def _one(self) -> None:
        self.state, metrics = self.step(self.state, self.batch, self.rng)
        metrics["loss"].block_until_ready()

    def run(self) -> float:
        return timed(self._one, self.iters)

    def xla_flops(self) -> float:
        return xla_flops(self.compiled)


def torch_available() -> bool:
    """Whether torch is installed (found, not imported: PyTorch runs in its worker process)."""
    return importlib.util.find_spec("torch") is not None


def train_section(
    cfg, sz: BenchSizes, with_torch: bool, log: Callable[[str], None], keep_host_buffers: bool
) -> dict:
    """(a) + (b): our step, torch's step (in its own process, bench/torch_worker.py) and the
    matmul peak, interleaved. Returns {"train_vs_torch": ..., "mfu": ...}."""
    b, s = sz.batch, sz.seq
    tokens = b * 2 * s
    log("building train steps ...")
    batch = synthetic_batch(cfg, b, s, s)
    ours = OurStep(cfg, batch, sz.iters)
    peak_fn, peak_flops = make_peak(sz.peak_n, sz.dtype)
    fns: dict[str, Callable[[], float]] = {"ours": ours.run, "peak": peak_fn}
    torch_step = None
    if with_torch and torch_available():
        torch_step = TorchProcess(sz, keep_host_buffers)
        fns["torch"] = torch_step.run
    log(f"timing train steps x{sz.repeats} ...")
    try:
        times = interleave(fns, sz.repeats)
    finally:
        if torch_step is not None:
            torch_step.close()
    t_ours = median(times["ours"])
    flops = train_flops(cfg, b, s, s)
    peak = peak_flops / median(times["peak"])
    a: dict[str, Any] = {
        "tokens_per_step": tokens,
        "ours_s": t_ours,
        "ours_tokens_per_s": tokens / t_ours,
    }
    if torch_step is not None:
        t_torch = median(times["torch"])
        a.update(
            torch_s=t_torch,
            torch_tokens_per_s=tokens / t_torch,
            ratio=t_torch / t_ours,
            # Paired: each repeat's torch / ours (A and B ran back to back, under the same load).
            ratio_paired_median=median(
                [t / o for t, o in zip(times["torch"], times["ours"], strict=True)]
            ),
            torch_threads=torch_step.threads,
            torch_version=torch_step.torch_version,
            torch_mfu=flops / t_torch / peak,
        )
    else:
        a["torch"] = (
            "skipped: torch not installed (pip install -e '.[test]' has torch==2.13.0)"
            if with_torch
            else "skipped: --no_torch"
        )
    a["times"] = times
    xla = ours.xla_flops()
    mfu = {
        "model_flops_per_step": flops,
        "xla_flops_per_step": xla,
        "xla_over_model": xla / flops,
        "matmul_params": matmul_params(cfg),
        "params": int(ours.n_params),
        "peak_flops_per_s": peak,
        "peak_matmul_n": sz.peak_n,
        "model_flops_per_s": flops / t_ours,
        "mfu": flops / t_ours / peak,
        # Paired: each repeat's step against the peak measured right after it.
        "mfu_paired_median": median(
            [
                flops / o / (peak_flops / p)
                for o, p in zip(times["ours"], times["peak"], strict=True)
            ]
        ),
    }
    return {"train_vs_torch": a, "mfu": mfu}
