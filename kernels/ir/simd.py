"""A portable SIMD building block for the quantized kernels, written as LLVM IR through a numba intrinsic.

``group_idot(codes, boff, xq, xoff, bits, g)`` is the integer dot product of one quantized group with int16
activations: the group's packed codes (``g * bits / 8`` bytes at ``codes[boff]``, laid out in bit planes as
``formats.qtypes`` describes) are loaded as byte vectors, unpacked by shift-and-mask, widened, multiplied with
``xq[xoff : xoff + g]`` (int16) and summed into one int32 (see ``_dot_ir`` for how the planes are arranged).
The IR is target independent; LLVM lowers the widen-multiply-add to the best the host has (``vpdpwssd`` with
AVX-512 VNNI, ``vpmaddwd`` with AVX2, ...).
``quad_fdot`` does four consecutive groups of a row in one call, scales included: the four integer dot products
are folded together (even/odd pairs first, which LLVM keeps as one multiply-add-pairs instruction) and the float
epilogue d·dx·s − m·xs runs on one 4-lane vector, so per-group fixed costs are shared. ``quad_fdot_unpacked`` is
the same on codes unpacked beforehand (one byte per element), for kernels that take one row through several tokens.
``bits`` and ``g`` must be compile-time constants (the kernels close over them), so one definition serves every
quant type.

Bounds: callers guarantee ``boff + g*bits/8 <= codes.size`` and ``xoff + g <= xq.size`` (the intrinsic does not
check; the kernels derive both from validated shapes). The sum cannot overflow: |u·x| < 2**8 · 2**15 per element,
g <= 128 elements.
"""

from __future__ import annotations

from functools import lru_cache
from types import MappingProxyType

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from lowbit.formats.qtypes import PLANES

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)


def concat_vectors(builder, vecs: list):
    """Concatenate equal-length vectors (a power-of-two count) into one, in order."""
    while len(vecs) > 1:
        n = vecs[0].type.count
        mask = ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n)))
        vecs = [builder.shuffle_vector(vecs[i], vecs[i + 1], mask) for i in range(0, len(vecs), 2)]
    return vecs[0]


def _widen_mul(builder, u, xptr, offset: int):
    """<n x i32> u * xq[offset : offset + n] for <n x i8> unsigned codes u."""
    n = u.type.count
    xty = ir.VectorType(ir.IntType(16), n)
    xp = builder.gep(xptr, [ir.Constant(ir.IntType(64), offset)])
    x = builder.load(builder.bitcast(xp, xty.as_pointer()), align=2)
    wide = ir.VectorType(_I32, n)
    return builder.mul(builder.zext(u, wide), builder.sext(x, wide))


def _reduce(builder, v):
    fnty = ir.FunctionType(_I32, [v.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.add.v{v.type.count}i32")
    return builder.call(fn, [v])


def _fold(builder, v, lanes: int):
    """Sum an <n x i32> vector of products down to ``lanes`` lanes: first even + odd neighbours (the pattern LLVM
    turns into one multiply-add-pairs instruction together with the multiply), then halves."""
    n = v.type.count // 2
    even = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(0, 2 * n, 2))))
    odd = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(1, 2 * n, 2))))
    v = builder.add(even, odd)
    while v.type.count > lanes:
        n = v.type.count // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
        v = builder.add(lo, hi)
    return v


def bit_plane(builder, c, nbytes: int, g: int):
    """<g x i8> 0/1 values of a 1-bit plane c (<nbytes x i8>) in element order: element e is bit e // nbytes of
    byte e % nbytes, so the bytes are spread with one shuffle and each lane tests its own bit."""
    spread = builder.shuffle_vector(c, c, ir.Constant(ir.VectorType(_I32, g), [e % nbytes for e in range(g)]))
    masks = [(1 << (e // nbytes)) if e // nbytes < 7 else -128 for e in range(g)]  # i8: bit 7 is -128
    bit = ir.Constant(ir.VectorType(_I8, g), masks)
    hit = builder.icmp_unsigned("!=", builder.and_(spread, bit), ir.Constant(ir.VectorType(_I8, g), [0] * g))
    return builder.zext(hit, ir.VectorType(_I8, g))


def plane_slots(builder, c, p: int) -> list:
    """The 8/p shift-and-mask slots of a p-bit plane c (<nbytes x i8>): slot k holds bits k·p of every byte, the
    elements k·nbytes .. (k+1)·nbytes - 1 of the group."""
    vty = c.type
    nbytes = vty.count
    slots = []
    for k in range(8 // p):
        slot = c if k == 0 else builder.lshr(c, ir.Constant(vty, [k * p] * nbytes))
        if k < 8 // p - 1:
            slot = builder.and_(slot, ir.Constant(vty, [(1 << p) - 1] * nbytes))
        slots.append(slot)
    return slots


def load_planes(builder, cptr, bits: int, g: int):
    """The bit planes of one group at cptr, in order: (plane width p, its bytes nbytes = g·p/8, those bytes as an
    <nbytes x i8> vector, the shift that puts the plane's values in place in the code)."""
    shift = 0
    offset = 0
    for p in PLANES[bits]:
        nbytes = g * p // 8
        vty = ir.VectorType(_I8, nbytes)
        ptr = builder.gep(cptr, [ir.Constant(ir.IntType(64), offset)])
        yield p, nbytes, builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1), shift
        offset += nbytes
        shift += p


def _dot_ir(builder, cptr, xptr, bits: int, g: int, lanes: int = 1):
    """i32 sum over one group. Each shift-and-mask slot of a plane holds a contiguous run of the group's elements.
    Wide planes (4 or 8 bits: one or two slots) multiply each slot with its own run of activations directly; narrow
    planes (1 or 2 bits: four or eight short slots) are first put in element order and combined into one <g x i8>
    code vector, so the multiply runs on full-width registers: 2-bit slots are concatenated with shuffles; a 1-bit
    plane is spread with one shuffle (lane e gets byte e % nbytes) and each lane tests its own bit."""
    total = None
    narrow = None  # <g x i8> codes of the narrow planes, in element order, already shifted into place
    for p, nbytes, c, shift in load_planes(builder, cptr, bits, g):
        if p == 1:
            plane = bit_plane(builder, c, nbytes, g)
            if shift:
                plane = builder.shl(plane, ir.Constant(plane.type, [shift] * g))
            narrow = plane if narrow is None else builder.or_(narrow, plane)
            continue
        slots = plane_slots(builder, c, p)
        if p >= 4:
            acc = None
            for k, slot in enumerate(slots):
                prod = _widen_mul(builder, slot, xptr, k * nbytes)
                if lanes > 1:
                    prod = _fold(builder, prod, lanes)
                acc = prod if acc is None else builder.add(acc, prod)
            part = _reduce(builder, acc) if lanes == 1 else acc
            if shift:
                part = builder.shl(part, ir.Constant(part.type, shift if lanes == 1 else [shift] * lanes))
            total = part if total is None else builder.add(total, part)
        else:
            plane = concat_vectors(builder, slots)
            if shift:
                plane = builder.shl(plane, ir.Constant(plane.type, [shift] * g))
            narrow = plane if narrow is None else builder.or_(narrow, plane)
    if narrow is not None:
        prod = _widen_mul(builder, narrow, xptr, 0)
        part = _reduce(builder, prod) if lanes == 1 else _fold(builder, prod, lanes)
        total = part if total is None else builder.add(total, part)
    return total


@intrinsic
def group_idot(typingctx, codes, boff, xq, xoff, bits, g):
    """int32 sum_j u_j * xq[xoff + j] over one group (see module docstring)."""
    if not isinstance(bits, types.IntegerLiteral) or not isinstance(g, types.IntegerLiteral):
        raise errors.RequireLiteralValue("group_idot needs literal bits and group size")
    nbits, glen = bits.literal_value, g.literal_value
    if nbits not in PLANES or glen % 8 or glen > 128:
        raise errors.TypingError(f"group_idot: unsupported {nbits}-bit groups of {glen}")
    if not (isinstance(codes, types.Array) and codes.dtype == types.uint8 and codes.layout == "C"):
        raise errors.TypingError("group_idot: codes must be a C-contiguous uint8 array")
    if not (isinstance(xq, types.Array) and xq.dtype == types.int16 and xq.layout == "C"):
        raise errors.TypingError("group_idot: xq must be a C-contiguous int16 array")
    sig = types.int32(codes, boff, xq, xoff, bits, g)

    def codegen(context, builder, signature, args):
        ca, bo, xa, xo = args[:4]
        carr = context.make_array(signature.args[0])(context, builder, value=ca)
        xarr = context.make_array(signature.args[2])(context, builder, value=xa)
        i64 = ir.IntType(64)
        cptr = builder.gep(carr.data, [builder.sext(bo, i64) if bo.type.width < 64 else bo])
        xptr = builder.gep(xarr.data, [builder.sext(xo, i64) if xo.type.width < 64 else xo])
        return _dot_ir(builder, cptr, xptr, nbits, glen)

    return sig, codegen


QUAD_LANES = 4


def _sum4(builder, vs):
    """<4 x i32> [sum(vs[0]), ..., sum(vs[3])] for four <4 x i32> vectors (two shuffle-and-add rounds)."""
    v4 = ir.VectorType(_I32, 4)

    def pairs(a, b):
        lo = builder.shuffle_vector(a, b, ir.Constant(v4, [0, 4, 1, 5]))
        hi = builder.shuffle_vector(a, b, ir.Constant(v4, [2, 6, 3, 7]))
        return builder.add(lo, hi)  # [a0+a2, b0+b2, a1+a3, b1+b3]

    ab, cd = pairs(vs[0], vs[1]), pairs(vs[2], vs[3])
    lo = builder.shuffle_vector(ab, cd, ir.Constant(v4, [0, 1, 4, 5]))
    hi = builder.shuffle_vector(ab, cd, ir.Constant(v4, [2, 3, 6, 7]))
    return builder.add(lo, hi)


def _quad_literals(name: str, bits, g, asym) -> tuple[int, int, bool]:
    """The compile-time (bits, group size, asym) of a quad intrinsic's call, checked."""
    for v in (bits, g, asym):
        if not isinstance(v, (types.IntegerLiteral, types.BooleanLiteral)):
            raise errors.RequireLiteralValue(f"{name} needs literal bits, group size and asym")
    nbits, glen = bits.literal_value, g.literal_value
    if nbits not in PLANES or glen not in (32, 64, 128):
        raise errors.TypingError(f"{name}: unsupported {nbits}-bit groups of {glen}")
    return nbits, glen, asym.literal_value


@intrinsic
def quad_fdot(typingctx, crow, scales, mins, r, gi, xq, dx, xs, bits, g, asym):
    """float32 sum over the four groups gi..gi+3 of row r: d * dx * (u . xq) - m * xs, with m the stored min (asym)
    or d * 2**(bits-1). The four integer dot products are reduced together and the scale arithmetic runs on one
    4-lane vector, so the per-group fixed costs are shared.

    crow: u8[cols*bits/8] (row r of the codes); scales, mins: u16[rows, ng] float16 bits, C-contiguous (mins unread
    unless asym); xq: i16[cols]; dx, xs: f32[ng]. Callers guarantee gi + 4 <= ng. Needs hardware float16 conversion.
    """
    nbits, glen, is_asym = _quad_literals("quad_fdot", bits, g, asym)
    sig = types.float32(crow, scales, mins, r, gi, xq, dx, xs, bits, g, asym)
    gbytes = glen * nbits // 8

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        def arr(i):
            return context.make_array(signature.args[i])(context, builder, value=args[i])

        def as64(v):
            return v if v.type.width == 64 else builder.sext(v, i64)

        row, g0 = as64(args[3]), as64(args[4])
        sc = arr(1)
        ng = builder.extract_value(sc.shape, 1)
        cbase = builder.gep(arr(0).data, [builder.mul(g0, ir.Constant(i64, gbytes))])
        xbase = builder.gep(arr(5).data, [builder.mul(g0, ir.Constant(i64, glen))])
        parts = []
        for q in range(QUAD_LANES):
            cptr = builder.gep(cbase, [ir.Constant(i64, q * gbytes)])
            xptr = builder.gep(xbase, [ir.Constant(i64, q * glen)])
            parts.append(_dot_ir(builder, cptr, xptr, nbits, glen, lanes=QUAD_LANES))
        soff = builder.add(builder.mul(row, ng), g0)
        return quad_epilogue(builder, _sum4(builder, parts), sc.data, arr(2).data, soff, arr(6).data, arr(7).data,
                             g0, nbits, is_asym)

    return sig, codegen


@intrinsic
def quad_fdot_unpacked(typingctx, urow, scales, mins, r, gi, xq, dx, xs, bits, g, asym):
    """quad_fdot on a row whose codes are already unpacked: urow u8[cols], one unsigned code per element in element
    order (gemm_vnni.unpack_row's output). The integer dot products are the same numbers, folded and finished by
    the same epilogue, so the result is quad_fdot's bit for bit; a kernel that unpacks a row once can then take it
    through several tokens' activations (a decode pass of several sequences) without unpacking it again."""
    nbits, glen, is_asym = _quad_literals("quad_fdot_unpacked", bits, g, asym)
    if not (isinstance(urow, types.Array) and urow.dtype == types.uint8 and urow.layout == "C"):
        raise errors.TypingError("quad_fdot_unpacked: urow must be a C-contiguous uint8 array")
    sig = types.float32(urow, scales, mins, r, gi, xq, dx, xs, bits, g, asym)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)

        def arr(i):
            return context.make_array(signature.args[i])(context, builder, value=args[i])

        def as64(v):
            return v if v.type.width == 64 else builder.sext(v, i64)

        row, g0 = as64(args[3]), as64(args[4])
        sc = arr(1)
        ng = builder.extract_value(sc.shape, 1)
        base = builder.mul(g0, ir.Constant(i64, glen))
        ubase = builder.gep(arr(0).data, [base])
        xbase = builder.gep(arr(5).data, [base])
        vty = ir.VectorType(_I8, glen).as_pointer()
        parts = []
        for q in range(QUAD_LANES):
            u = builder.load(builder.bitcast(builder.gep(ubase, [ir.Constant(i64, q * glen)]), vty), align=1)
            xptr = builder.gep(xbase, [ir.Constant(i64, q * glen)])
            parts.append(_fold(builder, _widen_mul(builder, u, xptr, 0), QUAD_LANES))
        soff = builder.add(builder.mul(row, ng), g0)
        return quad_epilogue(builder, _sum4(builder, parts), sc.data, arr(2).data, soff, arr(6).data, arr(7).data,
                             g0, nbits, is_asym)

    return sig, codegen


def quad_epilogue(builder, isum, sptr, mptr, soff, dxptr, xsptr, g0, nbits: int, asym: bool):
    """float32 Σ_q d_q · dx_q · isum_q − m_q · xs_q over four groups: isum <4 x i32> their integer dot products;
    d, m: four float16 (bits) from sptr / mptr at soff (m = d · 2**(nbits-1) unless asym); dx, xs: four float32
    from dxptr / xsptr at g0. The scale arithmetic of quad_fdot, on one 4-lane vector."""
    f32 = ir.FloatType()
    v4f = ir.VectorType(f32, QUAD_LANES)
    half4 = ir.VectorType(ir.HalfType(), QUAD_LANES)

    def load4(ptr, ty):
        return builder.load(builder.bitcast(ptr, ir.VectorType(ty, QUAD_LANES).as_pointer()), align=2)

    d = builder.fpext(builder.bitcast(load4(builder.gep(sptr, [soff]), ir.IntType(16)), half4), v4f)
    if asym:
        m = builder.fpext(builder.bitcast(load4(builder.gep(mptr, [soff]), ir.IntType(16)), half4), v4f)
    else:
        m = builder.fmul(d, ir.Constant(v4f, [float(1 << (nbits - 1))] * QUAD_LANES))
    dxv = load4(builder.gep(dxptr, [g0]), f32)
    xsv = load4(builder.gep(xsptr, [g0]), f32)
    terms = builder.fsub(builder.fmul(builder.fmul(d, dxv), builder.sitofp(isum, v4f)), builder.fmul(m, xsv))
    rfn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(f32, [f32, v4f]), f"llvm.vector.reduce.fadd.v{QUAD_LANES}f32"
    )
    return builder.call(rfn, [ir.Constant(f32, 0.0), terms])


@intrinsic
def half_to_float(typingctx, h):
    """float16 bits (uint16) -> float32 with one conversion instruction (F16C's vcvtph2ps on x86)."""
    if h != types.uint16:
        raise errors.TypingError("half_to_float needs a uint16")

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(h), codegen


@intrinsic
def bits_to_float(typingctx, i):
    """float32 whose bit pattern is the low 32 bits of integer i (a free bitcast; LLVM vectorizes it)."""
    if not isinstance(i, types.Integer):
        raise errors.TypingError("bits_to_float needs an integer")

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width != 32:
            v = builder.trunc(v, _I32)
        return builder.bitcast(v, ir.FloatType())

    return types.float32(i), codegen


def prefetch_line(builder, ptr) -> None:
    """Emit a read prefetch (into all cache levels) of the line holding ``ptr``: a hint that never faults."""
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0i8")
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


@lru_cache(maxsize=1)
def host_cpu_features() -> MappingProxyType:
    """LLVM's feature flags of this CPU (name -> bool), the one place the kernels ask what the host has (asked once:
    the code generators ask per instruction they emit)."""
    import llvmlite.binding as llvm

    return MappingProxyType(dict(llvm.get_host_cpu_features()))


def host_has_f16c() -> bool:
    """Whether LLVM can convert float16 in hardware here (else it would need a runtime library call)."""
    import llvmlite.binding as llvm

    return bool(host_cpu_features().get("f16c")) or llvm.get_process_triple().startswith(("aarch64", "arm64"))
