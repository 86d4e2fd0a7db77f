"""(c) the second-order meta step (remat): time(K) / time(1) for the timed K against 1.2 K, each
over a plain train step, and compiled memory for K = 1.. (flat and nested checkpointing)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from bench.flops import xla_flops
from bench.sizes import BenchSizes, synthetic_batch
from bench.timing import median, timed
from bench.train_step import OurStep


def nested_segment(k: int) -> int:
    """The remat_segment the benchmark uses for nested checkpointing: round(sqrt(K))."""
    return max(1, round(math.sqrt(k)))


def _meta_setup(cfg, sz: BenchSizes, k: int, segment: int = 0):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from meta_mask.config import MetaConfig
    from meta_mask.model.bart import Bart, init_params
    from meta_mask.policies import meta, meta_step, unroll
    from meta_mask.policies.net import init_policy_params, policy_net_from_config
    from meta_mask.special_tokens import SpecialTokens

    mcfg = MetaConfig(
        inner_steps=k,
        mask_rate=0.15,
        estimator="second_order",
        remat=True,
        remat_segment=segment,
        inner_batch_size=sz.meta_batch,
        outer_batch_size=sz.meta_batch,
        policy_d_model=min(128, cfg.d_model),
        policy_ffn_dim=4 * min(128, cfg.d_model),
        policy_heads=min(4, sz.heads),
        policy_max_length=max(sz.meta_len, 64),
    )
    model = Bart(cfg)
    theta = init_params(cfg, jax.random.key(0))
    # The model's own ids; <mask> = 3 (a synthetic vocabulary has no tokenizer).
    special = SpecialTokens(
        pad=cfg.pad_token_id,
        eos=cfg.eos_token_id,
        bos=cfg.bos_token_id,
        mask=3,
        decoder_start=cfg.decoder_start_token_id,
    )
    net = policy_net_from_config(mcfg, cfg.vocab_size, cfg.d_model, special.pad)
    phi = init_policy_params(net, jax.random.key(2), theta["shared"]["embedding"])
    setup = meta.MetaSetup(
        cfg=mcfg,
        policy_fn=meta.policy_fn_from_net(net),
        lm_loss=unroll.bart_lm_loss(model),
        special=special,
    )
    rng = np.random.default_rng(0)
    length = sz.meta_len
    ids = rng.integers(4, cfg.vocab_size, size=(k, sz.meta_batch, length), dtype=np.int32)
    ids[..., 0], ids[..., -1] = 0, 2
    valid = np.ones_like(ids, bool)
    valid[..., 0] = valid[..., -1] = False
    # The downstream (outer) batch: a QA-shaped seq2seq batch, half as long on the target side.
    outer = synthetic_batch(cfg, sz.meta_batch, length, max(length // 2, 2), seed=3)
    batches = {
        "inner": {"input_ids": jnp.asarray(ids), "valid": jnp.asarray(valid)},
        "outer": {k2: jnp.asarray(v) for k2, v in outer.items()},
    }
    state = meta_step.create_meta_state(phi, mcfg)
    return meta_step.make_meta_step(setup, donate=False), state, theta, batches


def meta_memory(compiled) -> dict[str, int]:
    """Bytes of the compiled function: temp + argument + output - alias (donated reuse)."""
    m = compiled.memory_analysis()
    temp, arg = int(m.temp_size_in_bytes), int(m.argument_size_in_bytes)
    out, alias = int(m.output_size_in_bytes), int(m.alias_size_in_bytes)
    return {
        "temp": temp,
        "argument": arg,
        "output": out,
        "alias": alias,
        "peak": temp + arg + out - alias,
    }


class MetaRun:
    def __init__(self, cfg, sz: BenchSizes, k: int, iters: int) -> None:
        import jax

        self.fn, self.state, self.theta, self.batches = _meta_setup(cfg, sz, k)
        self.rng = jax.random.key(4)
        self.compiled = self.fn.lower(self.state, self.theta, self.batches, self.rng).compile()
        self.iters = iters
        self._one()

    def _one(self) -> None:
        self.state, metrics = self.compiled(self.state, self.theta, self.batches, self.rng)
        metrics["loss"].block_until_ready()

    def run(self) -> float:
        return timed(self._one, self.iters)


def _compiled_memory(cfg, sz: BenchSizes, k: int, segment: int) -> dict[str, int]:
    import jax

    fn, state, theta, batches = _meta_setup(cfg, sz, k, segment)
    return meta_memory(fn.lower(state, theta, batches, jax.random.key(4)).compile())


def meta_section(cfg, sz: BenchSizes, log: Callable[[str], None]) -> dict:
    """(c): meta steps for K in sz.meta_k against a plain step on the inner batch, interleaved,
    with the load average at every repeat; compiled memory for K in sz.meta_mem_k, flat and
    with nested checkpointing (remat_segment = round(sqrt K), K >= 4; K > 8 nested only)."""
    log("building meta steps ...")
    meta_batch = synthetic_batch(cfg, sz.meta_batch, sz.meta_len, sz.meta_len, seed=5)
    plain = OurStep(cfg, meta_batch, sz.iters)
    metas = {k: MetaRun(cfg, sz, k, sz.iters) for k in sorted(set(sz.meta_k))}
    log(f"timing meta steps x{sz.repeats} ...")
    fns = {"plain": plain.run, **{f"meta_k{k}": m.run for k, m in metas.items()}}
    times: dict[str, list[float]] = {name: [] for name in fns}
    loads: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(sz.repeats):  # interleaved: machine noise hits every contender alike
        for name, fn in fns.items():
            times[name].append(fn())
            loads[name].append(os.getloadavg()[0])
    t_plain = median(times["plain"])
    c: dict[str, Any] = {"plain_s": t_plain, "times": times, "loadavg": loads}
    c["timed_k"] = sorted(metas)
    plain_flops = xla_flops(plain.compiled)
    t1 = median(times["meta_k1"])
    for k in metas:
        c[f"meta_k{k}_s"] = median(times[f"meta_k{k}"])
        c[f"meta_k{k}_over_plain"] = c[f"meta_k{k}_s"] / t_plain
        # Linear cost means time(K) <= 1.2 K time(1). Medians of interleaved repeats, and the
        # median of the per-repeat ratios (robust to load drifting between repeats).
        c[f"meta_k{k}_over_k1"] = c[f"meta_k{k}_s"] / t1
        c[f"meta_k{k}_over_k1_paired"] = median(
            [t / one for t, one in zip(times[f"meta_k{k}"], times["meta_k1"], strict=True)]
        )
        c[f"meta_k{k}_bound"] = 1.2 * k
    # XLA counts a scan's body once: only K = 1 (no loop) is an exact FLOP count.
    c["meta_k1_flops_over_plain"] = xla_flops(metas[1].compiled) / plain_flops
    log("compiling for memory ...")
    memory: dict[str, dict[str, int]] = {}
    for k in sz.meta_mem_k:
        if k <= 8:
            memory[str(k)] = (
                meta_memory(metas[k].compiled) if k in metas else _compiled_memory(cfg, sz, k, 0)
            )
        if k >= 4 and nested_segment(k) < k:
            memory[f"{k}/S={nested_segment(k)}"] = _compiled_memory(cfg, sz, k, nested_segment(k))
    c["memory_bytes"] = memory
    k_max = max(k for k in sz.meta_mem_k if k <= 8)
    c["memory_kmax"] = k_max
    c["memory_kmax_over_k1"] = memory[str(k_max)]["peak"] / memory["1"]["peak"]
    nested = f"{k_max}/S={nested_segment(k_max)}"
    if nested in memory:
        c["memory_kmax_nested_over_k1"] = memory[nested]["peak"] / memory["1"]["peak"]
    c["plain_memory_bytes"] = meta_memory(plain.compiled)
    return c
