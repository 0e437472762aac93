"""numba CPU kernels that write the KV cache in its storage formats (kernels/kv_formats.py: f32, f16, q8, q4), with
RoPE fused in (rope2_kv_write).

One cache is a pair (data, scales) per layer: data f32/u16/i8/u8[n_kv, rows, width], scales u16[n_kv, rows, groups]
(float16 bits; empty for the float formats). The format follows from data's dtype, so numba compiles one kernel per
pair of key/value formats in use. Position p lives in row p % rows: a cache of the whole context has a row per
position, a sliding-window layer's cache is a ring of the window plus one prompt chunk (models/common.py).
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import errors
from numba.extending import intrinsic, overload

from lowbit.kernels.cpu import JIT, h2f, rope_inplace
from lowbit.kernels.ir.simd import host_has_f16c


@intrinsic
def float_to_half(typingctx, x):
    """float32 -> float16 bits (uint16), rounded to nearest even, in one conversion instruction (F16C's vcvtps2ph)."""
    if x != types.float32:
        raise errors.TypingError("float_to_half needs a float32")

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(x), codegen


@intrinsic
def float_bits(typingctx, x):
    """The bit pattern of a float32 as an int32 (a free bitcast)."""
    if x != types.float32:
        raise errors.TypingError("float_bits needs a float32")

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(x), codegen


@nb.njit(inline="always", **JIT)
def soft_float_to_half(x):
    """float_to_half in integer arithmetic, for CPUs without a conversion instruction (same rounding)."""
    b = np.int64(float_bits(x)) & 0xFFFFFFFF
    sign = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    if a >= 0x7F800000:  # inf, nan
        return np.uint16(sign | (0x7E00 if a > 0x7F800000 else 0x7C00))
    if a >= 0x477FF000:  # rounds to at least 65536: inf
        return np.uint16(sign | 0x7C00)
    if a < 0x38800000:  # below 2**-14: a float16 subnormal (or zero); 2**24 · |x| rounded is its mantissa
        mag = abs(np.float64(x)) * 16777216.0
        return np.uint16(sign | np.int64(np.rint(mag)))
    e = (a >> 23) - 112
    m = a & 0x7FFFFF
    h = (e << 10) | (m >> 13)
    rem = m & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1)):
        h += 1  # a carry into the exponent is the right encoding
    return np.uint16(sign | h)


# one conversion instruction where the CPU has it, integer arithmetic elsewhere (h2f: the way back)
F2H = float_to_half if host_has_f16c() else soft_float_to_half


def store_row(data, scales, kv, pos, src, t):
    """data/scales[kv, pos] = the cache format's encoding of src[t, kv, :] (overloaded per data dtype)."""


@overload(store_row, jit_options=JIT)
def _store_row(data, scales, kv, pos, src, t):
    if data.dtype == types.float32:

        def impl(data, scales, kv, pos, src, t):
            for j in range(src.shape[2]):
                data[kv, pos, j] = src[t, kv, j]

        return impl
    if data.dtype == types.uint16:

        def impl(data, scales, kv, pos, src, t):
            for j in range(src.shape[2]):
                data[kv, pos, j] = F2H(src[t, kv, j])

        return impl
    if data.dtype == types.int8:

        def impl(data, scales, kv, pos, src, t):
            hd = src.shape[2]
            ng = scales.shape[2]
            g = hd // ng
            for gi in range(ng):
                amax = np.float32(0.0)
                for j in range(gi * g, gi * g + g):
                    amax = max(amax, abs(src[t, kv, j]))
                dh = F2H(amax / np.float32(127.0))
                scales[kv, pos, gi] = dh
                d = h2f(dh)
                inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
                for j in range(gi * g, gi * g + g):
                    q = np.rint(src[t, kv, j] * inv)
                    data[kv, pos, j] = np.int8(min(max(q, np.float32(-127.0)), np.float32(127.0)))

        return impl
    if data.dtype == types.uint8:

        def impl(data, scales, kv, pos, src, t):
            hd = src.shape[2]
            ng = scales.shape[2]
            g = hd // ng
            half = g // 2
            for gi in range(ng):
                xm = np.float32(0.0)
                for j in range(gi * g, gi * g + g):
                    if abs(src[t, kv, j]) > abs(xm):
                        xm = src[t, kv, j]
                dh = F2H(xm / np.float32(-8.0))
                scales[kv, pos, gi] = dh
                d = h2f(dh)
                inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
                for i in range(half):
                    lo = np.rint(src[t, kv, gi * g + i] * inv) + np.float32(8.0)
                    hi = np.rint(src[t, kv, gi * g + half + i] * inv) + np.float32(8.0)
                    lo = min(max(lo, np.float32(0.0)), np.float32(15.0))
                    hi = min(max(hi, np.float32(0.0)), np.float32(15.0))
                    data[kv, pos, gi * half + i] = np.uint8(np.int32(lo) | (np.int32(hi) << 4))

        return impl
    raise errors.TypingError(f"no KV cache format stores {data.dtype}")


@nb.njit(**JIT)
def kv_write(kd, ks, vd, vs, k, v, start):
    """Keys and values k, v: f32[T, n_kv, hd] into positions start.. of one layer's caches (data, scales) × 2."""
    rows = kd.shape[1]
    for t in range(k.shape[0]):
        r = (start + t) % rows
        for h in range(k.shape[1]):
            store_row(kd, ks, h, r, k, t)
            store_row(vd, vs, h, r, v, t)


@nb.njit(**JIT)
def rope2_kv_write(q, k, v, cos, sin, kd, ks, vd, vs, start):
    """rope_inplace of q and of k[..., :rot], then kv_write of k, v into positions start.., in one call.
    q: f32[T, n_heads, rot] (a view when RoPE rotates part of each head); k, v: f32[T, n_kv, hd]; cos, sin:
    f32[T, rot/2]."""
    rope_inplace(q, cos, sin)
    rope_inplace(k[:, :, : q.shape[2]], cos, sin)
    kv_write(kd, ks, vd, vs, k, v, start)
