"""The machine's description and the markdown table of a results dict."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from bench.load import describe

# The CPU features XLA's and torch's float32 / bf16 kernels dispatch on.
CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
)


def machine_info() -> dict:
    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
        info["cpu"] = names[0] if names else "unknown"
        info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
        info["cpu_flags"] = []
    info["cores"] = os.cpu_count()
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return info


def cpu_line(machine: dict) -> str:
    """CPU model, cores and the SIMD features that matter, e.g. for the printed summary."""
    flags = machine.get("cpu_flags", [])
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {simd} "
        f"({' '.join(flags) if flags else 'no AVX2 / AVX-512 flags'})"
    )


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
        f"CPU: {cpu_line(res['machine'])}",
        "",
        "| measurement | value | target |",
        "|---|---|---|",
        f"| (a) + (b) section load | {describe(a['load'])} | background <= 1.5 |",
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
        f"| (b) matmul peak ({sz['dtype']} {m['peak_matmul_n']}^2 jnp.dot) | "
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
        f"| (c) section load | {describe(c['load'])} | background <= 1.5 |",
        f"| (c) plain step, inner batch {sz['meta_batch']}x{sz['meta_len']} | "
        f"{c['plain_s'] * 1e3:.0f} ms | |",
    ]
    for k in c["timed_k"]:
        load = sorted(c["loadavg"][f"meta_k{k}"])[len(c["loadavg"][f"meta_k{k}"]) // 2]
        over_k1 = (
            f"; time(K)/time(1) = **{c[f'meta_k{k}_over_k1']:.2f}** "
            f"(paired {c[f'meta_k{k}_over_k1_paired']:.2f})"
            if k > 1
            else f" (XLA FLOPs {c['meta_k1_flops_over_plain']:.2f}x)"
        )
        rows.append(
            f"| (c) meta step K={k} (second order, remat; load {load:.1f}) | "
            f"{c[f'meta_k{k}_s'] * 1e3:.0f} ms = {c[f'meta_k{k}_over_plain']:.2f}x plain"
            f"{over_k1} | {'<= 3x plain' if k == 1 else f'<= 1.2K = {1.2 * k:.1f}'} |"
        )
    mems = ", ".join(f"K={k}: {v['peak'] / 2**20:.0f}" for k, v in c["memory_bytes"].items())
    k_max = c["memory_kmax"]
    nested = c.get("memory_kmax_nested_over_k1")
    rows += [
        f"| (c) compiled peak memory, MiB ({mems}; plain step "
        f"{c['plain_memory_bytes']['peak'] / 2**20:.0f}) | K={k_max} / K=1 = "
        f"**{c['memory_kmax_over_k1']:.2f}x**"
        + (f" (nested {nested:.2f}x)" if nested is not None else "")
        + " | <= 1.5x |",
    ]
    return rows


def _masking_rows(d: dict, sz: dict) -> list[str]:
    rows = [
        f"| (d) section load | {describe(d['load'])} | background <= 1.5 |",
        f"| (d) train step (a) consumes | {d['train_sentences_per_s']:.1f} sentences/s | |",
    ]
    for name, p in d["policies"].items():
        rows.append(
            f"| (d) masking `{name}` (MlmBatches: stream, scorer, sampler, corrupt; batch "
            f"{sz['mask_batch']}) | {_fmt(p['sentences_per_s'])} sentences/s = "
            f"**{p['over_train']:.0f}x** | >= 10x |"
        )
    rows.append(
        f"| (d) pmi n-grams of the {d['corpus_sentences']}-sentence corpus "
        f"({d['pmi_ngrams']} n-grams) | found {d['pmi_build_s']:.2f} s, cached load "
        f"{d['pmi_load_s'] * 1e3:.0f} ms | |"
    )
    return rows


def _generation_rows(g: dict, sz: dict) -> list[str]:
    rows = [f"| (e) section load | {describe(g['load'])} | background <= 1.5 |"]
    for name, r in g["searches"].items():
        rows.append(
            f"| (e) generate {name}, batch {g['batch']}, src {sz['gen_src']}, "
            f"{g['max_length']} tokens | {_fmt(r['tokens_per_s'])} tokens/s | |"
        )
    return rows
