"""Quantized weights on the device: one kernel family, specialised per quant type.

``kernels_for(qtype, cols)`` returns the :class:`QKernels` of a (bits, group, asym) combination (or of float weights),
built by a cached factory that closes over the layout constants of ``formats/qtypes.py``: the bit planes, their byte
offsets inside a group and the zero point. Every kernel reads the packed uint8 codes and the fp16 scales/mins straight
from device memory and dequantizes each weight in registers (codes widened to int32 before any arithmetic); no
dequantized copy of a matrix is ever made.

Launch shape: one block of ``THREADS`` threads per ``PER_BLOCK`` output rows (matvec, gather), or per (rows, tile of
``TILE`` tokens) (matmul); threads stride over a row's elements and the partial sums meet in a shared-memory tree
reduction.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import cuda

from lowbit.formats.qtypes import PLANES, QType

_SIM = bool(numba.config.ENABLE_CUDASIM)
# threads per block (a power of two). The simulator runs every thread of a block as a Python thread and each block in
# turn, so there a block gets few threads and works through several rows (PER_BLOCK), one after another; the code
# paths are the same, only the launch constants differ
THREADS = 4 if _SIM else 128
PER_BLOCK = 16 if _SIM else 1  # rows (matvec, matmul, gather, rmsnorm) or (query, head) pairs per block
GRID_CAP = 2 if _SIM else 4096  # most blocks of a grid-stride elementwise launch
TILE = 8  # tokens per block in the batched (prefill) matmul: each dequantized weight is used TILE times


@cuda.jit(device=True, inline=True)
def block_sum(buf, tid):
    """Tree reduction of buf[THREADS] (shared); every thread gets the total."""
    step = THREADS // 2
    while step > 0:
        cuda.syncthreads()
        if tid < step:
            buf[tid] += buf[tid + step]
        step //= 2
    cuda.syncthreads()
    total = buf[0]
    cuda.syncthreads()
    return total


def make_loader(bits: int, g: int, asym: bool):
    """Device function ``load(codes, scales, mins, r, e) -> float32``: element e of row r of a quantized matrix."""
    planes = PLANES[bits]
    if len(planes) > 2:
        raise ValueError(f"{bits}-bit codes have {len(planes)} planes; the CUDA loader handles at most two")
    p0 = planes[0]
    p1 = planes[1] if len(planes) == 2 else 0
    nb0 = g * p0 // 8  # bytes of plane 0 in one group (= elements per k-slice)
    nb1 = g * p1 // 8 if p1 else 1
    m0 = (1 << p0) - 1
    m1 = (1 << p1) - 1 if p1 else 0
    gbytes = g * bits // 8
    zp = np.float32(1 << (bits - 1))
    two = p1 > 0

    @cuda.jit(device=True, inline=True)
    def load(codes, scales, mins, r, e):
        gi = e // g
        i = e - gi * g
        base = gi * gbytes
        k = i // nb0
        u = (np.int32(codes[r, base + i - k * nb0]) >> (k * p0)) & m0
        if two:
            k1 = i // nb1
            u |= ((np.int32(codes[r, base + nb0 + i - k1 * nb1]) >> (k1 * p1)) & m1) << p0
        d = np.float32(scales[r, gi])
        if asym:
            return d * np.float32(u) - np.float32(mins[r, gi])
        return d * (np.float32(u) - zp)

    return load


@cuda.jit(device=True, inline=True)
def load_float(data, scales, mins, r, e):
    """Float weights: data f32[rows, cols]; scales and mins are unused placeholders."""
    return data[r, e]


@dataclass(frozen=True)
class QKernels:
    """Kernels of one weight encoding. Arrays: codes u8[rows, cols*bits/8] (or data f32[rows, cols] for floats),
    scales f16[rows, ng], mins f16[rows, ng] (placeholder [1, 1] when symmetric), bias f32[rows]."""

    matvec: object  # [blocks(rows)](y f32[rows], codes, scales, mins, bias, x f32[cols], cols)
    matmul: object  # [(blocks(rows), ceil(T/TILE))](Y f32[T, rows], codes, scales, mins, bias, X f32[T, cols], cols)
    gather: object  # [blocks(n)](out f32[n, cols], codes, scales, mins, ids i64[n], cols)


def make_family(load) -> QKernels:
    """The kernel family over one element loader."""

    @cuda.jit
    def matvec(y, codes, scales, mins, bias, x, cols):
        tid = cuda.threadIdx.x
        buf = cuda.shared.array(THREADS, numba.float32)
        r0 = cuda.blockIdx.x * PER_BLOCK
        for r in range(r0, min(r0 + PER_BLOCK, y.shape[0])):
            acc = numba.float32(0.0)
            for e in range(tid, cols, THREADS):
                acc += load(codes, scales, mins, r, e) * x[e]
            buf[tid] = acc
            total = block_sum(buf, tid)
            if tid == 0:
                y[r] = total + bias[r]

    @cuda.jit
    def matmul(y, codes, scales, mins, bias, x, cols):
        t0 = cuda.blockIdx.y * TILE
        tid = cuda.threadIdx.x
        nt = min(TILE, x.shape[0] - t0)
        buf = cuda.shared.array((TILE, THREADS), numba.float32)
        acc = cuda.local.array(TILE, numba.float32)
        r0 = cuda.blockIdx.x * PER_BLOCK
        for r in range(r0, min(r0 + PER_BLOCK, y.shape[1])):
            for j in range(TILE):
                acc[j] = 0.0
            for e in range(tid, cols, THREADS):
                w = load(codes, scales, mins, r, e)
                for j in range(nt):
                    acc[j] += w * x[t0 + j, e]
            for j in range(TILE):
                buf[j, tid] = acc[j]
            step = THREADS // 2
            while step > 0:
                cuda.syncthreads()
                if tid < step:
                    for j in range(TILE):
                        buf[j, tid] += buf[j, tid + step]
                step //= 2
            cuda.syncthreads()
            for j in range(tid, nt, THREADS):
                y[t0 + j, r] = buf[j, 0] + bias[r]
            cuda.syncthreads()  # buf is reused by the next row

    @cuda.jit
    def gather(out, codes, scales, mins, ids, cols):
        n0 = cuda.blockIdx.x * PER_BLOCK
        for n in range(n0, min(n0 + PER_BLOCK, out.shape[0])):
            r = ids[n]
            for e in range(cuda.threadIdx.x, cols, THREADS):
                out[n, e] = load(codes, scales, mins, r, e)

    return QKernels(matvec, matmul, gather)


@functools.lru_cache(maxsize=None)
def _family(bits: int, g: int, asym: bool) -> QKernels:
    return make_family(make_loader(bits, g, asym))


@functools.lru_cache(maxsize=1)
def _float_family() -> QKernels:
    return make_family(load_float)


def kernels_for(qt: QType, cols: int) -> QKernels:
    """The kernels for a weight of type ``qt`` with ``cols`` columns (per-channel groups span the row)."""
    if qt.is_float:
        return _float_family()
    return _family(qt.bits, qt.layout_group(cols), qt.asym)


def blocks(n: int) -> int:
    """Blocks for n rows (or items) at PER_BLOCK per block."""
    return max(1, math.ceil(n / PER_BLOCK))


def matmul_grid(rows: int, t: int) -> tuple[int, int]:
    return blocks(rows), math.ceil(t / TILE)
