"""The prefill GEMM on the byte dot product, weight rows interleaved so that each 32-bit lane of ``vpdpbusd`` is one
row's dot product (no horizontal sums anywhere).

A block of R weight rows (R = 16 or 32 with AVX-512 — 32 as two 512-bit instructions per chunk and token, so that a
broadcast of the token's bytes serves twice the rows —, 8 with AVX-VNNI only) is first unpacked into a buffer laid out
``[group][chunk of 4 elements][row][4 bytes]`` (``unpack_row`` + the caller's interleave, kernels/cpu_quant.py), and
its scales and negated mins into ``[group][row]`` floats. ``tile_gemm`` then multiplies the block with T tokens:
per chunk, one vector load of the R rows' four codes each and, per token, one broadcast of that token's four
activation bytes and one ``vpdpbusd`` into an R-lane integer accumulator. After each group the integer lanes become
floats and enter the token's float accumulator by two fused multiply-adds (``d · dx`` and the min term
``−m · xs``); ``y[t, r0:r0+R]`` is one vector store. The block buffer is unpacked once and reused for every token
tile, so unpacking costs ~1/T of what it did when each (row, token) tile unpacked its own codes.

Layouts: wb u8[ng·g·R] (the interleaved block); dsc, nmc f32[ng, R] (d and −m per group and row); xh, xl
i8[tokens, cols] (xl unread unless split; x = 256·xh + xl when split); dxT, xsT f32[ng, tokens]; y f32[tokens, rows].
Callers guarantee r0 + R <= rows and t0 + T <= tokens.

``tile_gemm_kept`` is the same product on the smaller layout kernels/packed.py keeps for batched decoding
(:func:`kept_layout`: codes of up to 4 bits two to a byte, 5-6 bits in three quarters of a byte, unpacked by masks
and shifts; the scales as float16, converted per group), so a decode pass of several sequences reads about as many
bytes as the stored matrix.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from lowbit.kernels.ir.simd import prefetch_line
from lowbit.kernels.ir.vnni import (
    byte_pairs,
    check_literals,
    codes_ir,
    dpbusd,
    fused_chunks,
    host_has_avx512_vnni,
    widen_pairs,
)

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
KEPT_AHEAD = 4096  # bytes past the codes being multiplied that tile_gemm_kept asks the cache for


def _literal(v, name: str) -> int:
    if not isinstance(v, types.IntegerLiteral):
        raise errors.RequireLiteralValue(f"gemm_vnni: {name} must be a literal")
    return v.literal_value


@intrinsic
def unpack_row(typingctx, dst, crow, bits, g):
    """dst[0:cols] = the unsigned codes of one packed row crow (u8[cols·bits/8]), in element order."""
    nbits, glen = check_literals(bits, g)
    sig = types.void(dst, crow, bits, g)
    gbytes = glen * nbits // 8

    def codegen(context, builder, signature, args):
        da = context.make_array(signature.args[0])(context, builder, value=args[0])
        ca = context.make_array(signature.args[1])(context, builder, value=args[1])
        ng = builder.udiv(builder.extract_value(da.shape, 0), ir.Constant(_I64, glen))
        vty = ir.VectorType(_I8, glen).as_pointer()
        with cgutils.for_range(builder, ng) as loop:
            gi = loop.index
            u = codes_ir(builder, builder.gep(ca.data, [builder.mul(gi, ir.Constant(_I64, gbytes))]), nbits, glen)
            out = builder.gep(da.data, [builder.mul(gi, ir.Constant(_I64, glen))])
            builder.store(u, builder.bitcast(out, vty), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile_gemm(typingctx, y, wb, dsc, nmc, xh, xl, dxT, xsT, r0, t0, bits, g, split, R, T):
    """See the module docstring: y[t0:t0+T, r0:r0+R] from one interleaved block of ``bits``-bit codes and T
    tokens. On AVX2 (no VNNI) the chunks' 16-bit pair sums are added in 16 bits, ``fused_chunks(bits)`` at a time,
    before one widening multiply-add (vnni.fused_chunks): the same integers, half the multiplies."""
    sig = types.void(y, wb, dsc, nmc, xh, xl, dxT, xsT, r0, t0, bits, g, split, R, T)
    return sig, _tile_codegen(bits, g, split, R, T, kept=False)


@intrinsic
def tile_gemm_kept(typingctx, y, wb, sc, mult, xh, xl, dxT, xsT, r0, t0, bits, g, split, R, T):
    """tile_gemm on a block in the layout kept for batched decoding (kernels/packed.py): codes of up to 4 bits two
    to a byte (chunk pair (2k, 2k+1) of the block as one R·4-byte vector, the even chunk in the low nibbles), wider
    codes one to a byte as in tile_gemm; sc u16[ng, 2, R] the float16 bits of d and of the min (asym) or of d again
    (symmetric), the min term's factor −m being ``mult`` · sc[g, 1] (mult = −1, or −2**(bits−1) for symmetric types:
    exactly tile_gemm's nmc). Same integers, same float operations in the same order: tile_gemm's numbers."""
    if mult != types.float32:
        raise errors.TypingError("tile_gemm_kept: mult must be a float32")
    sig = types.void(y, wb, sc, mult, xh, xl, dxT, xsT, r0, t0, bits, g, split, R, T)
    return sig, _tile_codegen(bits, g, split, R, T, kept=True)


def kept_layout(bits: int) -> str:
    """How tile_gemm_kept stores codes of ``bits``: "nibbles" (up to 4 bits: chunk pairs two to a byte, 0.5 byte a
    weight), "six" (5-6 bits: per quad of chunks, the low 4 bits as two nibble-pair vectors and the high 2 bits
    four chunks to a byte, 0.75 byte a weight), "bytes" (7-8 bits: one byte a code)."""
    return "nibbles" if bits <= 4 else "six" if bits <= 6 else "bytes"


def kept_bytes(bits: int, n: int) -> int:
    """Bytes of n codes (n a multiple of 16) in the kept layout of ``bits``-bit codes."""
    return n * {"nibbles": 2, "six": 3, "bytes": 4}[kept_layout(bits)] // 4


def _tile_codegen(bits, g, split, R, T, kept: bool):
    nbits, glen = check_literals(bits, g, split)
    is_split = split.literal_value
    nr, nt = _literal(R, "R"), _literal(T, "T")
    if nr not in (8, 16, 32) or not 1 <= nt <= 12 or (nr == 32 and (kept or not host_has_avx512_vnni())):
        raise errors.TypingError(f"tile_gemm: unsupported tile of {nr} rows by {nt} tokens")
    chunks = glen // 4
    fuse = fused_chunks(nbits) if nr == 8 else 1
    layout = kept_layout(nbits) if kept else "bytes"

    def codegen(context, builder, signature, args):
        def arr(i):
            return context.make_array(signature.args[i])(context, builder, value=args[i])

        def as64(v):
            return v if v.type.width == 64 else builder.sext(v, _I64)

        def c64(v):
            return ir.Constant(_I64, v)

        ya, wa = arr(0), arr(1)
        ha, la, xda, xsa = (arr(i) for i in range(4, 8))
        row0, tok0 = as64(args[8]), as64(args[9])
        n_rows = builder.extract_value(ya.shape, 1)
        cols = builder.extract_value(ha.shape, 1)
        ng = builder.udiv(cols, c64(glen))
        n_tok = builder.extract_value(xda.shape, 1)
        vi = ir.VectorType(_I32, nr)
        vf = ir.VectorType(_F32, nr)
        vb = ir.VectorType(_I8, 4 * nr)
        splat_mask = ir.Constant(ir.VectorType(_I32, nr), [0] * nr)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf] * 3), f"llvm.fma.v{nr}f32")
        facc = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * nr)) for _ in range(nt)]

        def splat(v):
            one = builder.insert_element(ir.Constant(ir.VectorType(v.type, nr), ir.Undefined), v,
                                         ir.Constant(_I32, 0))
            return builder.shuffle_vector(one, one, splat_mask)

        def load_vec(ptr, off, ty, align):
            return builder.load(builder.bitcast(builder.gep(ptr, [off]), ty.as_pointer()), align=align)

        if kept:
            sa = arr(2)
            vh = ir.VectorType(ir.HalfType(), nr)
            negm = splat(args[3])

            def scales(gi):
                base = builder.mul(gi, c64(2 * nr))
                d = builder.fpext(builder.bitcast(load_vec(sa.data, base, ir.VectorType(_I16, nr), 2), vh), vf)
                m = builder.bitcast(load_vec(sa.data, builder.add(base, c64(nr)), ir.VectorType(_I16, nr), 2), vh)
                return d, builder.fmul(builder.fpext(m, vf), negm)
        else:
            da, ma = arr(2), arr(3)

            def scales(gi):
                goff = builder.mul(gi, c64(nr))
                return load_vec(da.data, goff, vf, 4), load_vec(ma.data, goff, vf, 4)

        def ahead(off):
            """Kept blocks stream from memory (one read per decode pass): ask for the bytes KEPT_AHEAD on."""
            if kept:
                prefetch_line(builder, builder.gep(builder.bitcast(wa.data, _I8.as_pointer()),
                                                   [builder.add(off, c64(KEPT_AHEAD))]))

        vlen = nr * 4  # bytes of one chunk of the block (R rows x 4 codes)

        def load_ahead(off):
            ahead(off)
            return load_vec(wa.data, off, vb, 4)

        def nibble(vec, high: bool):
            """The low (or high) four bits of each byte of vec."""
            if high:
                return builder.lshr(vec, ir.Constant(vb, [4] * vlen))
            return builder.and_(vec, ir.Constant(vb, [15] * vlen))

        def weights(gi, c, held):
            """chunk c of group gi as <nr x i32>; ``held`` keeps the byte vectors of a pair or quad of chunks."""
            if layout == "bytes":
                off = builder.add(builder.mul(gi, c64(chunks * vlen)), c64(c * vlen))
                return builder.bitcast(load_ahead(off), vi)
            if layout == "nibbles":
                if c % 2 == 0:
                    held[0] = load_ahead(builder.add(builder.mul(gi, c64(chunks * vlen // 2)), c64(c // 2 * vlen)))
                return builder.bitcast(nibble(held[0], c % 2 == 1), vi)
            k = c % 4  # "six": per quad of chunks, two nibble-pair vectors and one of the 2-bit high parts
            if k == 0:
                base = builder.add(builder.mul(gi, c64(chunks // 4 * 3 * vlen)), c64(c // 4 * 3 * vlen))
                held[:] = [load_ahead(builder.add(base, c64(j * vlen))) for j in range(3)]
            top = builder.lshr(held[2], ir.Constant(vb, [2 * k] * vlen)) if k else held[2]
            if k < 3:
                top = builder.and_(top, ir.Constant(vb, [3] * vlen))
            low = nibble(held[k // 2], k % 2 == 1)
            return builder.bitcast(builder.or_(low, builder.shl(top, ir.Constant(vb, [4] * vlen))), vi)

        def half(v, h):
            return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 16), list(range(16 * h, 16 * h + 16))))

        def dp(acc, w, xv):
            """acc + vpdpbusd(w, xv); 32 rows as two 512-bit instructions on the halves."""
            if nr <= 16:
                return dpbusd(builder, acc, w, xv)
            lo, hi = (dpbusd(builder, half(acc, h), half(w, h), half(xv, h)) for h in (0, 1))
            return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))

        xrow = [builder.mul(builder.add(tok0, c64(t)), cols) for t in range(nt)]
        with cgutils.for_range(builder, ng) as loop:
            gi = loop.index
            dv, mv = scales(gi)
            zero = ir.Constant(vi, [0] * nr)
            hi = [zero] * nt
            lo = [zero] * nt
            xbase = builder.mul(gi, c64(glen))
            pairs_hi, pairs_lo = [None] * nt, [None] * nt  # 16-bit pair sums of the chunks not yet widened
            parts = ((hi, pairs_hi, ha), (lo, pairs_lo, la)) if is_split else ((hi, pairs_hi, ha),)
            held = [None]
            for c in range(chunks):
                w = weights(gi, c, held)
                widen = c % fuse == fuse - 1 or c == chunks - 1
                for t in range(nt):
                    xoff = builder.add(xrow[t], builder.add(xbase, c64(4 * c)))
                    for acc, pairs, xa_ in parts:
                        xv = splat(load_vec(xa_.data, xoff, _I32, 1))
                        if fuse == 1:
                            acc[t] = dp(acc[t], w, xv)
                            continue
                        p = byte_pairs(builder, w, xv)
                        pairs[t] = p if c % fuse == 0 else builder.add(pairs[t], p)
                        if widen:
                            acc[t] = widen_pairs(builder, acc[t], pairs[t])
            for t in range(nt):
                acc = hi[t]
                if is_split:
                    acc = builder.add(builder.shl(acc, ir.Constant(vi, [8] * nr)), lo[t])
                soff = builder.add(builder.mul(gi, n_tok), builder.add(tok0, c64(t)))
                dx = splat(builder.load(builder.gep(xda.data, [soff])))
                xs = splat(builder.load(builder.gep(xsa.data, [soff])))
                f = builder.call(fma, [builder.sitofp(acc, vf), builder.fmul(dv, dx), builder.load(facc[t])])
                builder.store(builder.call(fma, [mv, xs, f]), facc[t])
        for t in range(nt):
            yoff = builder.add(builder.mul(builder.add(tok0, c64(t)), n_rows), row0)
            builder.store(builder.load(facc[t]), builder.bitcast(builder.gep(ya.data, [yoff]), vf.as_pointer()),
                          align=4)
        return context.get_dummy_value()

    return codegen
