"""Decode kernels specialised per quant type (a cached factory), for the types where specialisation pays.

``make_qmatvec(bits, g, asym)`` compiles a fused dequantize-and-dot whose plane widths, group size and lane count
are compile-time constants. Each row keeps one float accumulator per byte lane of a group (``acc[j] += d * t_j``)
and reduces once per row instead of once per group; LLVM turns the fixed-length lane loops into whole-register
SIMD. That needs at least 32 lanes (bytes per group of one plane): 4-bit with g >= 64, 8-bit, 2-bit g128. The
other types keep the generic plane loop of ``kernels.cpu.qmatvec``.
"""

from __future__ import annotations

from functools import lru_cache

import numba as nb
import numpy as np

from lowbit.formats.qtypes import PLANES
from lowbit.kernels.cpu import _JIT, _h2f

MIN_LANES = 32


def specialised(bits: int, g: int) -> bool:
    """Whether make_qmatvec has a specialised kernel for this type (g: elements per group)."""
    planes = PLANES[bits]
    return len(planes) == 1 and g in (32, 64, 128) and g * planes[0] // 8 >= MIN_LANES


@lru_cache(maxsize=None)
def make_qmatvec(bits: int, g: int, asym: bool):
    """y[rows] = W @ x for one token; call as ``f(y, codes, scales, mins, x)`` with the arguments of
    ``kernels.cpu.qmatvec`` (y: f32[rows]; codes: u8[rows, cols*bits/8]; scales, mins: u16[rows, ng]; x: f32[cols])."""
    if not specialised(bits, g):
        raise ValueError(f"no specialised kernel for {bits}-bit groups of {g}")
    (p,) = PLANES[bits]
    n = 8 // p  # codes per byte
    lanes = g // n  # bytes per group
    mask = (1 << p) - 1
    zp = np.float32(0 if asym else 1 << (bits - 1))

    @nb.njit(parallel=True, **_JIT)
    def qmatvec(y, codes, scales, mins, x):
        rows = codes.shape[0]
        ng = scales.shape[1]
        xs = np.empty(ng, dtype=np.float32)  # per-group activation sums, once per token
        for gi in range(ng):
            s = np.float32(0.0)
            for j in range(g):
                s += x[gi * g + j]
            xs[gi] = s
        for r in nb.prange(rows):
            crow = codes[r]
            acc = np.zeros(lanes, dtype=np.float32)
            macc = np.float32(0.0)
            for gi in range(ng):
                d = _h2f(scales[r, gi])
                if asym:
                    macc += _h2f(mins[r, gi]) * xs[gi]
                else:
                    macc += d * zp * xs[gi]
                b0 = np.uint64(gi * lanes)
                x0 = np.uint64(gi * g)
                for j in range(lanes):
                    jj = np.uint64(j)
                    c = np.int32(crow[b0 + jj])
                    t = np.float32(0.0)
                    for k in range(n):
                        t += np.float32((c >> (k * p)) & mask) * x[x0 + np.uint64(k * lanes) + jj]
                    acc[jj] += d * t
            y[r] = acc.sum() - macc

    return qmatvec
