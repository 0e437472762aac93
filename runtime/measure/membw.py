"""Memory read bandwidth, the roofline of decode: parallel sums that stream memory once.

``read_bandwidth`` sums a fresh 1 GiB array (the issue's reference method). ``mapped_read_bandwidth`` sums the very
bytes decode reads, a container's file mapping, so that `lowbit bench` can probe the bandwidth between decode steps
without allocating anything (the decode phase's peak RSS stays the runtime's own).
"""

from __future__ import annotations

import time

import numba as nb
import numpy as np


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _parallel_sum(a):
    """sum of a: f32[n] or u32[n] (wrapping integer adds: any bit pattern of a mapped file costs the same), read
    once by all threads."""
    s = a[0] - a[0]
    for i in nb.prange(a.shape[0]):
        s += a[i]
    return s


def _best_rate(fn, a, repeats: int) -> float:
    fn(a[:1024])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(a)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of a parallel sum over ``gib`` GiB (best of ``repeats``)."""
    return _best_rate(_parallel_sum, np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32), repeats)


def mapped_read_bandwidth(file_bytes: np.ndarray, repeats: int = 2) -> float:
    """Bytes per second of a parallel sum over a mapped file (uint8 array; its first multiple of 4 bytes)."""
    n = file_bytes.size // 4 * 4
    return _best_rate(_parallel_sum, file_bytes[:n].view(np.uint32), repeats)
