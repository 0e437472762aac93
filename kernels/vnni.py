"""Integer dot products on 8-bit activations with the CPU's byte dot-product instruction (x86 ``vpdpbusd``, AVX-512
VNNI), written as LLVM IR through numba intrinsics.

A group's packed codes (``formats.qtypes`` bit planes) are unpacked by shift-and-mask into one ``<g x i8>`` vector of
unsigned codes in element order; ``vpdpbusd`` then multiplies 32 (or 64) codes at a time with signed 8-bit
activations and adds each four neighbouring products into a 32-bit lane. Codes are never widened, which is what
makes this about twice the multiply-add rate of the 16-bit path of :mod:`lowbit.kernels.simd`.

Two activation formats:

- *int8*: ``x ≈ dx · xq`` with ``xq`` in [-127, 127] (llama.cpp's Q8 activations). One instruction per chunk.
- *split*: the int16 activations of :mod:`lowbit.kernels.cpu_quant`, carried as two bytes ``xq = 256·hi + lo`` with
  hi, lo signed. Two instructions per chunk, results identical to the 16-bit path's (``|xq| <= 32639`` so hi fits).

``bits``, ``g``, ``asym`` and ``split`` are compile-time constants, so one definition serves every quant type.
Bounds are the caller's (as in :mod:`lowbit.kernels.simd`). Sums cannot overflow: |u·lo| < 2**8·2**7 and
256·|u·hi| < 2**8·2**8·2**7 per element, g <= 128 elements.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from lowbit.formats.qtypes import PLANES
from lowbit.kernels.simd import QUAD_LANES, _concat, _sum4, bit_plane, plane_slots, quad_epilogue

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
WIDE = 32  # bytes per vpdpbusd: the 256-bit form (the 512-bit one measured ~25% slower on Zen 4, bench/matvec_speed.py)


def host_has_vnni() -> bool:
    """Whether this CPU has the 256-bit byte dot product LLVM's ``llvm.x86.avx512.vpdpbusd.256`` lowers to."""
    import llvmlite.binding as llvm

    f = llvm.get_host_cpu_features()
    return bool(f.get("avxvnni")) or bool(f.get("avx512vnni") and f.get("avx512vl"))


def _codes_ir(builder, cptr, bits: int, g: int):
    """<g x i8> unsigned codes of one group in element order (planes shifted into place and or-ed together)."""
    out = None
    shift = 0
    offset = 0
    for p in PLANES[bits]:
        n = 8 // p
        nbytes = g // n
        vty = ir.VectorType(_I8, nbytes)
        c = builder.load(builder.bitcast(builder.gep(cptr, [ir.Constant(_I64, offset)]), vty.as_pointer()), align=1)
        if p == 1:
            plane = bit_plane(builder, c, nbytes, g)
        elif nbytes < WIDE and g >= WIDE:
            plane = _concat(builder, [_narrow_chunk(builder, c, p, nbytes, k0) for k0 in range(0, n, WIDE // nbytes)])
        else:
            plane = _concat(builder, plane_slots(builder, c, p))
        if shift:
            plane = builder.shl(plane, ir.Constant(plane.type, [shift] * g))
        out = plane if out is None else builder.or_(out, plane)
        offset += nbytes
        shift += p
    return out


def _narrow_chunk(builder, c, p: int, nbytes: int, k0: int):
    """<WIDE x i8>: slots k0, k0+1, ... of a plane whose slots are ``nbytes`` < WIDE bytes (slot k = bits k·p of
    each byte), in element order. The plane's bytes are repeated across the vector (one broadcast) and each 16-bit
    word is shifted by its own slot's amount (one variable shift, ``vpsrlvw``), then masked: three instructions
    where shifting each slot and concatenating them takes about twice as many."""
    bc = builder.shuffle_vector(c, c, ir.Constant(ir.VectorType(_I32, WIDE), [j % nbytes for j in range(WIDE)]))
    wty = ir.VectorType(_I16, WIDE // 2)
    shifts = [((k0 + (2 * w) // nbytes) * p) for w in range(WIDE // 2)]
    if any(shifts):
        bc = builder.bitcast(builder.lshr(builder.bitcast(bc, wty), ir.Constant(wty, shifts)), bc.type)
    return builder.and_(bc, ir.Constant(bc.type, [(1 << p) - 1] * WIDE))


def _dpbusd(builder, acc, u, x):
    """acc + vpdpbusd(u, x): <n/4 x i32> acc; u, x: <n x i8> (u unsigned, x signed), n = 32 or 64."""
    vt = acc.type
    name = f"llvm.x86.avx512.vpdpbusd.{vt.count * 32}"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]), name)
    return builder.call(fn, [acc, builder.bitcast(u, vt), builder.bitcast(x, vt)])


def _load_bytes(builder, ptr, offset: int, n: int):
    p = builder.gep(ptr, [ir.Constant(_I64, offset)])
    return builder.load(builder.bitcast(p, ir.VectorType(_I8, n).as_pointer()), align=1)


def _group_acc(builder, u, xh, xl, g: int, split: bool):
    """<8 x i32> lanes summing to u · x over one group (x = 256·xh + xl when split, else xh)."""
    chunk = min(g, WIDE)
    vt = ir.VectorType(_I32, chunk // 4)
    hi = lo = ir.Constant(vt, [0] * vt.count)
    for c0 in range(0, g, chunk):
        uc = u if chunk == g else builder.shuffle_vector(
            u, u, ir.Constant(ir.VectorType(_I32, chunk), list(range(c0, c0 + chunk))))
        hi = _dpbusd(builder, hi, uc, _load_bytes(builder, xh, c0, chunk))
        if split:
            lo = _dpbusd(builder, lo, uc, _load_bytes(builder, xl, c0, chunk))
    if split:
        hi = builder.add(builder.shl(hi, ir.Constant(vt, [8] * vt.count)), lo)
    while hi.type.count > 8:
        hi = _halves(builder, hi)
    return hi


def _halves(builder, v):
    """<2n x i32> -> <n x i32>: the sum of the two halves."""
    n = v.type.count // 2
    vn = ir.VectorType(_I32, n)
    lo = builder.shuffle_vector(v, v, ir.Constant(vn, list(range(n))))
    hi = builder.shuffle_vector(v, v, ir.Constant(vn, list(range(n, 2 * n))))
    return builder.add(lo, hi)


def _check(bits, g, *flags):
    for v in (bits, g, *flags):
        if not isinstance(v, (types.IntegerLiteral, types.BooleanLiteral)):
            raise errors.RequireLiteralValue("vnni intrinsics need literal bits, group size and flags")
    nbits, glen = bits.literal_value, g.literal_value
    if nbits not in PLANES or glen not in (32, 64, 128):
        raise errors.TypingError(f"vnni: unsupported {nbits}-bit groups of {glen}")
    return nbits, glen


def _ptr(context, builder, aty, aval, off):
    arr = context.make_array(aty)(context, builder, value=aval)
    return builder.gep(arr.data, [off if off.type.width == 64 else builder.sext(off, _I64)])


@intrinsic
def group_idot8(typingctx, codes, boff, xh, xl, xoff, bits, g, split):
    """int32 u · x over one group: codes[boff:] packed, x = xh[xoff:] (int8), or 256·xh + xl when split."""
    nbits, glen = _check(bits, g, split)
    is_split = split.literal_value
    sig = types.int32(codes, boff, xh, xl, xoff, bits, g, split)

    def codegen(context, builder, signature, args):
        a = signature.args
        cptr = _ptr(context, builder, a[0], args[0], args[1])
        hptr = _ptr(context, builder, a[2], args[2], args[4])
        lptr = _ptr(context, builder, a[3], args[3], args[4])
        acc = _group_acc(builder, _codes_ir(builder, cptr, nbits, glen), hptr, lptr, glen, is_split)
        fnty = ir.FunctionType(_I32, [acc.type])
        red = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.add.v{acc.type.count}i32")
        return builder.call(red, [acc])

    return sig, codegen


@intrinsic
def quad_fdot8(typingctx, crow, scales, mins, r, gi, xh, xl, dx, xs, bits, g, asym, split):
    """float32 sum over the four groups gi..gi+3 of row r: d · dx · (u · x) − m · xs (m: the stored min when asym,
    else d · 2**(bits-1)), as :func:`lowbit.kernels.simd.quad_fdot` but on 8-bit activations (see module docstring).

    crow: u8[cols*bits/8]; scales, mins: u16[rows, ng] float16 bits; xh, xl: i8[cols] (xl unread unless split);
    dx, xs: f32[ng]. Callers guarantee gi + 4 <= ng. Needs hardware float16 conversion."""
    nbits, glen = _check(bits, g, asym, split)
    is_asym, is_split = asym.literal_value, split.literal_value
    sig = types.float32(crow, scales, mins, r, gi, xh, xl, dx, xs, bits, g, asym, split)
    gbytes = glen * nbits // 8

    def codegen(context, builder, signature, args):
        def arr(i):
            return context.make_array(signature.args[i])(context, builder, value=args[i])

        def as64(v):
            return v if v.type.width == 64 else builder.sext(v, _I64)

        row, g0 = as64(args[3]), as64(args[4])
        sc = arr(1)
        ng = builder.extract_value(sc.shape, 1)
        cbase = builder.gep(arr(0).data, [builder.mul(g0, ir.Constant(_I64, gbytes))])
        xoff = builder.mul(g0, ir.Constant(_I64, glen))
        hbase = builder.gep(arr(5).data, [xoff])
        lbase = builder.gep(arr(6).data, [xoff])
        parts = []
        for q in range(QUAD_LANES):
            u = _codes_ir(builder, builder.gep(cbase, [ir.Constant(_I64, q * gbytes)]), nbits, glen)
            hp = builder.gep(hbase, [ir.Constant(_I64, q * glen)])
            lp = builder.gep(lbase, [ir.Constant(_I64, q * glen)])
            parts.append(_halves(builder, _group_acc(builder, u, hp, lp, glen, is_split)))
        soff = builder.add(builder.mul(row, ng), g0)
        return quad_epilogue(builder, _sum4(builder, parts), sc.data, arr(2).data, soff, arr(7).data, arr(8).data,
                             g0, nbits, is_asym)

    return sig, codegen
