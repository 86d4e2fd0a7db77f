"""(c) the second-order meta step (remat) against a plain train step, and its compiled memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.flops import xla_flops
from bench.sizes import BenchSizes
from bench.timing import interleave, median, timed
from bench.train_step import OurStep, synthetic_batch


def _meta_setup(cfg, sz: BenchSizes, k: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from meta_mask.config import MetaConfig
    from meta_mask.model.bart import Bart, init_params
    from meta_mask.policies import meta
    from meta_mask.policies.net import init_policy_params, policy_net_from_config
    from meta_mask.special_tokens import SpecialTokens

    mcfg = MetaConfig(
        inner_steps=k,
        mask_rate=0.15,
        estimator="second_order",
        remat=True,
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
        lm_loss=meta.bart_lm_loss(model),
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
    state = meta.create_meta_state(phi, mcfg)
    return meta.make_meta_step(setup, donate=False), state, theta, batches


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


def meta_section(cfg, sz: BenchSizes, log: Callable[[str], None]) -> dict:
    """(c): meta steps K = 1, 4 against a plain step on the inner batch; compiled memory."""
    import jax

    # (c) meta step vs a plain step on the inner batch.
    log("building meta steps ...")
    meta_batch = synthetic_batch(cfg, sz.meta_batch, sz.meta_len, sz.meta_len, seed=5)
    plain = OurStep(cfg, meta_batch, sz.iters)
    # Timed: K = 1 and K = 4 (or the largest K asked for, if smaller).
    metas = {k: MetaRun(cfg, sz, k, sz.iters) for k in sorted({1, min(4, max(sz.meta_k))})}
    log(f"timing meta steps x{sz.repeats} ...")
    times = interleave(
        {"plain": plain.run, **{f"meta_k{k}": m.run for k, m in metas.items()}}, sz.repeats
    )
    t_plain = median(times["plain"])
    c: dict[str, Any] = {"plain_s": t_plain, "times": times, "timed_k": sorted(metas)}
    plain_flops = xla_flops(plain.compiled)
    for k in metas:
        c[f"meta_k{k}_s"] = median(times[f"meta_k{k}"])
        c[f"meta_k{k}_over_plain"] = c[f"meta_k{k}_s"] / t_plain
        # The work ratio (XLA's FLOP count): the time ratio it implies at equal efficiency.
        # Exact for K = 1; XLA counts a scan (while loop) body once, so K > 1 is undercounted.
        c[f"meta_k{k}_flops_over_plain"] = xla_flops(metas[k].compiled) / plain_flops
    memory = {}
    for k in sz.meta_k:
        if k in metas:
            compiled = metas[k].compiled
        else:
            fn, state, theta, batches = _meta_setup(cfg, sz, k)
            compiled = fn.lower(state, theta, batches, jax.random.key(4)).compile()
        memory[str(k)] = meta_memory(compiled)
    c["memory_bytes"] = memory
    k_max = str(max(sz.meta_k))
    c["memory_kmax_over_k1"] = memory[k_max]["peak"] / memory["1"]["peak"]
    c["plain_memory_bytes"] = meta_memory(plain.compiled)
    return c
