"""Device memory read bandwidth, measured the way ``lowbit bench`` measures the host's: a parallel sum that reads a
large array once (each block sums a grid-stride slice into shared memory, one partial per block)."""

from __future__ import annotations

import time

import numpy as np
from numba import cuda, float32

from lowbit.kernels.cuda.quant import GRID_CAP, THREADS, block_sum


@cuda.jit
def _partial_sums(a, out):
    buf = cuda.shared.array(THREADS, float32)
    tid = cuda.threadIdx.x
    acc = float32(0.0)
    i = cuda.blockIdx.x * THREADS + tid
    stride = cuda.gridDim.x * THREADS
    while i < a.shape[0]:
        acc += a[i]
        i += stride
    buf[tid] = acc
    cuda.syncthreads()
    total = block_sum(buf, tid)
    if tid == 0:
        out[cuda.blockIdx.x] = total


def device_sum(a) -> float:
    """Sum of a device float32 vector (the partials are added on the host)."""
    blocks = max(1, min(GRID_CAP, -(-a.shape[0] // THREADS)))
    out = cuda.device_array(blocks, dtype=np.float32)
    _partial_sums[blocks, THREADS](a, out)
    return float(out.copy_to_host().astype(np.float64).sum())


def device_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of the device-side sum over ``gib`` GiB (best of ``repeats``)."""
    a = cuda.to_device(np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32))
    device_sum(a[:1024])
    best = float("inf")
    for _ in range(repeats):
        cuda.synchronize()
        t0 = time.perf_counter()
        device_sum(a)
        cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best
