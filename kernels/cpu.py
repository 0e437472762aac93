"""numba CPU kernels. Each writes into a preallocated output passed first.

Only the kernels that stream weights or the KV cache run in parallel; cheap element-wise kernels stay serial, since a
parallel region costs more than their work (and much more on a shared, busy host).

Quantized weights are read straight from the container mapping: ``codes`` uint8, ``scales``/``mins`` as the raw
float16 bits (uint16 views; numba has no float16), decoded per group. One kernel body serves every quant type: the
bit planes of the type (``formats.qtypes.PLANES``) are passed as a small array and the inner loops run over
contiguous bytes with a loop-invariant shift, which LLVM vectorises. Codes are widened to int32 before arithmetic.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from lowbit.kernels.ir.simd import bits_to_float, half_to_float, host_has_f16c

# 2**(e - 25) for the 5-bit float16 exponent e (e == 0 handled as subnormal)
_POW2 = np.array([math.ldexp(1.0, max(e, 1) - 25) for e in range(32)], dtype=np.float32)

JIT = dict(cache=True, nogil=True, fastmath=True)
# numba's parallel options for the kernels: explicit prange loops only. The other conversions (array expressions,
# numpy calls, comprehensions into parallel loops; loop fusion) are not used by the kernels, and their passes were
# a good part of a cold start's compile time.
PRANGE = dict(comprehension=False, setitem=False, numpy=False, stencil=False, fusion=False, inplace_binop=False,
              reduction=False, prange=True)


def variant(tag: str):
    """Decorator, under ``nb.njit``, for a kernel a factory makes once per variant (bits, group, mode): the function
    takes the variant in its name before numba sees it. numba's on-disk cache files each function under its
    qualified name, and the symbols of its cached code carry that name and a per-process counter: two closures of
    one function cached by different processes could carry the same symbol, and a process loading both ran one's
    code for the other (seen: a server on a model of two types failing in the batch packing with "descr is NULL").
    Named per variant, their cache entries and symbols never meet."""

    def rename(fn):
        fn.__name__ = f"{fn.__name__}_{tag}"
        fn.__qualname__ = f"{fn.__qualname__}_{tag}"
        return fn

    return rename


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two so that n * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)


@nb.njit(inline="always", **JIT)
def fast_exp(x):
    """exp(x) for float32 x, to ~2e-7 relative, in arithmetic LLVM vectorizes (math.exp stays a scalar libm call):
    x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial, 2^n built in the exponent bits. x is
    clamped to [-87, 88] (the normal float32 range of the result)."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * _LOG2E + np.float32(0.5))  # float32 (math.floor gives an int64, and float64 arithmetic after)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * bits_to_float((np.int32(n) + np.int32(127)) << np.int32(23))


@nb.njit(inline="always", **JIT)
def _h2f(h):
    """float16 bits (uint16) -> float32."""
    v = np.int32(h)
    e = (v >> 10) & 31
    m = v & 1023
    if e != 0:
        m += 1024
    r = np.float32(m) * _POW2[e]
    return -r if v & 0x8000 else r


# float16 bits -> float32 as the kernels decode scales and caches: one conversion instruction where the CPU has it
# (F16C on x86), the table-based decoder elsewhere
h2f = half_to_float if host_has_f16c() else _h2f


@nb.njit(inline="always", **JIT)
def _group_dot(crow, boff, x, xoff, g, planes):
    """sum_j u_j * x[xoff + j] over one group whose packed bytes start at crow[boff] (crow: one row of codes).

    Indices are unsigned so numba emits no negative-index wraparound and LLVM vectorises the inner loop."""
    acc = np.float32(0.0)
    shift = 0
    start = np.uint64(boff)
    for pi in range(planes.shape[0]):
        p = planes[pi]
        n = 8 // p
        nbytes = g // n
        mask = (1 << p) - 1
        for k in range(n):
            sh = k * p
            xo = np.uint64(xoff + k * nbytes)
            s = np.float32(0.0)
            for j in range(nbytes):
                jj = np.uint64(j)
                s += np.float32((np.int32(crow[start + jj]) >> sh) & mask) * x[xo + jj]
            acc += s * np.float32(1 << shift)
        start += np.uint64(nbytes)
        shift += p
    return acc


@nb.njit(inline="always", **JIT)
def _group_unpack(buf, crow, boff, g, planes, d, m):
    """buf[0:g] = d * u - m for one group whose packed bytes start at crow[boff]."""
    for j in range(g):
        buf[j] = 0.0
    shift = 0
    start = np.uint64(boff)
    for pi in range(planes.shape[0]):
        p = planes[pi]
        n = 8 // p
        nbytes = g // n
        mask = (1 << p) - 1
        for k in range(n):
            sh = k * p
            mul = np.float32(1 << shift)
            bo = np.uint64(k * nbytes)
            for j in range(nbytes):
                jj = np.uint64(j)
                buf[bo + jj] += np.float32((np.int32(crow[start + jj]) >> sh) & mask) * mul
        start += np.uint64(nbytes)
        shift += p
    for j in range(g):
        buf[j] = buf[j] * d - m


@nb.njit(parallel=PRANGE, **JIT)
def qmatvec(y, codes, scales, mins, x, planes, g, bits, asym, zp):
    """y[rows] = W @ x for one token.

    y: f32[rows]; codes: u8[rows, cols*bits/8]; scales, mins: u16[rows, ng] (mins unused unless asym);
    x: f32[cols]; planes: i32[n_planes]; g: group size; zp: zero point for symmetric types.
    """
    rows = codes.shape[0]
    ng = scales.shape[1]
    gbytes = g * bits // 8
    xs = np.empty(ng, dtype=np.float32)  # per-group activation sums, computed once per token
    for gi in range(ng):
        s = np.float32(0.0)
        for j in range(g):
            s += x[gi * g + j]
        xs[gi] = s
    for r in nb.prange(rows):
        crow = codes[r]
        acc = np.float32(0.0)
        for gi in range(ng):
            d = _h2f(scales[r, gi])
            m = _h2f(mins[r, gi]) if asym else d * zp
            acc += d * _group_dot(crow, gi * gbytes, x, gi * g, g, planes) - m * xs[gi]
        y[r] = acc


@nb.njit(parallel=PRANGE, **JIT)
def qmatmul_small(y, codes, scales, mins, x, planes, g, bits, asym, zp):
    """y[T, rows] = x @ W.T for a few tokens: each group is unpacked once into a small buffer and reused for all T.

    y: f32[T, rows]; x: f32[T, cols]; other arguments as in qmatvec.
    """
    rows = codes.shape[0]
    ng = scales.shape[1]
    t_n = x.shape[0]
    gbytes = g * bits // 8
    for r in nb.prange(rows):
        crow = codes[r]
        buf = np.empty(g, dtype=np.float32)
        acc = np.zeros(t_n, dtype=np.float32)
        for gi in range(ng):
            d = _h2f(scales[r, gi])
            m = _h2f(mins[r, gi]) if asym else d * zp
            _group_unpack(buf, crow, gi * gbytes, g, planes, d, m)
            for t in range(t_n):
                s = np.float32(0.0)
                for j in range(g):
                    s += buf[j] * x[t, gi * g + j]
                acc[t] += s
        for t in range(t_n):
            y[t, r] = acc[t]


@nb.njit(parallel=PRANGE, **JIT)
def dequant_rows(out, codes, scales, mins, idx, planes, g, bits, asym, zp):
    """out[i, :] = dequantized row idx[i] of W. out: f32[n, cols]; idx: i64[n]."""
    ng = scales.shape[1]
    gbytes = g * bits // 8
    for i in nb.prange(idx.shape[0]):
        r = idx[i]
        crow = codes[r]
        buf = np.empty(g, dtype=np.float32)
        for gi in range(ng):
            d = _h2f(scales[r, gi])
            m = _h2f(mins[r, gi]) if asym else d * zp
            _group_unpack(buf, crow, gi * gbytes, g, planes, d, m)
            for j in range(g):
                out[i, gi * g + j] = buf[j]


@nb.njit(**JIT)
def rmsnorm(out, x, w, eps):
    """out[T, n] = x / rms(x) * w. x: f32[T, n]; w: f32[n]."""
    n = x.shape[1]
    for t in range(x.shape[0]):
        s = np.float32(0.0)
        for j in range(n):
            s += x[t, j] * x[t, j]
        inv = np.float32(1.0 / math.sqrt(s / n + eps))
        for j in range(n):
            out[t, j] = x[t, j] * inv * w[j]


@nb.njit(**JIT)
def add_rmsnorm(xo, ho, x, a, w, eps):
    """xo = x + a and ho = rmsnorm(xo) * w in one pass per row (the residual add and the next norm). All f32[T, n]
    but w: f32[n]."""
    n = x.shape[1]
    for t in range(x.shape[0]):
        s = np.float32(0.0)
        for j in range(n):
            v = x[t, j] + a[t, j]
            xo[t, j] = v
            s += v * v
        inv = np.float32(1.0 / math.sqrt(s / n + eps))
        for j in range(n):
            ho[t, j] = xo[t, j] * inv * w[j]


@nb.njit(**JIT)
def rope_inplace(x, cos, sin):
    """Rotate-half RoPE in place. x: f32[T, n_heads, hd]; cos, sin: f32[T, hd/2]."""
    half = x.shape[2] // 2
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for j in range(half):
                a = x[t, h, j]
                b = x[t, h, half + j]
                x[t, h, j] = a * cos[t, j] - b * sin[t, j]
                x[t, h, half + j] = b * cos[t, j] + a * sin[t, j]


@nb.njit(inline="always", **JIT)
def _silu_mul_row(out, gate, up, t):
    # two passes: LLVM vectorizes each, but not the two fused into one loop (measured 4.5x slower)
    for j in range(gate.shape[1]):
        out[t, j] = fast_exp(-gate[t, j])
    for j in range(gate.shape[1]):
        out[t, j] = gate[t, j] / (np.float32(1.0) + out[t, j]) * up[t, j]


@nb.njit(inline="always", **JIT)
def _gelu_tanh_mul_row(out, gate, up, t):
    c = math.sqrt(2.0 / math.pi)
    for j in range(gate.shape[1]):
        a = np.float64(gate[t, j])
        g = 0.5 * a * (1.0 + math.tanh(c * (a + 0.044715 * a * a * a)))
        out[t, j] = np.float32(g) * up[t, j]


@nb.njit(**JIT)
def silu_mul(out, gate, up):
    """out = silu(gate) * up. All f32[T, n]."""
    for t in range(gate.shape[0]):
        _silu_mul_row(out, gate, up, t)


@nb.njit(parallel=PRANGE, **JIT)
def silu_mul_par(out, gate, up):
    """silu_mul with the rows in parallel (prompts)."""
    for t in nb.prange(gate.shape[0]):
        _silu_mul_row(out, gate, up, t)


@nb.njit(**JIT)
def gelu_tanh_mul(out, gate, up):
    """out = gelu_tanh(gate) * up (GeGLU with the tanh-approximate GELU). All f32[T, n]."""
    for t in range(gate.shape[0]):
        _gelu_tanh_mul_row(out, gate, up, t)


@nb.njit(parallel=PRANGE, **JIT)
def gelu_tanh_mul_par(out, gate, up):
    """gelu_tanh_mul with the rows in parallel (prompts)."""
    for t in nb.prange(gate.shape[0]):
        _gelu_tanh_mul_row(out, gate, up, t)


@nb.njit(**JIT)
def softcap(out, x, cap):
    """out = cap * tanh(x / cap) (logit soft-capping). out, x: f32[T, n]; cap: f32 > 0."""
    for t in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[t, j] = np.float32(cap * math.tanh(x[t, j] / cap))
