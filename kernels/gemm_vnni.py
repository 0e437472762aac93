"""The prefill microkernel: a register-blocked quantized GEMM tile on the byte dot product of ``kernels.vnni``.

``tile_gemm`` computes ``y[t0:t0+T, r0:r0+R]`` (R weight rows by T tokens) over every group of the rows in one call:
each group's codes are unpacked once per row and multiplied with the T tokens' 8-bit activations (``vpdpbusd``,
split or int8 as in ``kernels.vnni``); each (row, token) pair keeps an 8-lane float accumulator that takes the
group's integer sums times ``d · dx`` (one convert and one fused multiply-add per group), so the horizontal sums
run once per tile, not once per group. The min term ``m · xs`` is accumulated on T-lane vectors per row.
The accumulators are stack slots that LLVM promotes to registers; R and T are compile-time constants.

Layouts: codes u8[rows, cols*bits/8]; scales, mins u16[rows, ng] (float16 bits; mins unread unless asym);
xh, xl i8[tokens, cols] (xl unread unless split); dxT, xsT f32[ng, tokens] (transposed, so the T tokens of a
group are one vector load); y f32[tokens, rows]. Callers guarantee r0 + R <= rows and t0 + T <= tokens.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from lowbit.kernels.vnni import _check, _codes_ir, _group_acc

_I16 = ir.IntType(16)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()


@intrinsic
def tile_gemm(typingctx, y, codes, scales, mins, xh, xl, dxT, xsT, r0, t0, bits, g, asym, split, R, T):
    """See the module docstring."""
    nbits, glen = _check(bits, g, asym, split, R, T)
    is_asym, is_split = asym.literal_value, split.literal_value
    nr, nt = R.literal_value, T.literal_value
    if not (1 <= nr <= 8 and nt in (1, 2, 4, 8)):
        raise errors.TypingError(f"tile_gemm: unsupported tile {nr}x{nt}")
    sig = types.void(y, codes, scales, mins, xh, xl, dxT, xsT, r0, t0, bits, g, asym, split, R, T)
    gbytes = glen * nbits // 8
    zp = float(1 << (nbits - 1))

    def codegen(context, builder, signature, args):
        def arr(i):
            return context.make_array(signature.args[i])(context, builder, value=args[i])

        def as64(v):
            return v if v.type.width == 64 else builder.sext(v, _I64)

        def c64(v):
            return ir.Constant(_I64, v)

        ya, ca, sa, ma, ha, la, da, xa = (arr(i) for i in range(8))
        row0, tok0 = as64(args[8]), as64(args[9])
        n_rows = builder.extract_value(ya.shape, 1)
        rowbytes = builder.extract_value(ca.shape, 1)
        ng = builder.extract_value(sa.shape, 1)
        cols = builder.extract_value(ha.shape, 1)
        n_tok = builder.extract_value(da.shape, 1)
        v8f = ir.VectorType(_F32, 8)
        vtf = ir.VectorType(_F32, nt)
        fma8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f] * 3), "llvm.fma.v8f32")
        facc = [[cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8)) for _ in range(nt)]
                for _ in range(nr)]
        macc = [cgutils.alloca_once_value(builder, ir.Constant(vtf, [0.0] * nt)) for _ in range(nr)]

        with cgutils.for_range(builder, ng) as loop:
            gi = loop.index
            # the T tokens' activation scales and sums of this group: one vector load each
            goff = builder.add(builder.mul(gi, n_tok), tok0)
            dxv = builder.load(builder.bitcast(builder.gep(da.data, [goff]), vtf.as_pointer()), align=4)
            xsv = builder.load(builder.bitcast(builder.gep(xa.data, [goff]), vtf.as_pointer()), align=4)
            us, sds = [], []
            for r in range(nr):
                row = builder.add(row0, c64(r))
                cptr = builder.gep(ca.data, [builder.add(builder.mul(row, rowbytes), builder.mul(gi, c64(gbytes)))])
                us.append(_codes_ir(builder, cptr, nbits, glen))
                soff = builder.add(builder.mul(row, ng), gi)
                d = builder.fpext(builder.bitcast(builder.load(builder.gep(sa.data, [soff])), ir.HalfType()), _F32)
                if is_asym:
                    m = builder.fpext(builder.bitcast(builder.load(builder.gep(ma.data, [soff])), ir.HalfType()), _F32)
                else:
                    m = builder.fmul(d, ir.Constant(_F32, zp))
                mv = builder.insert_element(ir.Constant(vtf, ir.Undefined), m, ir.Constant(ir.IntType(32), 0))
                mv = builder.shuffle_vector(mv, mv, ir.Constant(ir.VectorType(ir.IntType(32), nt), [0] * nt))
                builder.store(builder.fadd(builder.load(macc[r]), builder.fmul(mv, xsv)), macc[r])
                dv = builder.insert_element(ir.Constant(vtf, ir.Undefined), d, ir.Constant(ir.IntType(32), 0))
                dv = builder.shuffle_vector(dv, dv, ir.Constant(ir.VectorType(ir.IntType(32), nt), [0] * nt))
                sds.append(builder.fmul(dv, dxv))
            for t in range(nt):
                xoff = builder.add(builder.mul(builder.add(tok0, c64(t)), cols), builder.mul(gi, c64(glen)))
                hp = builder.gep(ha.data, [xoff])
                lp = builder.gep(la.data, [xoff])
                for r in range(nr):
                    iacc = _group_acc(builder, us[r], hp, lp, glen, is_split)
                    s = builder.shuffle_vector(sds[r], sds[r], ir.Constant(ir.VectorType(ir.IntType(32), 8), [t] * 8))
                    f = builder.call(fma8, [builder.sitofp(iacc, v8f), s, builder.load(facc[r][t])])
                    builder.store(f, facc[r][t])

        rfn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, v8f]),
                                             "llvm.vector.reduce.fadd.v8f32")
        for r in range(nr):
            mvals = builder.load(macc[r])
            for t in range(nt):
                tot = builder.call(rfn, [ir.Constant(_F32, 0.0), builder.load(facc[r][t])])
                tot = builder.fsub(tot, builder.extract_element(mvals, ir.Constant(ir.IntType(32), t)))
                yoff = builder.add(builder.mul(builder.add(tok0, c64(t)), n_rows), builder.add(row0, c64(r)))
                builder.store(tot, builder.gep(ya.data, [yoff]))
        return context.get_dummy_value()

    return sig, codegen
