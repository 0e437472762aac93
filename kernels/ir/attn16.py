"""Decode attention over a float16 KV cache for up to four query heads at once (LLVM IR through numba intrinsics).

A decode step's attention reads each cached key and value row once per *key/value head*, but the generic kernels
(kernels/cpu_attention.py) decode eight rows into a float32 tile and then take the query heads that share them one
at a time with 8-lane products. For the common case — a float16 cache, a head dim of 64, at most four query heads
per key/value head (grouped-query attention) — these two intrinsics read the float16 rows directly (16 lanes a
conversion) and share every load among the four heads:

- ``scores16x4(sc, soff, m, q4, k, koff, scale)``: ``sc[r·m + soff + i] = scale · q4[r] · k_i`` for heads r < 4 and
  the four keys ``k_i`` at ``k[koff + 64 i]``: sixteen 16-lane accumulators (one per head and key), four fused
  multiply-adds each, then one fixed tree of shuffles and adds that leaves the sixteen sums in one vector. A score's
  arithmetic depends only on its own head and key, never on which keys share the call.
- ``values16x4(dst4, p, m, v, voff, n)``: ``dst4[r] += Σ_{s<n} p[r·m + s] · v_s`` for heads r < 4 and the n value
  rows at ``v[voff + 64 s]``: the four heads' output rows (4 × 4 vectors) stay in registers over all n keys, one
  fused multiply-add per key, head and 16 lanes, in key order.

Arrays: ``sc``, ``q4``, ``dst4``, ``p`` C-contiguous float32 (``q4``/``dst4`` [4, 64]); ``k``, ``v`` C-contiguous
uint16 (float16 bits). Bounds are the caller's (no checks here).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

HD = 64  # the head dim these intrinsics take
HEADS = 4  # query heads per call
_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16 = ir.VectorType(_F32, 16)
_H16 = ir.VectorType(ir.HalfType(), 16)
_W16 = ir.VectorType(ir.IntType(16), 16)


def _check(*arrs):
    for a in arrs:
        if not isinstance(a, types.Array) or a.layout != "C":
            raise errors.TypingError("attn16 intrinsics take C-contiguous arrays")


def _as64(builder, v):
    return v if v.type.width == 64 else builder.sext(v, _I64)


def _operands(context, builder, signature, args, arrays: tuple, rows: int, off: int, ints: tuple) -> tuple:
    """Data pointers of the float32 arrays args[i] for i in ``arrays``, of the float16 rows args[rows] at element
    args[off], and the integers args[i] for i in ``ints`` as i64."""
    def data(i):
        return context.make_array(signature.args[i])(context, builder, value=args[i]).data

    ptrs = [data(i) for i in arrays]
    ptrs.append(builder.gep(data(rows), [_as64(builder, args[off])]))
    return (*ptrs, *(_as64(builder, args[i]) for i in ints))


def _splat16(builder, x):
    v = builder.insert_element(ir.Constant(_V16, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 16), [0] * 16))


def _f32x16(builder, ptr, off):
    return builder.load(builder.bitcast(builder.gep(ptr, [off]), _V16.as_pointer()), align=4)


def _f16x16(builder, ptr, off):
    """16 float16 values at ptr[off] (uint16 bits) widened to float32."""
    raw = builder.load(builder.bitcast(builder.gep(ptr, [off]), _W16.as_pointer()), align=2)
    return builder.fpext(builder.bitcast(raw, _H16), _V16)


def _fma(builder):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16] * 3), "llvm.fma.v16f32")


def _c(v):
    return ir.Constant(_I64, v)


def sum16(builder, accs: list):
    """One vector whose lane j is the sum of accs[j]'s 16 lanes (16 vectors): pairs of vectors fold halves, then
    quarters, then pairs of lanes, then lanes — the same tree for every lane."""
    level = accs
    for width in (8, 4, 2, 1):
        lo = [j for base in range(0, 32, 2 * width) for j in range(base, base + width)]  # of each block pair: first
        hi = [j + width for j in lo]  # ... and second, added lane by lane
        mlo = ir.Constant(ir.VectorType(_I32, 16), lo)
        mhi = ir.Constant(ir.VectorType(_I32, 16), hi)
        level = [builder.fadd(builder.shuffle_vector(a, b, mlo), builder.shuffle_vector(a, b, mhi))
                 for a, b in zip(level[0::2], level[1::2])]
    return level[0]


@intrinsic
def scores16x4(typingctx, sc, soff, m, q4, k, koff, scale):
    _check(sc, q4, k)
    sig = types.void(sc, soff, m, q4, k, koff, scale)

    def codegen(context, builder, signature, args):
        sp, qp, kp, soff, m = _operands(context, builder, signature, args, (0, 3), 4, 5, (1, 2))
        fma = _fma(builder)
        zero = ir.Constant(_V16, [0.0] * 16)
        accs = [zero] * (HEADS * 4)
        for c in range(HD // 16):
            keys = [_f16x16(builder, kp, _c(i * HD + 16 * c)) for i in range(4)]
            for r in range(HEADS):
                qv = _f32x16(builder, qp, _c(r * HD + 16 * c))
                for i in range(4):
                    accs[r * 4 + i] = builder.call(fma, [qv, keys[i], accs[r * 4 + i]])
        sums = sum16(builder, accs)
        sums = builder.fmul(sums, _splat16(builder, args[6]))
        v4 = ir.VectorType(_F32, 4)
        for r in range(HEADS):
            lanes = ir.Constant(ir.VectorType(_I32, 4), list(range(4 * r, 4 * r + 4)))
            part = builder.shuffle_vector(sums, sums, lanes)
            dst = builder.gep(sp, [builder.add(builder.mul(_c(r), m), soff)])
            builder.store(part, builder.bitcast(dst, v4.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def values16x4(typingctx, dst4, p, m, v, voff, n):
    _check(dst4, p, v)
    sig = types.void(dst4, p, m, v, voff, n)

    def codegen(context, builder, signature, args):
        dp, pp, vp, m, n = _operands(context, builder, signature, args, (0, 1), 3, 4, (2, 5))
        fma = _fma(builder)
        accs = [cgutils.alloca_once_value(builder, _f32x16(builder, dp, _c(r * HD + 16 * c)))
                for r in range(HEADS) for c in range(HD // 16)]
        with cgutils.for_range(builder, n) as loop:
            s = loop.index
            rows = [_f16x16(builder, vp, builder.add(builder.mul(s, _c(HD)), _c(16 * c))) for c in range(HD // 16)]
            for r in range(HEADS):
                wv = _splat16(builder, builder.load(builder.gep(pp, [builder.add(builder.mul(_c(r), m), s)])))
                for c in range(HD // 16):
                    a = accs[r * (HD // 16) + c]
                    builder.store(builder.call(fma, [wv, rows[c], builder.load(a)]), a)
        for r in range(HEADS):
            for c in range(HD // 16):
                dst = builder.bitcast(builder.gep(dp, [_c(r * HD + 16 * c)]), _V16.as_pointer())
                builder.store(builder.load(accs[r * (HD // 16) + c]), dst, align=4)
        return context.get_dummy_value()

    return sig, codegen
