"""Keep freed host memory in the process's heap, so that a step does not page-fault it back in.

On a CPU backend XLA runs each compiled step out of one temporary allocation (the buffers its
buffer assignment packs together), taken with malloc and freed when the step ends. glibc serves
a block larger than its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap and unmaps it
on free, so every step touches new pages: one page fault per 4 KiB, every step, paid as system
time. Raising the mmap and trim thresholds (glibc's mallopt) keeps such blocks in the heap
between steps. Measured on `--sweep.policies=salient_spans` of the main job (the intermediate
stage and the fine-tune, generic LM cached), results bit-identical either way:

    2-core AMD EPYC, AVX-512:   page faults 16.6 M -> 2.9-5.2 M, system 43-45 s -> 9-17 s,
                                wall 101-106 s -> 75-91 s
    2-core AMD EPYC, AVX2 only: page faults 16.2 M -> 2.2-3.4 M, system 61 s -> 17-19 s,
                                wall 145-147 s -> 121-128 s

On a 2-core Intel Xeon the whole main job's system time fell 211 s -> 44 s while its wall time
did not change, so the gain depends on the CPU.

The thresholds cover only blocks malloc'ed by the main thread. XLA CPU runs a step on threads
of its own, and glibc gives every new thread an arena of its own whose heaps hold at most
64 MiB: a larger block there is mapped and unmapped whatever the thresholds. So the arenas
are limited to one (the main heap, which grows without such a bound). Measured on the 2-core
AVX2 EPYC, `python -m bench --sections=train --no_torch --repeats=5` (a step whose temporaries
exceed 64 MiB: d_model 256, 4+4 layers, vocab 8192, batch 16 x 128), thresholds only against
thresholds and one arena: page faults 3.4 M -> 0.3-1.5 M, system time 10-11 s -> 2-10 s, ms per
step 1761 / 1763 (two runs) -> 1328-1496 in five of six runs (the sixth 1773, 1.5 M faults; the
faults vary from run to run, also when the call comes before any import). The main job's
salient-spans run (as above): page faults 2.2-3.4 M -> 0.2 M, system 17-19 s -> 9 s, wall 127 s
(unchanged), results bit-identical.

The call is process-wide, so only the command lines make it (meta_mask.train, bench), before
any jax computation; the library never does. Elsewhere than glibc (macOS, musl) it does
nothing.
"""

from __future__ import annotations

import ctypes
import sys

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8  # threads that allocate after this share the main arena

DEFAULT_THRESHOLD_BYTES = 1 << 30


def keep_freed_buffers(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Serve blocks up to threshold_bytes from the heap, keep up to that much freed memory at
    its top, and let every thread allocate from the one main heap; True when glibc accepted
    all three settings. Threads that already have an arena keep it, so call it first."""
    if not 0 < threshold_bytes < 2**31:
        raise ValueError(f"threshold_bytes={threshold_bytes}: must be in (0, 2**31)")
    libc = _glibc()
    if libc is None:
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes)
    arena_ok = libc.mallopt(_M_ARENA_MAX, 1)
    return bool(mmap_ok and trim_ok and arena_ok)


def _glibc():
    """The process's C library when it is glibc (it names its version), else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc
