"""Per-HLO-op profile of our compiled train step: `python -m bench.profile` (repository root).

Traces a few steps of `bench.train_step.OurStep` with `jax.profiler` (a perfetto trace), sums
each XLA CPU thunk's self time (a thunk's time less that of thunks nested in it, e.g. a while
loop's body) over the traced steps, and names every thunk's category from the compiled HLO:
the fusion's own `op_name` metadata and whether it computes a dot. Prints the categories and the
top ops with their share of all op time (ops of the two XLA threads overlap, so op time can
exceed wall time), and writes the rows as JSON with --out.

    python -m bench.profile                      # the benchmark config (bench/sizes.py)
    python -m bench.profile --quick --steps=1    # tiny sizes (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile

from bench.sizes import BenchSizes, model_config, quick_sizes

# (category, op_name pattern) for the thunks that compute no dot, first match wins. Thunks
# with a vocabulary-sized dimension are "logits + cross-entropy" whatever their name.
_CATEGORIES = (
    ("dropout rng", re.compile(r"Dropout|threefry|random_bits|random_wrap")),
    ("attention softmax/mask", re.compile(r"(self_attn|encoder_attn)/")),
    ("layer norm", re.compile(r"layer_?norm")),
    ("embedding", re.compile(r"token_embedding|embed_positions")),
    ("activation", re.compile(r"erf|gelu|tanh|logistic")),
)
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*)$")
_OPERANDS = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_COMP = re.compile(r"^%([\w.\-]+) ")


@dataclasses.dataclass
class _Instr:
    opcode: str
    op_name: str
    calls: str
    dims: set  # every dimension size of its result and operands
    flops: float  # of a dot; for a fusion, of the dots it calls


def _parse(hlo: str) -> dict[str, _Instr]:
    """Every instruction of the HLO module text, fusion FLOPs summed from the dots inside."""
    instrs, shapes, lines, owner, current = {}, {}, {}, {}, ""
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            current = m.group(1)
            continue
        m = _INSTR.match(line)
        if m:
            shapes[m.group(1)] = [int(d) for d in m.group(3).split(",") if d]
            lines[m.group(1)], owner[m.group(1)] = m, current
    inner: dict[str, list[_Instr]] = collections.defaultdict(list)
    for name, m in lines.items():
        args = m.group(5).split(")", 1)[0]
        operands = [o for o in _OPERANDS.findall(args) if o in shapes]
        dims = set(shapes[name]).union(*(shapes[o] for o in operands))
        op_name, calls = _OP_NAME.search(m.group(0)), _CALLS.search(m.group(0))
        flops = 0.0
        if m.group(4) in ("dot", "convolution"):
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", m.group(0))
            k = 1
            for d in contracting.group(1).split(",") if contracting else []:
                k *= shapes[operands[0]][int(d)] if d else 1
            flops = 2.0 * k * math.prod(shapes[name])
        instr = _Instr(
            m.group(4),
            op_name.group(1) if op_name else "",
            calls.group(1) if calls else "",
            dims,
            flops,
        )
        instrs[name] = instr
        if flops:
            inner[owner[name]].append(instr)
    for instr in instrs.values():  # a fusion computes the dots of the computation it calls
        if not instr.flops and instr.calls in inner:
            dots = inner[instr.calls]
            instr.flops = sum(d.flops for d in dots)
            instr.dims = instr.dims.union(*(d.dims for d in dots))
            instr.op_name = dots[0].op_name
            instr.opcode = "dot"
    return instrs


def categorize(hlo: str, vocab: int) -> dict[str, tuple[str, float]]:
    """Each HLO instruction name -> (category, matmul FLOPs it computes)."""
    out = {}
    for name, ins in _parse(hlo).items():
        if ins.flops:
            if vocab in ins.dims:
                kind = "LM head"
            elif re.search(r"attn/b\w+,b\w+->", ins.op_name):
                kind = "attention"
            else:
                kind = "dense"
            out[name] = (f"matmul: {kind}", ins.flops)
        elif vocab in ins.dims:
            out[name] = ("logits + cross-entropy", 0.0)
        elif not ins.op_name:
            layout = ins.opcode in ("copy", "transpose")
            out[name] = ("copy / layout" if layout else "other", 0.0)
        elif "jvp(" not in ins.op_name and "transpose(" not in ins.op_name:
            out[name] = ("optimizer + grad norm", 0.0)
        else:
            cat = next((c for c, pat in _CATEGORIES if pat.search(ins.op_name)), "other")
            out[name] = (cat, 0.0)
    return out


def module_name(hlo: str) -> str:
    """The name of a compiled HLO module (what the trace's thunks carry as `hlo_module`)."""
    return hlo.split(None, 2)[1].rstrip(",")


def self_times(trace_file: str, module: str) -> dict[str, float]:
    """Thunk name -> summed self time (microseconds) of HLO module `module`'s thunks, over the
    XLA threads of a perfetto trace."""
    with gzip.open(trace_file) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    threads: dict[int, list] = collections.defaultdict(list)
    for e in events:
        # XLA thunks carry their HLO op and module; python frames and executor spans do not.
        args = e.get("args", {})
        if e.get("ph") == "X" and "hlo_op" in args and args.get("hlo_module") == module:
            threads[e["tid"]].append(e)
    totals: dict[str, float] = collections.Counter()
    for evs in threads.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []  # open spans; a child's time is taken off its parent
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                totals[stack[-1]["name"]] -= e["dur"]
            totals[e["name"]] += e["dur"]
            stack.append(e)
    return dict(totals)


def summarize(times: dict[str, float], cats: dict[str, tuple[str, float]], steps: int) -> dict:
    """Per-category and per-op ms/step, share of op time and (for matmuls) GFLOP/s."""
    total = sum(times.values())
    by_cat: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for name, us in times.items():
        cat, flops = cats.get(name, ("other", 0.0))
        by_cat[cat][0] += us
        by_cat[cat][1] += flops * steps
    categories = {
        c: {
            "ms_per_step": us / steps / 1e3,
            "share": us / total,
            "gflop_per_step": flops / steps / 1e9,
            "gflop_per_s": flops / us / 1e3 if flops else None,
        }
        for c, (us, flops) in sorted(by_cat.items(), key=lambda kv: -kv[1][0])
    }
    ops = [
        {
            "op": n,
            "category": cats.get(n, ("other", 0.0))[0],
            "ms_per_step": us / steps / 1e3,
            "share": us / total,
            "gflop": cats.get(n, ("other", 0.0))[1] / 1e9,
        }
        for n, us in sorted(times.items(), key=lambda kv: -kv[1])
    ]
    return {"op_ms_per_step": total / steps / 1e3, "categories": categories, "ops": ops}


def profile(sz: BenchSizes, steps: int, trace_dir: str) -> dict:
    """Trace `steps` steps of our train step and as many matmul-peak dots (bench/train_step.py's
    make_peak: peak_n^2 in the step's dtype); per-op and per-category times per step, and each
    matmul category's rate as a fraction of the peak's, both timed from the same trace."""
    import jax
    import jax.numpy as jnp

    from bench.sizes import synthetic_batch
    from bench.train_step import OurStep

    cfg = model_config(sz)
    ours = OurStep(cfg, synthetic_batch(cfg, sz.batch, sz.seq, sz.seq), 1)
    ours.run()
    n = sz.peak_n
    a = jax.random.normal(jax.random.key(0), (n, n), sz.dtype)
    dot = jax.jit(jnp.dot).lower(a, a).compile()
    dot(a, a).block_until_ready()
    load_before = os.getloadavg()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    wall = [ours.run() for _ in range(steps)]
    for _ in range(steps):
        dot(a, a).block_until_ready()
    jax.profiler.stop_trace()
    load_after = os.getloadavg()
    trace = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    hlo = ours.compiled.as_text()
    with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as f:
        f.write(hlo)
    peak_us = sum(self_times(trace, module_name(dot.as_text())).values())
    peak = 2.0 * n**3 * steps / (peak_us * 1e-6)
    res = summarize(self_times(trace, module_name(hlo)), categorize(hlo, sz.vocab), steps)
    for v in res["categories"].values():
        v["of_peak"] = v["gflop_per_s"] * 1e9 / peak if v["gflop_per_s"] else None
    return {
        "sizes": dataclasses.asdict(sz),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "steps": steps,
        "wall_s_per_step": wall,
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "peak_flops_per_s": peak,
        **res,
    }


def report(res: dict, top: int) -> str:
    lines = [
        f"wall s/step {', '.join(f'{w:.3f}' for w in res['wall_s_per_step'])}; op time "
        f"{res['op_ms_per_step']:.0f} ms/step (summed over XLA's threads); load average "
        f"{res['load_average_before'][0]:.2f} -> {res['load_average_after'][0]:.2f}; matmul "
        f"peak ({res['sizes']['dtype']} {res['sizes']['peak_n']}^2 dot, same trace) "
        f"{res['peak_flops_per_s'] / 1e9:.0f} GFLOP/s",
        "",
        "| category | ms/step | share | GFLOP/step | GFLOP/s | of peak |",
        "|---|---|---|---|---|---|",
    ]
    for c, v in res["categories"].items():
        rate = f"{v['gflop_per_s']:.0f}" if v["gflop_per_s"] else ""
        of_peak = f"{v['of_peak']:.0%}" if v["of_peak"] else ""
        lines.append(
            f"| {c} | {v['ms_per_step']:.1f} | {v['share']:.1%} | {v['gflop_per_step']:.2f} "
            f"| {rate} | {of_peak} |"
        )
    lines += ["", "| op | category | ms/step | share |", "|---|---|---|---|"]
    for r in res["ops"][:top]:
        lines.append(f"| {r['op']} | {r['category']} | {r['ms_per_step']:.1f} | {r['share']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds); for tests")
    defaults = BenchSizes()
    for f in ("d_model", "layers", "heads", "ffn_dim", "vocab", "seq", "batch", "dtype"):
        p.add_argument(f"--{f}", type=type(getattr(defaults, f)), default=None)
    p.add_argument("--steps", type=int, default=3, help="steps traced")
    p.add_argument("--top", type=int, default=30, help="ops listed")
    p.add_argument("--trace_dir", default="", help="keep the trace here (default: a temp dir)")
    p.add_argument("--out", default="", help="write the rows as JSON here")
    args = p.parse_args(argv)
    sz = quick_sizes() if args.quick else defaults
    over = {
        f: getattr(args, f)
        for f in ("d_model", "layers", "heads", "ffn_dim", "vocab", "seq", "batch", "dtype")
        if getattr(args, f) is not None
    }
    sz = dataclasses.replace(sz, **over)
    with tempfile.TemporaryDirectory() as tmp:
        res = profile(sz, args.steps, args.trace_dir or tmp)
    print(report(res, args.top))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
