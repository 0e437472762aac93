"""Fused dequantize-and-dot kernels for decode and small batches, on int16-quantized activations.

Per token, activations are quantized per group of the weight's group size to int16 (``x ≈ dx · xq``, dx =
absmax / 32767: relative error ~1e-5, far below the weights' own) and their exact float sums ``xs`` are kept for the
min term. A row is then ``y = Σ_g d_g · dx_g · (u_g · xq_g) − m_g · xs_g``, where the integer dot ``u_g · xq_g``
is one ``kernels.simd.group_idot`` (SIMD integer multiply-add, no float conversion of the codes). One kernel body
serves every quant type with a fixed group size (32/64/128): a cached factory closes over ``bits`` and ``g``, so
each type gets its own machine code with them as constants (and its own entry in numba's on-disk cache, which keys
closures by their captured values).
Per-channel types (group = a whole row) use the plane-loop kernels of ``kernels.cpu``.
"""

from __future__ import annotations

import inspect
import math
import zlib
from functools import lru_cache

import numba as nb
import numpy as np

from lowbit.formats.qtypes import GROUP_SIZES
from lowbit.kernels.cpu import _JIT, _h2f
from lowbit.kernels.simd import group_idot, half_to_float, host_has_f16c, quad_fdot

XQ_MAX = 32767.0


def _dependency_key() -> int:
    """CRC of the modules these kernels inline code from. numba's on-disk cache checks only the kernel's own source
    file; the factory's kernels capture this value, and numba keys closures by their captured values, so an edit to
    the intrinsic or the fp16 decoder invalidates the cached kernels too."""
    from lowbit.kernels import cpu, simd

    return zlib.crc32("".join(inspect.getsource(m) for m in (cpu, simd)).encode())


_DEPS = _dependency_key()
# scale/min decoding: one hardware conversion where the CPU has it, the table-based decoder elsewhere
HAS_F16C = host_has_f16c()
h2f = half_to_float if HAS_F16C else _h2f


def specialised(bits: int, g: int) -> bool:
    """Whether the integer kernels serve this type (g: elements per group of the stored layout)."""
    return g in GROUP_SIZES


@nb.njit(**_JIT)
def quantize_activations(xq, dx, xs, x, g):
    """xq: i16[T, cols] = round(x / dx); dx, xs: f32[T, ng] scale and exact sum per group; x: f32[T, cols]."""
    t_n, cols = x.shape
    ng = cols // g
    for t in range(t_n):
        for gi in range(ng):
            amax = np.float32(0.0)
            s = np.float32(0.0)
            for j in range(g):
                v = x[t, gi * g + j]
                s += v
                a = abs(v)
                if a > amax:
                    amax = a
            d = amax / np.float32(XQ_MAX)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            for j in range(g):
                xq[t, gi * g + j] = np.int16(math.floor(x[t, gi * g + j] * inv + np.float32(0.5)))
            dx[t, gi] = d
            xs[t, gi] = s


@lru_cache(maxsize=None)
def make_kernels(bits: int, g: int):
    """(qmatvec, qmatmul_small) for ``bits``-bit groups of ``g``; both are compiled with bits and g as constants."""
    if not specialised(bits, g):
        raise ValueError(f"no integer kernels for {bits}-bit groups of {g}")
    gbytes = g * bits // 8
    zp = np.float32(1 << (bits - 1))
    deps = _DEPS
    quads = HAS_F16C

    @nb.njit(parallel=True, **_JIT)
    def qmatvec(y, codes, scales, mins, x, asym):
        """y[rows] = W @ x for one token. y: f32[rows]; codes: u8[rows, cols*bits/8]; scales, mins: u16[rows, ng]
        (float16 bits; mins unused unless asym); x: f32[1, cols]."""
        rows = codes.shape[0]
        ng = scales.shape[1]
        xq2 = np.empty(x.shape, dtype=np.int16)
        dx2 = np.empty((1, ng), dtype=np.float32)
        xs2 = np.empty((1, ng), dtype=np.float32)
        quantize_activations(xq2, dx2, xs2, x, g)
        xq = xq2[0]
        dx = dx2[0]
        xs = xs2[0]
        if deps == 0:  # never true; ties the compiled code to the dependency key (see _dependency_key)
            return
        nq = ng // 4 * 4 if quads else 0  # groups done four at a time; the rest one by one
        for r in nb.prange(rows):
            crow = codes[r]
            acc = np.float32(0.0)
            for gi in range(0, nq, 4):
                if asym:
                    acc += quad_fdot(crow, scales, mins, r, gi, xq, dx, xs, bits, g, True)
                else:
                    acc += quad_fdot(crow, scales, mins, r, gi, xq, dx, xs, bits, g, False)
            for gi in range(nq, ng):
                d = h2f(scales[r, gi])
                m = h2f(mins[r, gi]) if asym else d * zp
                s = group_idot(crow, gi * gbytes, xq, gi * g, bits, g)
                acc += d * dx[gi] * np.float32(s) - m * xs[gi]
            y[r] = acc

    @nb.njit(parallel=True, **_JIT)
    def qmatmul_small(y, codes, scales, mins, x, asym):
        """y[T, rows] = x @ W.T for a few tokens. x: f32[T, cols]; other arguments as in qmatvec."""
        rows = codes.shape[0]
        ng = scales.shape[1]
        t_n = x.shape[0]
        cols = ng * g
        xq2 = np.empty(x.shape, dtype=np.int16)
        dx = np.empty((t_n, ng), dtype=np.float32)
        xs = np.empty((t_n, ng), dtype=np.float32)
        quantize_activations(xq2, dx, xs, x, g)
        xq = xq2.reshape(t_n * cols)
        if deps == 0:  # never true; see _dependency_key
            return
        for r in nb.prange(rows):
            crow = codes[r]
            for t in range(t_n):
                y[t, r] = 0.0
            for gi in range(ng):
                d = h2f(scales[r, gi])
                m = h2f(mins[r, gi]) if asym else d * zp
                for t in range(t_n):
                    s = group_idot(crow, gi * gbytes, xq, t * cols + gi * g, bits, g)
                    y[t, r] += d * dx[t, gi] * np.float32(s) - m * xs[t, gi]

    return qmatvec, qmatmul_small
