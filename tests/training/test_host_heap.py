"""Tests for meta_mask.training.host_heap: with it, a large block comes from the heap (no
mmap) and stays there after free; without it glibc maps and unmaps the block. Each case runs in
its own process: the setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meta_mask.training import host_heap

# malloc a block (64 MiB, or 128 MiB on a new thread: more than a thread arena's 64 MiB heap),
# free it; report the bytes in mmapped chunks while it is held and the heap's free bytes after it
# is freed (glibc's mallinfo2). Modes: off; thresholds (only the mmap / trim thresholds, as
# keep_freed_buffers set them before it also limited the arenas); on (keep_freed_buffers).
_PROBE = """
import ctypes, json, sys, threading
from meta_mask.training import host_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
mode, on_thread = sys.argv[1], sys.argv[2] == "thread"
applied = host_heap.keep_freed_buffers() if mode == "on" else False
if mode == "thresholds":
    applied = bool(libc.mallopt(-3, 1 << 30) and libc.mallopt(-1, 1 << 30))
out = {"applied": applied}

def work():
    size = (128 if on_thread else 64) << 20
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    out["mapped"] = libc.mallinfo2().hblkhd - before
    libc.free(block)
    out["kept"] = libc.mallinfo2().fordblks

if on_thread:
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
else:
    work()
print(json.dumps(out))
"""

MIB = 1 << 20


def _probe(mode: str, where: str = "main") -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, where], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def _has_mallinfo2() -> bool:
    import ctypes

    libc = host_heap._glibc()
    return libc is not None and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_a_large_block_stays_in_the_heap_only_with_the_setting():
    default, kept = _probe("off"), _probe("on")
    assert not default["applied"] and kept["applied"]
    # Without the setting the 64 MiB block is its own mapping, gone after free.
    assert default["mapped"] >= 64 * MIB and default["kept"] < 64 * MIB
    # With it the block is heap memory, still held (free) after free: the next step reuses it.
    assert kept["mapped"] < MIB and kept["kept"] >= 64 * MIB


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_a_large_block_of_another_thread_stays_in_the_heap_only_with_the_arena_limit():
    # XLA CPU runs a step on its own threads. A thread's arena is a heap of at most 64 MiB, so
    # a larger block is mapped whatever the thresholds; with one arena it comes from the main
    # heap and stays there.
    default, thresholds, kept = (_probe(m, "thread") for m in ("off", "thresholds", "on"))
    assert thresholds["applied"] and kept["applied"]
    assert default["mapped"] >= 128 * MIB and thresholds["mapped"] >= 128 * MIB
    assert thresholds["kept"] < 128 * MIB
    assert kept["mapped"] < MIB and kept["kept"] >= 128 * MIB


def test_bad_threshold_is_rejected():
    with pytest.raises(ValueError, match="threshold_bytes"):
        host_heap.keep_freed_buffers(0)
    with pytest.raises(ValueError, match="threshold_bytes"):
        host_heap.keep_freed_buffers(2**31)
