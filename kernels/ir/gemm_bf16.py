"""The prompt GEMM of bfloat16 weights on the bfloat16 pair dot product (x86 ``vdpbf16ps``, AVX512-BF16), weight rows
interleaved so that each 32-bit lane is one row's sum (no horizontal sums), as kernels/ir/gemm_vnni.py does for
byte codes.

``vdpbf16ps`` takes 16 lanes of two bfloat16 each from both operands and adds, per lane, the two exact products to a
float32 accumulator: 32 multiply-adds an instruction, twice what a float32 FMA of the same width does (measured on
a Zen 5 EPYC, 2 cores, 2048×2048×512: ~510–530 GFLOP/s against ~250 for OpenBLAS's sgemm and ~250–340 for the same
tile on float32 FMAs). The activations are rounded to bfloat16 for it (round to nearest even), as llama.cpp does
for its BF16 weights; the weights are exact.

A block of R weight rows (R a multiple of 16) is first interleaved into ``[pair of columns][row]`` 32-bit words (two
bfloat16 each, the even column in the low half): ``wb u32[kp · R]``. The activations are the same pairs per token:
``xb u32[tokens, kp]``. :func:`tile_bf16` then multiplies the block with T tokens: per pair of columns, R/16 vector
loads of the block and, per token, one 32-bit broadcast of the token's pair and R/16 ``vdpbf16ps`` into float32
accumulators held in registers for the whole row (R/16 · T of them: 16 for R = 32, T = 8). It writes
``yt[t, 0:R]`` for t < T (a tile buffer the caller copies out), token t being ``xb[t0 + t]``.

Each lane's sum runs over the column pairs in order whatever R, T or t0 are: a token's numbers do not depend on the
tile it is in or on how many tokens the product has.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from lowbit.kernels.ir.simd import host_cpu_features

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
LANES = 16


def host_has_bf16_dot() -> bool:
    """Whether this CPU has the 512-bit bfloat16 pair dot product (AVX512-BF16)."""
    f = host_cpu_features()
    return bool(f.get("avx512bf16")) and bool(f.get("avx512f"))


@intrinsic
def tile_bf16(typingctx, yt, wb, xb, t0, R, T):
    """See the module docstring: yt[0:T, 0:R] = block wb (R interleaved rows) times tokens xb[t0 : t0 + T].
    R (a multiple of 16, at most 64) and T (1..12) must be literals; callers guarantee t0 + T <= tokens, wb holding
    kp · R words and yt at least T rows of R floats."""
    if not isinstance(R, types.IntegerLiteral) or not isinstance(T, types.IntegerLiteral):
        raise errors.RequireLiteralValue("tile_bf16: R and T must be literals")
    nr, nt = R.literal_value, T.literal_value
    if nr % LANES or not 16 <= nr <= 64 or not 1 <= nt <= 12:
        raise errors.TypingError(f"tile_bf16: unsupported tile of {nr} rows by {nt} tokens")
    for a, dt in ((yt, types.float32), (wb, types.uint32), (xb, types.uint32)):
        if not isinstance(a, types.Array) or a.dtype != dt or a.layout != "C":
            raise errors.TypingError("tile_bf16: yt f32, wb and xb u32, all C-contiguous")
    sig = types.void(yt, wb, xb, t0, R, T)
    nv = nr // LANES

    def codegen(context, builder, signature, args):
        ya, wa, xa = (context.make_array(signature.args[i])(context, builder, value=args[i]) for i in range(3))
        tok0 = args[3] if args[3].type.width == 64 else builder.sext(args[3], _I64)
        vf = ir.VectorType(_F32, LANES)
        vi = ir.VectorType(_I32, LANES)
        # the pre-LLVM-17 signature (i32 vectors for the bfloat16 pairs), which LLVM upgrades to its bfloat form
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vi, vi]),
                                            "llvm.x86.avx512bf16.dpbf16ps.512")
        kp = builder.extract_value(xa.shape, 1)
        zero = ir.Constant(vf, [0.0] * LANES)
        acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(nv)] for _ in range(nt)]
        xrow = [builder.mul(builder.add(tok0, ir.Constant(_I64, t)), kp) for t in range(nt)]
        splat_mask = ir.Constant(vi, [0] * LANES)
        with cgutils.for_range(builder, kp) as loop:
            k = loop.index
            base = builder.mul(k, ir.Constant(_I64, nr))
            ws = []
            for v in range(nv):
                p = builder.gep(wa.data, [builder.add(base, ir.Constant(_I64, LANES * v))])
                ws.append(builder.load(builder.bitcast(p, vi.as_pointer()), align=4))
            for t in range(nt):
                xs = builder.load(builder.gep(xa.data, [builder.add(xrow[t], k)]))
                one = builder.insert_element(ir.Constant(vi, ir.Undefined), xs, ir.Constant(_I32, 0))
                xv = builder.shuffle_vector(one, one, splat_mask)
                for v in range(nv):
                    builder.store(builder.call(dp, [builder.load(acc[t][v]), ws[v], xv]), acc[t][v])
        for t in range(nt):
            for v in range(nv):
                p = builder.gep(ya.data, [ir.Constant(_I64, t * nr + LANES * v)])
                builder.store(builder.load(acc[t][v]), builder.bitcast(p, vf.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _tree_sum(builder, v):
    """The 16 lanes of v summed as a fixed tree (halves added, then their halves ...): one order everywhere."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


@intrinsic
def rows_dot_bf16(typingctx, y, yoff, w32, r, xb, t, N):
    """y[yoff + i] = Σ_k pair dot of w32[r + i, k] and xb[t, k] for i < N (1..4, a literal): rows of a bfloat16
    matrix (u32[rows, kp], two columns a word) times one token's bfloat16 pairs, 16 pairs per ``vdpbf16ps``, the
    last partial chunk through a masked load (zeros past the row); the N rows share each load of the token. Lane
    sums in pair order, then a fixed tree over the lanes: a row gets the same number whatever N is. Callers
    guarantee r + N <= rows, t < tokens, yoff + N <= y.size."""
    if not isinstance(N, types.IntegerLiteral) or not 1 <= N.literal_value <= 4:
        raise errors.TypingError("rows_dot_bf16: N must be a literal 1..4")
    for a, dt in ((y, types.float32), (w32, types.uint32), (xb, types.uint32)):
        if not isinstance(a, types.Array) or a.dtype != dt or a.layout != "C":
            raise errors.TypingError("rows_dot_bf16: y f32, w32 and xb u32, all C-contiguous")
    n = N.literal_value
    sig = types.void(y, yoff, w32, r, xb, t, N)

    def codegen(context, builder, signature, args):
        ya, wa, xa = (context.make_array(signature.args[i])(context, builder, value=args[i]) for i in (0, 2, 4))

        def as64(v):
            return v if v.type.width == 64 else builder.sext(v, _I64)

        yoff, row0, tok = as64(args[1]), as64(args[3]), as64(args[5])
        vf = ir.VectorType(_F32, LANES)
        vi = ir.VectorType(_I32, LANES)
        vm = ir.VectorType(ir.IntType(1), LANES)
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vi, vi]),
                                            "llvm.x86.avx512bf16.dpbf16ps.512")
        mload = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi, [vi.as_pointer(), _I32, vm, vi]),
                                               "llvm.masked.load.v16i32.p0v16i32")
        kp = builder.extract_value(wa.shape, 1)
        full = builder.udiv(kp, ir.Constant(_I64, LANES))
        rest = builder.urem(kp, ir.Constant(_I64, LANES))
        zero = ir.Constant(vf, [0.0] * LANES)
        acc = [cgutils.alloca_once_value(builder, zero) for _ in range(n)]
        xbase = builder.mul(tok, builder.extract_value(xa.shape, 1))
        wbase = [builder.mul(builder.add(row0, ir.Constant(_I64, i)), kp) for i in range(n)]

        def vec(data, off):
            return builder.bitcast(builder.gep(data, [off]), vi.as_pointer())

        with cgutils.for_range(builder, full) as loop:
            k = builder.mul(loop.index, ir.Constant(_I64, LANES))
            xv = builder.load(vec(xa.data, builder.add(xbase, k)), align=4)
            for i in range(n):
                wv = builder.load(vec(wa.data, builder.add(wbase[i], k)), align=4)
                builder.store(builder.call(dp, [builder.load(acc[i]), wv, xv]), acc[i])
        with builder.if_then(builder.icmp_unsigned("!=", rest, ir.Constant(_I64, 0))):
            k = builder.mul(full, ir.Constant(_I64, LANES))
            lanes = ir.Constant(vi, list(range(LANES)))
            ins = builder.insert_element(ir.Constant(vi, ir.Undefined), builder.trunc(rest, _I32), ir.Constant(_I32, 0))
            mask = builder.icmp_unsigned("<", lanes, builder.shuffle_vector(ins, ins, ir.Constant(vi, [0] * LANES)))
            zi = ir.Constant(vi, [0] * LANES)
            four = ir.Constant(_I32, 4)
            xv = builder.call(mload, [vec(xa.data, builder.add(xbase, k)), four, mask, zi])
            for i in range(n):
                wv = builder.call(mload, [vec(wa.data, builder.add(wbase[i], k)), four, mask, zi])
                builder.store(builder.call(dp, [builder.load(acc[i]), wv, xv]), acc[i])
        for i in range(n):
            out = builder.gep(ya.data, [builder.add(yoff, ir.Constant(_I64, i))])
            builder.store(_tree_sum(builder, builder.load(acc[i])), out)
        return context.get_dummy_value()

    return sig, codegen
