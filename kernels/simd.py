"""A portable SIMD building block for the quantized kernels, written as LLVM IR through a numba intrinsic.

``group_idot(codes, boff, xq, xoff, bits, g)`` is the integer dot product of one quantized group with int16
activations: the group's packed codes (``g * bits / 8`` bytes at ``codes[boff]``, laid out in bit planes as
``formats.qtypes`` describes) are loaded as byte vectors, unpacked by shift-and-mask, widened, multiplied with
``xq[xoff : xoff + g]`` (int16) and summed into one int32 (see ``_dot_ir`` for how the planes are arranged).
The IR is target independent; LLVM lowers the widen-multiply-add to the best the host has (``vpdpwssd`` with
AVX-512 VNNI, ``vpmaddwd`` with AVX2, ...).
``bits`` and ``g`` must be compile-time constants (the kernels close over them), so one definition serves every
quant type.

Bounds: callers guarantee ``boff + g*bits/8 <= codes.size`` and ``xoff + g <= xq.size`` (the intrinsic does not
check; the kernels derive both from validated shapes). The sum cannot overflow: |u·x| < 2**8 · 2**15 per element,
g <= 128 elements.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from lowbit.formats.qtypes import PLANES

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)


def _concat(builder, vecs: list):
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


def _dot_ir(builder, cptr, xptr, bits: int, g: int):
    """i32 sum over one group. Each shift-and-mask slot of a plane holds a contiguous run of the group's elements.
    Wide planes (4 or 8 bits: one or two slots) multiply each slot with its own run of activations directly; narrow
    planes (1 or 2 bits: four or eight short slots) are first put in element order and combined into one <g x i8>
    code vector, so the multiply runs on full-width registers: 2-bit slots are concatenated with shuffles; a 1-bit
    plane is spread with one shuffle (lane e gets byte e % nbytes) and each lane tests its own bit."""
    i64 = ir.IntType(64)
    total = None
    narrow = None  # <g x i8> codes of the narrow planes, in element order, already shifted into place
    shift = 0
    offset = 0
    for p in PLANES[bits]:
        n = 8 // p
        nbytes = g // n
        vty = ir.VectorType(_I8, nbytes)
        c = builder.load(builder.bitcast(builder.gep(cptr, [ir.Constant(i64, offset)]), vty.as_pointer()), align=1)
        if p == 1:  # element e is bit e // nbytes of byte e % nbytes: spread the bytes, test one bit per lane
            spread = builder.shuffle_vector(c, c, ir.Constant(ir.VectorType(_I32, g), [e % nbytes for e in range(g)]))
            masks = [(1 << (e // nbytes)) if e // nbytes < 7 else -128 for e in range(g)]  # i8: bit 7 is -128
            bit = ir.Constant(ir.VectorType(_I8, g), masks)
            hit = builder.icmp_unsigned("!=", builder.and_(spread, bit), ir.Constant(ir.VectorType(_I8, g), [0] * g))
            plane = builder.zext(hit, ir.VectorType(_I8, g))
            if shift:
                plane = builder.shl(plane, ir.Constant(plane.type, [shift] * g))
            narrow = plane if narrow is None else builder.or_(narrow, plane)
            offset += nbytes
            shift += p
            continue
        slots = []
        for k in range(n):
            slot = c if k == 0 else builder.lshr(c, ir.Constant(vty, [k * p] * nbytes))
            if k < n - 1:
                slot = builder.and_(slot, ir.Constant(vty, [(1 << p) - 1] * nbytes))
            slots.append(slot)
        if p >= 4:
            acc = None
            for k, slot in enumerate(slots):
                prod = _widen_mul(builder, slot, xptr, k * nbytes)
                acc = prod if acc is None else builder.add(acc, prod)
            part = _reduce(builder, acc)
            if shift:
                part = builder.shl(part, ir.Constant(_I32, shift))
            total = part if total is None else builder.add(total, part)
        else:
            plane = _concat(builder, slots)
            if shift:
                plane = builder.shl(plane, ir.Constant(plane.type, [shift] * g))
            narrow = plane if narrow is None else builder.or_(narrow, plane)
        offset += nbytes
        shift += p
    if narrow is not None:
        part = _reduce(builder, _widen_mul(builder, narrow, xptr, 0))
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


@intrinsic
def half_to_float(typingctx, h):
    """float16 bits (uint16) -> float32 with one conversion instruction (F16C's vcvtph2ps on x86)."""
    if h != types.uint16:
        raise errors.TypingError("half_to_float needs a uint16")

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(h), codegen


def host_has_f16c() -> bool:
    """Whether LLVM can convert float16 in hardware here (else it would need a runtime library call)."""
    import llvmlite.binding as llvm

    feats = llvm.get_host_cpu_features()
    return bool(feats.get("f16c")) or llvm.get_process_triple().startswith(("aarch64", "arm64"))
