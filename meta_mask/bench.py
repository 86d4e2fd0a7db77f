"""Performance harness: `python -m meta_mask.bench [--quick] [--out=bench.json]`.

Owns the speed measurements of the README's Performance section, all taken in ONE process with
interleaved repeats (A, B, A, B, ...) so that machine noise hits every contender alike; the
reported numbers are medians over `--repeats` (>= 5) repeats.

  a. train_vs_torch  our jitted train step (AdamW + global-norm clip, dropout on) against Hugging
                     Face PyTorch `BartForConditionalGeneration` + `torch.optim.AdamW` (+ clip)
                     at the same config, batch, lengths and float32, on CPU: tokens/s each and
                     the ratio. tokens = B * (S + T): every encoder and decoder position.
  b. mfu             model FLOP/s of our step / the machine's float32 matmul peak, measured
                     here as a large `jnp.dot` (2 N^3 FLOPs). Model FLOPs are analytical
                     (`train_flops`, formula below) and cross-checked against XLA's
                     `cost_analysis()` of the compiled step.
  c. meta            the second-order meta step (remat on) at K = 1 and K = 4 inner steps over a
                     plain train step on the same inner batch, and the compiled peak memory
                     (memory_analysis(): temp + argument + output - alias bytes) for K = 1..8.
  d. masking         host-side mask generation (scorer + sampler + corrupt_np) in sentences/s
                     per policy, against the sentences/s the train step of (a) consumes.
  e. generation      greedy and beam search (jitted while loops with the decode cache): output
                     tokens/s (B * max_length per call; EOS is suppressed so every call decodes
                     the full length).

Model FLOPs of one train step (forward x 3: the backward pass costs two forwards). With
D = d_model, F = ffn dim, V = vocab, Le / Ld layers, B batch, S / T encoder / decoder lengths:

    forward = 2 * [ B*S * Le*(4 D^2 + 2 D F)                 encoder q,k,v,o and fc1, fc2
                  + B*S * Ld*(2 D^2)                         cross-attention k,v of the encoder
                  + B*T * (Ld*(6 D^2 + 2 D F) + D V) ]     decoder q,k,v,o, cross q,o, ffn, head
            + 4 D * B * (Le S^2 + Ld T^2 + Ld T S)           attention scores and values
    train   = 3 * forward

(Decoder self-attention is counted over the full T x T block, as computed; embedding lookups,
layer norms, softmax, GELU and the optimizer are not counted: they are memory-bound.)

torch is imported lazily and only here (never by the library); install it with
`pip install -e '.[test]'` (torch==2.13.0). Without it section (a) reports torch as skipped.

XLA CPU flags: this command is a CLI, so it may set XLA_FLAGS before jax is imported; the
library itself never does. See `_xla_flags` for what is set and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def _xla_flags() -> None:
    # Set before jax is imported (main() calls this first). Nothing is set when the user already
    # chose XLA_FLAGS. (Kept as a hook: measured flags are listed in bench/README.md.)
    os.environ.setdefault("XLA_FLAGS", "")


# ----------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class BenchSizes:
    d_model: int = 256
    layers: int = 4  # encoder and decoder layers each
    heads: int = 4
    ffn_dim: int = 1024
    vocab: int = 8192
    seq: int = 128  # encoder and decoder length of the train step (a, b)
    batch: int = 16
    meta_batch: int = 8  # sentences per inner batch (c)
    meta_len: int = 64  # inner sentence length (c)
    meta_k: tuple[int, ...] = (1, 2, 4, 8)  # K values whose compiled memory is reported
    mask_batch: int = 64  # sentences per host masking call (d)
    gen_batch: int = 8
    gen_src: int = 64
    gen_len: int = 32
    beams: int = 4
    peak_n: int = 2048  # jnp.dot size for the matmul peak
    repeats: int = 5
    iters: int = 3  # steps per timed repeat
    dtype: str = "float32"


def quick_sizes() -> BenchSizes:
    """A tiny configuration (seconds) for tests/test_bench.py."""
    return BenchSizes(
        d_model=32,
        layers=1,
        heads=2,
        ffn_dim=64,
        vocab=128,
        seq=16,
        batch=4,
        meta_batch=2,
        meta_len=16,
        meta_k=(1, 2),
        mask_batch=8,
        gen_batch=2,
        gen_src=8,
        gen_len=6,
        beams=2,
        peak_n=256,
        repeats=2,
        iters=1,
    )


def model_config(sz: BenchSizes):
    from meta_mask.config import ModelConfig

    return ModelConfig(
        vocab_size=sz.vocab,
        d_model=sz.d_model,
        encoder_layers=sz.layers,
        decoder_layers=sz.layers,
        encoder_attention_heads=sz.heads,
        decoder_attention_heads=sz.heads,
        encoder_ffn_dim=sz.ffn_dim,
        decoder_ffn_dim=sz.ffn_dim,
        max_position_embeddings=max(sz.seq, sz.gen_src, sz.gen_len, sz.meta_len, 64),
        dtype=sz.dtype,
    )


# ----------------------------------------------------------------------------- FLOPs


def forward_flops(cfg, batch: int, src: int, tgt: int) -> float:
    """Matmul FLOPs of one forward pass (module docstring formula)."""
    d, v = cfg.d_model, cfg.vocab_size
    le, ld = cfg.encoder_layers, cfg.decoder_layers
    enc = batch * src * (le * (4 * d * d + 2 * d * cfg.encoder_ffn_dim) + ld * 2 * d * d)
    dec = batch * tgt * (ld * (6 * d * d + 2 * d * cfg.decoder_ffn_dim) + d * v)
    attn = 4 * d * batch * (le * src * src + ld * tgt * tgt + ld * tgt * src)
    return 2.0 * (enc + dec) + attn


def train_flops(cfg, batch: int, src: int, tgt: int) -> float:
    """Matmul FLOPs of one train step: 3 forward passes."""
    return 3.0 * forward_flops(cfg, batch, src, tgt)


def matmul_params(cfg) -> int:
    """Parameters that take part in matmuls (Dense kernels and the tied output embedding)."""
    d = cfg.d_model
    enc = cfg.encoder_layers * (4 * d * d + 2 * d * cfg.encoder_ffn_dim)
    dec = cfg.decoder_layers * (8 * d * d + 2 * d * cfg.decoder_ffn_dim)
    return enc + dec + d * cfg.vocab_size


# ----------------------------------------------------------------------------- timing helpers


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def interleave(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every fn once per repeat, in turn (A, B, A, B, ...); each returns seconds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def _timed(fn: Callable[[], Any], iters: int) -> float:
    """Seconds per call of `fn` (which must block until its work is done)."""
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


# ----------------------------------------------------------------------------- (b) peak


def make_peak(n: int) -> tuple[Callable[[], float], float]:
    """(fn returning seconds of one n x n float32 matmul, its FLOPs)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return (lambda: _timed(lambda: dot(a, b).block_until_ready(), 2)), 2.0 * n**3


# ----------------------------------------------------------------------------- (a) train steps


def synthetic_batch(cfg, batch: int, src: int, tgt: int, seed: int = 0) -> dict:
    """A full (no padding) seq2seq batch in the train step's format (numpy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(4, cfg.vocab_size, size=(batch, src), dtype=np.int32)
    labels = rng.integers(4, cfg.vocab_size, size=(batch, tgt), dtype=np.int32)
    dec = np.concatenate(
        [np.full((batch, 1), cfg.decoder_start_token_id, np.int32), labels[:, :-1]], axis=1
    )
    return {
        "input_ids": ids,
        "decoder_input_ids": dec,
        "labels": labels,
        "weights": np.ones((batch, tgt), np.float32),
    }


def _xla_flops(compiled) -> float:
    """FLOPs of a compiled function by XLA's cost analysis."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


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
        return _timed(self._one, self.iters)

    def xla_flops(self) -> float:
        return _xla_flops(self.compiled)


class TorchStep:
    """HF PyTorch BartForConditionalGeneration + AdamW (+ grad clip), dropout on."""

    def __init__(self, cfg, batch: dict, iters: int) -> None:
        import torch
        from transformers import BartConfig, BartForConditionalGeneration

        torch.manual_seed(0)
        hf_cfg = BartConfig(
            **{
                f.name: getattr(cfg, f.name)
                for f in dataclasses.fields(cfg)
                if f.name not in ("dtype", "remat")
            }
        )
        self.model = BartForConditionalGeneration(hf_cfg).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        self.batch = {k: torch.from_numpy(v.astype("int64")) for k, v in batch.items()}
        self.iters = iters
        self.threads = torch.get_num_threads()
        self.torch_version = torch.__version__
        self._one()

    def _one(self) -> None:
        import torch

        out = self.model(
            input_ids=self.batch["input_ids"],
            decoder_input_ids=self.batch["decoder_input_ids"],
            labels=self.batch["labels"],
        )
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()

    def run(self) -> float:
        return _timed(self._one, self.iters)


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- (c) meta step


def _meta_setup(cfg, sz: BenchSizes, k: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from meta_mask.config import MetaConfig
    from meta_mask.model.bart import Bart, init_params
    from meta_mask.policies import meta
    from meta_mask.policies.net import init_policy_params, policy_net_from_config

    mcfg = MetaConfig(
        inner_steps=k,
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
    net = policy_net_from_config(mcfg, cfg.vocab_size, cfg.d_model)
    phi = init_policy_params(net, jax.random.key(2), theta["shared"]["embedding"])
    setup = meta.MetaSetup(
        cfg=mcfg,
        policy_fn=meta.policy_fn_from_net(net),
        lm_loss=meta.bart_lm_loss(model),
        mask_id=3,
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
        return _timed(self._one, self.iters)


# ----------------------------------------------------------------------------- (d) masking


def synthetic_records(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Tokenized sentence records (the data contract) with words of 1-3 tokens, ~2 entities
    of 1-3 words and ~2 PMI n-grams each."""
    import numpy as np

    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        n_tok = length - 2
        word_lens = rng.integers(1, 4, size=n_tok)
        word_ids = np.repeat(np.arange(n_tok), word_lens)[:n_tok]
        starts = np.flatnonzero(np.diff(np.concatenate([[-1], word_ids])))
        n_words = len(starts)
        ents, pmis = [], []
        for out in (ents, pmis):
            for w in rng.choice(
                max(n_words - 3, 1), size=min(2, max(n_words - 3, 1)), replace=False
            ):
                w_end = min(w + int(rng.integers(1, 4)), n_words)
                end = starts[w_end] if w_end < n_words else n_tok
                out.append((starts[w] + 1, end + 1))
        ids = np.concatenate([[0], rng.integers(4, vocab, size=n_tok), [2]]).astype(np.int32)
        records.append(
            {
                "input_ids": ids,
                "word_ids": np.concatenate([[-1], word_ids, [-1]]).astype(np.int32),
                "entity_spans": np.asarray(sorted(ents), np.int32),
                "entity_labels": ["PERSON"] * len(ents),
                "pmi_spans": np.asarray(sorted(pmis), np.int32),
            }
        )
    return records


def make_mask_fns(sz: BenchSizes, cfg) -> dict[str, Callable[[], float]]:
    """Per policy: fn -> seconds per sentence of scorer + sampler + corrupt_np."""
    import numpy as np

    from meta_mask.config import HEURISTIC_POLICIES, PolicyConfig
    from meta_mask.policies.corrupt import corrupt_batch
    from meta_mask.policies.heuristic import collate, make_scorer
    from meta_mask.policies.sampler import BatchRng, mask_batch_np

    records = synthetic_records(sz.mask_batch, sz.seq, cfg.vocab_size)
    batch = collate(records, sz.seq)
    sentinels = list(range(cfg.vocab_size - 100, cfg.vocab_size)) if cfg.vocab_size > 200 else []
    fns = {}
    # The heuristic scorers (the learned policies' host cost is their network's forward pass).
    for name in HEURISTIC_POLICIES:
        if name == "none":
            continue
        pcfg = PolicyConfig(name=name, output_format="full_sentence", infill="span")
        scorer = make_scorer(pcfg)
        state = {"step": 0}

        def one(pcfg=pcfg, scorer=scorer, state=state) -> None:
            rng = BatchRng(0, state["step"], batch["example_ids"])
            state["step"] += 1
            mask = mask_batch_np(scorer, batch, rng, **pcfg.budget())
            out = corrupt_batch(
                batch,
                mask,
                pcfg,
                enc_len=sz.seq,
                dec_len=sz.seq,
                mask_id=3,
                sentinels=sentinels,
                rng=rng,
            )
            assert np.isfinite(out["weights"]).all()

        one()
        fns[name] = lambda one=one: _timed(one, max(sz.iters, 3)) / sz.mask_batch
    return fns


# ----------------------------------------------------------------------------- (e) generation


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
        fns[name] = lambda fn=fn: _timed(lambda: fn(params, ids).block_until_ready(), sz.iters)
    return fns


# ----------------------------------------------------------------------------- the run


SECTIONS = ("train", "meta", "masking", "generation")


def run(
    sz: BenchSizes,
    *,
    with_torch: bool = True,
    sections: tuple[str, ...] = SECTIONS,
    log: Callable[[str], None] = print,
) -> dict:
    """The sections (train = a + b), interleaved within each; returns the JSON-able results.
    Sections c and d need "train" (they compare against its step)."""
    import jax

    cfg = model_config(sz)
    b, s = sz.batch, sz.seq
    tokens = b * 2 * s
    results: dict[str, Any] = {"sizes": dataclasses.asdict(sz), "machine": machine_info()}
    results["machine"]["jax"] = jax.__version__
    results["machine"]["devices"] = [str(d) for d in jax.devices()]

    # (a) + (b): our step, torch's step, the matmul peak, interleaved.
    log("building train steps ...")
    batch = synthetic_batch(cfg, b, s, s)
    ours = OurStep(cfg, batch, sz.iters)
    peak_fn, peak_flops = make_peak(sz.peak_n)
    fns: dict[str, Callable[[], float]] = {"ours": ours.run, "peak": peak_fn}
    torch_step = None
    if with_torch and torch_available():
        torch_step = TorchStep(cfg, batch, sz.iters)
        fns["torch"] = torch_step.run
    log(f"timing train steps x{sz.repeats} ...")
    times = interleave(fns, sz.repeats)
    t_ours = _median(times["ours"])
    flops = train_flops(cfg, b, s, s)
    peak = peak_flops / _median(times["peak"])
    a = {"tokens_per_step": tokens, "ours_s": t_ours, "ours_tokens_per_s": tokens / t_ours}
    if torch_step is not None:
        t_torch = _median(times["torch"])
        a.update(
            torch_s=t_torch,
            torch_tokens_per_s=tokens / t_torch,
            ratio=t_torch / t_ours,
            # Paired: each repeat's torch / ours (A and B ran back to back, under the same load).
            ratio_paired_median=_median(
                [t / o for t, o in zip(times["torch"], times["ours"], strict=True)]
            ),
            torch_threads=torch_step.threads,
            torch_version=torch_step.torch_version,
            torch_mfu=flops / t_torch / peak,
        )
    else:
        a["torch"] = "skipped: torch not installed (pip install -e '.[test]' has torch==2.13.0)"
    a["times"] = times
    results["train_vs_torch"] = a
    xla = ours.xla_flops()
    results["mfu"] = {
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
        "mfu_paired_median": _median(
            [
                flops / o / (peak_flops / p)
                for o, p in zip(times["ours"], times["peak"], strict=True)
            ]
        ),
    }
    del ours, torch_step
    if "meta" in sections:
        results["meta"] = meta_section(cfg, sz, log)
    if "masking" in sections:
        results["masking"] = masking_section(cfg, sz, b / t_ours, log)
    if "generation" in sections:
        results["generation"] = generation_section(cfg, sz, log)
    return results


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
    t_plain = _median(times["plain"])
    c: dict[str, Any] = {"plain_s": t_plain, "times": times, "timed_k": sorted(metas)}
    plain_flops = _xla_flops(plain.compiled)
    for k in metas:
        c[f"meta_k{k}_s"] = _median(times[f"meta_k{k}"])
        c[f"meta_k{k}_over_plain"] = c[f"meta_k{k}_s"] / t_plain
        # The work ratio (XLA's FLOP count): the time ratio it implies at equal efficiency.
        # Exact for K = 1; XLA counts a scan (while loop) body once, so K > 1 is undercounted.
        c[f"meta_k{k}_flops_over_plain"] = _xla_flops(metas[k].compiled) / plain_flops
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


def masking_section(cfg, sz: BenchSizes, consumed: float, log: Callable[[str], None]) -> dict:
    """(d): host mask generation per policy against `consumed` sentences/s of the step."""
    log(f"timing mask generation x{sz.repeats} ...")
    mask_fns = make_mask_fns(sz, cfg)
    times = interleave(mask_fns, sz.repeats)
    d = {"train_sentences_per_s": consumed, "times": times, "policies": {}}
    for name in mask_fns:
        per_s = 1.0 / _median(times[name])
        d["policies"][name] = {"sentences_per_s": per_s, "over_train": per_s / consumed}
    return d


def generation_section(cfg, sz: BenchSizes, log: Callable[[str], None]) -> dict:
    """(e): greedy and beam search output tokens/s."""
    log(f"timing generation x{sz.repeats} ...")
    gen_fns = make_gen_fns(cfg, sz)
    times = interleave(gen_fns, sz.repeats)
    e: dict[str, Any] = {"times": times, "batch": sz.gen_batch, "max_length": sz.gen_len}
    e["searches"] = {
        name: {"s": _median(t), "tokens_per_s": sz.gen_batch * sz.gen_len / _median(t)}
        for name, t in times.items()
    }
    return e


def machine_info() -> dict:
    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else "unknown"
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    info["cores"] = os.cpu_count()
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return info


def _fmt(x: float, unit: str = "") -> str:
    if x >= 1e9:
        return f"{x / 1e9:.1f} G{unit}"
    if x >= 1e6:
        return f"{x / 1e6:.1f} M{unit}"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k{unit}"
    return f"{x:.3g} {unit}".strip()


def table(res: dict) -> str:
    """The markdown table of a results dict."""
    sz, a, m = res["sizes"], res["train_vs_torch"], res["mfu"]
    cfgs = (
        f"d_model {sz['d_model']}, {sz['layers']}+{sz['layers']} layers, vocab {sz['vocab']}, "
        f"seq {sz['seq']}+{sz['seq']}, batch {sz['batch']}, {sz['dtype']}"
    )
    rows = [
        "| measurement | value | target |",
        "|---|---|---|",
        f"| (a) ours train step ({cfgs}) | {_fmt(a['ours_tokens_per_s'])} tokens/s "
        f"({a['ours_s'] * 1e3:.0f} ms/step) | |",
    ]
    if "ratio" in a:
        rows += [
            f"| (a) PyTorch {a['torch_version']} BART + AdamW ({a['torch_threads']} threads) | "
            f"{_fmt(a['torch_tokens_per_s'])} tokens/s ({a['torch_s'] * 1e3:.0f} ms/step, "
            f"MFU {a['torch_mfu']:.0%}) | |",
            f"| (a) ours / PyTorch | **{a['ratio']:.2f}x** (median of per-repeat ratios "
            f"{a['ratio_paired_median']:.2f}x) | >= 1.3x |",
        ]
    else:
        rows.append(f"| (a) PyTorch | {a['torch']} | |")
    rows += [
        f"| (b) matmul peak (float32 {m['peak_matmul_n']}^2 jnp.dot) | "
        f"{_fmt(m['peak_flops_per_s'], 'FLOP/s')} | |",
        f"| (b) model FLOP/s (analytical {_fmt(m['model_flops_per_step'], 'FLOP')}/step; "
        f"XLA cost_analysis {m['xla_over_model']:.2f}x that) | "
        f"{_fmt(m['model_flops_per_s'], 'FLOP/s')} | |",
        f"| (b) MFU | **{m['mfu']:.0%}** (median of per-repeat MFUs {m['mfu_paired_median']:.0%}) "
        "| >= 70% |",
    ]
    if "meta" in res:
        rows += _meta_rows(res["meta"], sz)
    if "masking" in res:
        rows += _masking_rows(res["masking"], sz)
    if "generation" in res:
        rows += _generation_rows(res["generation"], sz)
    return "\n".join(rows)


def _meta_rows(c: dict, sz: dict) -> list[str]:
    rows = [
        f"| (c) plain step, inner batch {sz['meta_batch']}x{sz['meta_len']} | "
        f"{c['plain_s'] * 1e3:.0f} ms | |",
    ]
    for k in c["timed_k"]:
        rows.append(
            f"| (c) meta step K={k} (second order, remat) | {c[f'meta_k{k}_s'] * 1e3:.0f} ms "
            f"= **{c[f'meta_k{k}_over_plain']:.2f}x** plain"
            + (f" (XLA FLOPs {c['meta_k1_flops_over_plain']:.2f}x)" if k == 1 else "")
            + f" | {'<= 3x' if k == 1 else ''} |"
        )
    mems = ", ".join(f"K={k}: {v['peak'] / 2**20:.0f}" for k, v in c["memory_bytes"].items())
    rows += [
        f"| (c) compiled peak memory, MiB ({mems}; plain step "
        f"{c['plain_memory_bytes']['peak'] / 2**20:.0f}) | K={max(sz['meta_k'])} / K=1 = "
        f"**{c['memory_kmax_over_k1']:.2f}x** | <= 1.5x |",
    ]
    return rows


def _masking_rows(d: dict, sz: dict) -> list[str]:
    rows = [f"| (d) train step (a) consumes | {d['train_sentences_per_s']:.1f} sentences/s | |"]
    for name, p in d["policies"].items():
        rows.append(
            f"| (d) masking `{name}` (scorer+sampler+corrupt, batch {sz['mask_batch']}) | "
            f"{_fmt(p['sentences_per_s'])} sentences/s = **{p['over_train']:.0f}x** | >= 10x |"
        )
    return rows


def _generation_rows(g: dict, sz: dict) -> list[str]:
    rows = []
    for name, r in g["searches"].items():
        rows.append(
            f"| (e) generate {name}, batch {g['batch']}, src {sz['gen_src']}, "
            f"{g['max_length']} tokens | {_fmt(r['tokens_per_s'])} tokens/s | |"
        )
    return rows


def parse_args(argv: list[str] | None) -> tuple[BenchSizes, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m meta_mask.bench", description=__doc__.split("\n")[0]
    )
    defaults = BenchSizes()
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds); for tests")
    for f in dataclasses.fields(BenchSizes):
        if f.name == "meta_k":
            p.add_argument("--meta_k", type=str, default=None, help="comma-separated K values")
        else:
            p.add_argument(f"--{f.name}", type=type(getattr(defaults, f.name)), default=None)
    p.add_argument("--out", default="", help="write the results JSON here")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {SECTIONS} (train always runs: the others compare to it)",
    )
    args = p.parse_args(argv)
    sz = quick_sizes() if args.quick else defaults
    over = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(BenchSizes)
        if getattr(args, f.name) is not None
    }
    if isinstance(over.get("meta_k"), str):
        over["meta_k"] = tuple(int(x) for x in over["meta_k"].split(","))
    sz = dataclasses.replace(sz, **over)
    if not args.quick and sz.repeats < 5:
        p.error(f"--repeats={sz.repeats}: use >= 5 (medians of interleaved repeats)")
    args.sections = tuple(x for x in args.sections.split(",") if x)
    bad = [x for x in args.sections if x not in SECTIONS]
    if bad:
        p.error(f"--sections has {bad}; valid: {SECTIONS}")
    if 1 not in sz.meta_k:
        p.error(f"--meta_k={sz.meta_k} must include 1 (the memory ratio's denominator)")
    return sz, args


def main(argv: list[str] | None = None) -> int:
    sz, args = parse_args(argv)
    _xla_flags()
    t0 = time.time()
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    res = run(sz, with_torch=not args.no_torch, sections=args.sections, log=log)
    res["wall_s"] = time.time() - t0
    res["machine"]["load_average_end"] = list(os.getloadavg())
    md = table(res)
    res["table"] = md
    print(md)
    print(
        f"\nmachine: {res['machine']['cpu']}, {res['machine']['cores']} cores, load average "
        f"{res['machine']['load_average']} (start) {res['machine']['load_average_end']} (end); "
        f"jax {res['machine']['jax']}; {res['wall_s']:.0f} s"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
