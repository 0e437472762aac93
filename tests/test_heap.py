"""Freed prefill memory goes back to the system: malloc_trim after a prompt-sized forward pass."""

import ctypes
import mmap
import os
import sys

import numpy as np
import pytest

from lowbit.kernels import heap

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or heap._malloc_trim() is None, reason="glibc only")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@glibc
def test_release_free_heap_returns_freed_pages():
    """64 KiB blocks come from the heap (below the mmap threshold); with the last one still allocated the heap top
    cannot shrink, so free() alone keeps the other 63 MiB resident and only the trim returns them."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, n = 64 * 1024, 1024
    blocks = [libc.malloc(size) for _ in range(n)]
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks[:-1]:
        libc.free(b)
    before = _resident_bytes()
    assert heap.release_free_heap() is True
    after = _resident_bytes()
    libc.free(blocks[-1])
    assert before - after > 0.75 * size * (n - 1), (before, after)


def test_prompt_forward_releases_heap_and_decode_does_not(refsmall_containers, monkeypatch):
    from lowbit.kernels import ops
    from lowbit.runtime.engine import Engine

    calls = []
    monkeypatch.setattr(ops, "release_free_heap", lambda: calls.append(1) or True)  # where the CPU ops call it
    eng = Engine(refsmall_containers[4], ctx=64)
    eng.prefill(list(range(1, 33)))
    assert len(calls) == 1
    eng.step(5)
    assert len(calls) == 1
    assert np.isfinite(eng.step(6)).all()


@glibc
def test_kept_heap_serves_the_next_large_array_from_freed_pages():
    """With keep_freed_heap (the engine's setting) an 8 MiB block freed and allocated again costs no page faults
    (with glibc's defaults it is mapped afresh each time: ~2,000 faults), and the trim still returns it."""
    import resource

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    assert heap.keep_freed_heap() is True
    size = 8 << 20
    pin = libc.malloc(64)  # keeps the heap top from shrinking past the block by itself
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    again = libc.malloc(size)
    ctypes.memset(again, 2, size)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 64
    libc.free(again)
    libc.free(pin)
    before = _resident_bytes()
    assert heap.release_free_heap() is True
    assert before - _resident_bytes() > size // 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("populate", [True, False])
def test_commit_makes_an_array_resident_and_keeps_its_contents(populate, monkeypatch):
    """commit faults in every page of a fresh array at once (MADV_POPULATE_WRITE, or the page-by-page writes used
    where the kernel lacks it) and leaves every byte as it was, an array not starting on a page boundary included."""
    if not populate:
        monkeypatch.setattr(heap, "_madvise", lambda: None)
    rng = np.random.default_rng(3)
    head = rng.integers(0, 255, 4000, dtype=np.uint8)
    mem = mmap.mmap(-1, 64 << 20)  # 64 MiB of fresh anonymous memory: mapped, not yet resident
    big = np.frombuffer(mem, dtype=np.uint8)
    big[:4000] = head
    view = big[1000:].view()  # starts mid-page
    before = _resident_bytes()
    heap.commit([view, np.zeros(0, dtype=np.float32)])
    assert _resident_bytes() - before > 48 << 20
    assert np.array_equal(big[:4000], head) and not big[4000:].any()
    del view, big
