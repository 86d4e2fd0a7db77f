"""(e) greedy and beam search output tokens/s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.sizes import BenchSizes
from bench.timing import interleave, median, timed


def make_gen_fns(cfg, sz: BenchSizes) -> dict[str, Callable[[], float]]:
    """greedy / beam: fn -> seconds per call (B * gen_len output tokens)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from meta_mask.model.bart import Bart, init_params
    from meta_mask.model.generate import make_generate_fn

    model = Bart(cfg)
    params = init_params(cfg, jax.random.key(0))
    # A random model may emit EOS at once; forbid it so every call decodes gen_len tokens.
    params = {**params, "final_logits_bias": params["final_logits_bias"].at[2].set(-1e9)}
    gcfg = cfg.replace(forced_eos_token_id=None)
    ids = np.random.default_rng(0).integers(4, cfg.vocab_size, (sz.gen_batch, sz.gen_src))
    ids = jnp.asarray(ids, jnp.int32)
    fns = {}
    for name, beams in (("greedy", 1), (f"beam{sz.beams}", sz.beams)):
        fn = make_generate_fn(model, config=gcfg, max_length=sz.gen_len, num_beams=beams)
        fn(params, ids).block_until_ready()
        fns[name] = lambda fn=fn: timed(lambda: fn(params, ids).block_until_ready(), sz.iters)
    return fns


def generation_section(cfg, sz: BenchSizes, log: Callable[[str], None]) -> dict:
    """(e): greedy and beam search output tokens/s."""
    log(f"timing generation x{sz.repeats} ...")
    gen_fns = make_gen_fns(cfg, sz)
    times = interleave(gen_fns, sz.repeats)
    e: dict[str, Any] = {"times": times, "batch": sz.gen_batch, "max_length": sz.gen_len}
    e["searches"] = {
        name: {"s": median(t), "tokens_per_s": sz.gen_batch * sz.gen_len / median(t)}
        for name, t in times.items()
    }
    return e
