"""The command line of `python -m bench`: the only reader of its flags. It sets no XLA flags
(the flags measured are listed in bench/README.md); a user's XLA_FLAGS apply as given."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from bench.report import cpu_line, table
from bench.run import SECTIONS, run
from bench.sizes import BenchSizes, quick_sizes
from meta_mask.training import host_heap


def parse_args(argv: list[str] | None) -> tuple[BenchSizes, argparse.Namespace]:
    """The sizes (defaults or --quick, then any size flags) and the other flags, validated."""
    p = argparse.ArgumentParser(
        prog="python -m bench", description="Performance harness (see bench/README.md)."
    )
    defaults = BenchSizes()
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds); for tests")
    for f in dataclasses.fields(BenchSizes):
        if f.name in ("meta_k", "meta_mem_k"):
            p.add_argument(f"--{f.name}", type=str, default=None, help="comma-separated K values")
        else:
            p.add_argument(f"--{f.name}", type=type(getattr(defaults, f.name)), default=None)
    p.add_argument("--out", default="", help="write the results JSON here")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument(
        "--no_keep_host_buffers",
        action="store_true",
        help="return freed host memory to the OS as glibc does by default (meta_mask.train's "
        "--nokeep_host_buffers; see meta_mask/training/host_heap.py)",
    )
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
    for name in ("meta_k", "meta_mem_k"):
        if isinstance(over.get(name), str):
            over[name] = tuple(int(x) for x in over[name].split(","))
    sz = dataclasses.replace(sz, **over)
    if not args.quick and sz.repeats < 5:
        p.error(f"--repeats={sz.repeats}: use >= 5 (medians of interleaved repeats)")
    args.sections = tuple(x for x in args.sections.split(",") if x)
    bad = [x for x in args.sections if x not in SECTIONS]
    if bad:
        p.error(f"--sections has {bad}; valid: {SECTIONS}")
    if 1 not in sz.meta_k:
        p.error(f"--meta_k={sz.meta_k} must include 1 (the time ratios' denominator)")
    if 1 not in sz.meta_mem_k:
        p.error(f"--meta_mem_k={sz.meta_mem_k} must include 1 (the memory ratio's denominator)")
    return sz, args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table (stdout) and progress (stderr); write --out."""
    sz, args = parse_args(argv)
    # As meta_mask.train does; process-wide, so it applies to PyTorch's reference as well.
    kept = not args.no_keep_host_buffers and host_heap.keep_freed_buffers()
    t0 = time.time()
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    res = run(
        sz,
        with_torch=not args.no_torch,
        sections=args.sections,
        log=log,
        keep_host_buffers=kept,
    )
    res["wall_s"] = time.time() - t0
    res["machine"]["keep_host_buffers"] = kept
    res["machine"]["load_average_end"] = list(os.getloadavg())
    md = table(res)
    res["table"] = md
    print(md)
    unreliable = [
        k
        for k, v in res.items()
        if isinstance(v, dict) and not v.get("load", {}).get("reliable", True)
    ]
    print(
        f"\nmachine: {cpu_line(res['machine'])}; load average "
        f"{res['machine']['load_average']} (start) {res['machine']['load_average_end']} (end); "
        f"jax {res['machine']['jax']}; freed host buffers "
        f"{'kept in the heap' if kept else 'returned to the OS'}; {res['wall_s']:.0f} s"
        + (f"\nUNRELIABLE (background load > 1.5): {', '.join(unreliable)}" if unreliable else "")
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0
