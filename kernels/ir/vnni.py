"""Integer dot products on 8-bit activations with the CPU's byte dot-product instruction (x86 ``vpdpbusd``, AVX-512
VNNI or AVX-VNNI), written as LLVM IR through numba intrinsics. On AVX2 CPUs without it, each ``vpdpbusd`` is the
pair ``vpmaddubsw`` (byte products, neighbouring pairs summed into 16 bits) + ``vpmaddwd`` by ones (pairs of those
into 32 bits) + an add: the same integer lanes exactly, as long as no 16-bit pair saturates, i.e. for codes of up to
7 bits (2 · 127 · 128 < 2**15; see :func:`byte_dot_max_bits`).

A group's packed codes (``formats.qtypes`` bit planes) are unpacked by shift-and-mask into one ``<g x i8>`` vector of
unsigned codes in element order; ``vpdpbusd`` then multiplies 32 (or 64) codes at a time with signed 8-bit
activations and adds each four neighbouring products into a 32-bit lane. Codes are never widened, which is what
makes this about twice the multiply-add rate of the 16-bit path of :mod:`lowbit.kernels.ir.simd`.

Two activation formats:

- *int8*: ``x ≈ dx · xq`` with ``xq`` in [-127, 127] (llama.cpp's Q8 activations). One instruction per chunk.
- *split*: the int16 activations of :mod:`lowbit.kernels.cpu_quant`, carried as two bytes ``xq = 256·hi + lo`` with
  hi, lo signed. Two instructions per chunk, results identical to the 16-bit path's (``|xq| <= 32639`` so hi fits).

``bits``, ``g``, ``asym`` and ``split`` are compile-time constants, so one definition serves every quant type.
Bounds are the caller's (as in :mod:`lowbit.kernels.ir.simd`). Sums cannot overflow: |u·lo| < 2**8·2**7 and
256·|u·hi| < 2**8·2**8·2**7 per element, g <= 128 elements.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from lowbit.formats.qtypes import PLANES
from lowbit.kernels.ir.simd import bit_plane, concat_vectors, host_cpu_features, load_planes, plane_slots, prefetch_line

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
PREFETCH_AHEAD = 2048  # bytes of codes ahead of the group being multiplied that row_fdot8 asks the cache for
WIDE = 32  # bytes per vpdpbusd: the 256-bit form (the 512-bit one measured ~25% slower on Zen 4, bench/matvec_speed.py)


def host_has_vnni() -> bool:
    """Whether this CPU has the 256-bit byte dot product LLVM's ``llvm.x86.avx512.vpdpbusd.256`` lowers to."""
    f = host_cpu_features()
    return bool(f.get("avxvnni")) or bool(f.get("avx512vnni") and f.get("avx512vl"))


def host_has_avx2() -> bool:
    """Whether this CPU has AVX2's byte and word multiply-adds (``vpmaddubsw``, ``vpmaddwd``)."""
    return bool(host_cpu_features().get("avx2"))


def host_has_byte_dot() -> bool:
    """Whether the byte dot-product kernels run here: natively (VNNI) or as the AVX2 pair."""
    return host_has_vnni() or host_has_avx2()


def byte_dot_max_bits() -> int:
    """The widest codes the byte dot product multiplies exactly here: 8 with VNNI (32-bit lanes, no saturation);
    7 on AVX2, whose ``vpmaddubsw`` saturates a pair of products at 2**15 − 1 (8-bit codes: 2 · 255 · 128 > 2**15)."""
    return 8 if host_has_vnni() else 7


def host_has_avx512_vnni() -> bool:
    """Whether this CPU has the 512-bit byte dot product (AVX-512 VNNI)."""
    f = host_cpu_features()
    return bool(f.get("avx512vnni") and f.get("avx512f"))


def codes_ir(builder, cptr, bits: int, g: int):
    """<g x i8> unsigned codes of one group in element order (planes shifted into place and or-ed together)."""
    out = None
    for p, nbytes, c, shift in load_planes(builder, cptr, bits, g):
        if p == 1:
            plane = bit_plane(builder, c, nbytes, g)
        elif nbytes < WIDE and g >= WIDE:
            slots = range(0, 8 // p, WIDE // nbytes)
            plane = concat_vectors(builder, [_narrow_chunk(builder, c, p, nbytes, k0) for k0 in slots])
        else:
            plane = concat_vectors(builder, plane_slots(builder, c, p))
        if shift:
            plane = builder.shl(plane, ir.Constant(plane.type, [shift] * g))
        out = plane if out is None else builder.or_(out, plane)
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


def dpbusd(builder, acc, u, x):
    """acc + vpdpbusd(u, x): <n/4 x i32> acc; u, x: <n x i8> or their <n/4 x i32> bitcasts (u unsigned, x signed),
    n = 32 or 64 (64: VNNI hosts only). Without VNNI: the AVX2 pair of the module docstring (exact for codes up to
    7 bits, which the kernels' callers guarantee: cpu_quant.make_kernels)."""
    vt = acc.type
    if host_has_vnni():
        name = f"llvm.x86.avx512.vpdpbusd.{vt.count * 32}"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]), name)
        return builder.call(fn, [acc, builder.bitcast(u, vt), builder.bitcast(x, vt)])
    if vt.count != 8:
        raise errors.TypingError("the AVX2 byte dot product is 256 bits wide")
    return widen_pairs(builder, acc, byte_pairs(builder, u, x))


def fused_chunks(bits: int) -> int:
    """How many byte dot products of ``bits``-bit codes may add their 16-bit pair sums (``vpmaddubsw``) in 16 bits
    before one ``vpmaddwd`` widens them, exactly: k · 2 · (2**bits − 1) · 128 <= 2**15 − 1 (4-bit codes: 8 chunks,
    a group of 32 in the prompt GEMM's layout; 3-bit: 16; 2-bit: 42). 1 with VNNI, whose ``vpdpbusd`` widens
    itself. On AVX2 this halves the multiplies per chunk (one ``vpmaddubsw`` and an add instead of two multiplies
    and an add)."""
    if host_has_vnni():
        return 1
    return max(1, 32767 // (2 * ((1 << bits) - 1) * 128))


def byte_pairs(builder, u, x):
    """<16 x i16> ``vpmaddubsw(u, x)``: neighbouring products of unsigned u and signed x bytes (<32 x i8> or their
    <8 x i32> bitcasts) summed in pairs (saturating; callers keep codes within :func:`byte_dot_max_bits`)."""
    vb = ir.VectorType(_I8, 32)
    vw = ir.VectorType(_I16, 16)
    ubsw = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vw, [vb, vb]), "llvm.x86.avx2.pmadd.ub.sw")
    return builder.call(ubsw, [builder.bitcast(u, vb), builder.bitcast(x, vb)])


def widen_pairs(builder, acc, pairs):
    """acc (<8 x i32>) + ``vpmaddwd(pairs, 1)``: neighbouring 16-bit lanes summed into 32 bits."""
    vw = pairs.type
    wd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc.type, [vw, vw]), "llvm.x86.avx2.pmadd.wd")
    return builder.add(acc, builder.call(wd, [pairs, ir.Constant(vw, [1] * 16)]))


def _load_bytes(builder, ptr, offset: int, n: int):
    p = builder.gep(ptr, [ir.Constant(_I64, offset)])
    return builder.load(builder.bitcast(p, ir.VectorType(_I8, n).as_pointer()), align=1)


def _group_acc(builder, u, xh, xl, bits: int, g: int, split: bool):
    """<8 x i32> lanes summing to u · x over one group (x = 256·xh + xl when split, else xh). On AVX2 the chunks'
    16-bit pair sums are added before widening, :func:`fused_chunks` at a time."""
    chunk = min(g, WIDE)
    vt = ir.VectorType(_I32, chunk // 4)
    hi = lo = ir.Constant(vt, [0] * vt.count)
    fuse = fused_chunks(bits) if chunk == WIDE else 1
    n = g // chunk
    pairs = [None, None]
    for c, c0 in enumerate(range(0, g, chunk)):
        uc = u if chunk == g else builder.shuffle_vector(
            u, u, ir.Constant(ir.VectorType(_I32, chunk), list(range(c0, c0 + chunk))))
        if fuse > 1:
            for k, xp in enumerate((xh, xl) if split else (xh,)):
                p = byte_pairs(builder, uc, _load_bytes(builder, xp, c0, chunk))
                pairs[k] = p if c % fuse == 0 else builder.add(pairs[k], p)
            if c % fuse == fuse - 1 or c == n - 1:
                hi = widen_pairs(builder, hi, pairs[0])
                if split:
                    lo = widen_pairs(builder, lo, pairs[1])
            continue
        hi = dpbusd(builder, hi, uc, _load_bytes(builder, xh, c0, chunk))
        if split:
            lo = dpbusd(builder, lo, uc, _load_bytes(builder, xl, c0, chunk))
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


def check_literals(bits, g, *flags):
    for v in (bits, g, *flags):
        if not isinstance(v, (types.IntegerLiteral, types.BooleanLiteral)):
            raise errors.RequireLiteralValue("vnni intrinsics need literal bits, group size and flags")
    nbits, glen = bits.literal_value, g.literal_value
    if nbits not in PLANES or glen not in (32, 64, 128):
        raise errors.TypingError(f"vnni: unsupported {nbits}-bit groups of {glen}")
    return nbits, glen


@intrinsic
def row_fdot8(typingctx, crow, scales, mins, r, xh, xl, dx, xs, bits, g, asym, split):
    """float32 row r of W times one token, all groups in one call: Σ_g d_g · dx_g · (u_g · x_g) − m_g · xs_g, with
    m the stored min when asym, else d · 2**(bits-1) (see module docstring for x).

    Groups go eight at a time: their scales (and mins, dx, xs) are one vector load each, and each group's integer
    lanes are converted and multiplied into float accumulators with one fused multiply-add (two independent
    chains), so the horizontal sum runs once per row; the last ng % 8 groups take their scales one by one.
    (Four groups per call with a horizontal sum each measured ~25% slower: 100 vs 134 Gw/s, 4-bit g64.)

    crow: u8[cols*bits/8] (row r of the codes); scales, mins: u16[rows, ng] float16 bits, C-contiguous (mins
    unread unless asym); xh, xl: i8[cols] (xl unread unless split); dx, xs: f32[ng]. Needs hardware float16
    conversion."""
    nbits, glen = check_literals(bits, g, asym, split)
    is_asym, is_split = asym.literal_value, split.literal_value
    sig = types.float32(crow, scales, mins, r, xh, xl, dx, xs, bits, g, asym, split)
    gbytes = glen * nbits // 8
    zp = float(1 << (nbits - 1))

    def codegen(context, builder, signature, args):
        def arr(i):
            return context.make_array(signature.args[i])(context, builder, value=args[i])

        ca, sa, ma, ha, la, da, xa = arr(0), arr(1), arr(2), arr(4), arr(5), arr(6), arr(7)
        row = args[3] if args[3].type.width == 64 else builder.sext(args[3], _I64)
        ng = builder.extract_value(sa.shape, 1)
        v8f = ir.VectorType(_F32, 8)
        v8h = ir.VectorType(ir.HalfType(), 8)
        zero8 = ir.Constant(v8f, [0.0] * 8)
        fma8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f] * 3), "llvm.fma.v8f32")
        facc = [cgutils.alloca_once_value(builder, zero8) for _ in range(2)]
        macc = cgutils.alloca_once_value(builder, zero8)
        mtail = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
        srow = builder.mul(row, ng)

        def load8(ptr, off, ty):
            return builder.load(builder.bitcast(builder.gep(ptr, [off]), ir.VectorType(ty, 8).as_pointer()), align=2)

        def halves8(ptr, off):
            return builder.fpext(builder.bitcast(load8(ptr, off, _I16), v8h), v8f)

        def group(gi, scale, k):
            """facc[k] += float(u_gi · x_gi) * scale (scale: <8 x float> splat)."""
            cptr = builder.gep(ca.data, [builder.mul(gi, ir.Constant(_I64, gbytes))])
            xoff = builder.mul(gi, ir.Constant(_I64, glen))
            iacc = _group_acc(builder, codes_ir(builder, cptr, nbits, glen), builder.gep(ha.data, [xoff]),
                              builder.gep(la.data, [xoff]), nbits, glen, is_split)
            builder.store(builder.call(fma8, [builder.sitofp(iacc, v8f), scale, builder.load(facc[k])]), facc[k])

        def prefetch(ptr, off):
            prefetch_line(builder, builder.gep(ptr, [off]))

        n8 = builder.udiv(ng, ir.Constant(_I64, 8))
        with cgutils.for_range(builder, n8) as loop:
            g0 = builder.mul(loop.index, ir.Constant(_I64, 8))
            cbase = builder.mul(g0, ir.Constant(_I64, gbytes))
            for off in range(0, 8 * gbytes, 64):
                prefetch(ca.data, builder.add(cbase, ir.Constant(_I64, off + PREFETCH_AHEAD)))
            sahead = ir.Constant(_I64, PREFETCH_AHEAD // gbytes)  # the same rows ahead, in scales (one per group)
            prefetch(sa.data, builder.add(builder.add(srow, g0), sahead))
            if is_asym:
                prefetch(ma.data, builder.add(builder.add(srow, g0), sahead))
            d = halves8(sa.data, builder.add(srow, g0))
            dd = builder.fmul(d, load8(da.data, g0, _F32))
            m = halves8(ma.data, builder.add(srow, g0)) if is_asym else d
            builder.store(builder.call(fma8, [m, load8(xa.data, g0, _F32), builder.load(macc)]), macc)
            for q in range(8):
                splat = builder.shuffle_vector(dd, dd, ir.Constant(ir.VectorType(_I32, 8), [q] * 8))
                group(builder.add(g0, ir.Constant(_I64, q)), splat, q % 2)
        with cgutils.for_range(builder, builder.sub(ng, builder.mul(n8, ir.Constant(_I64, 8)))) as loop:
            gi = builder.add(builder.mul(n8, ir.Constant(_I64, 8)), loop.index)
            soff = builder.add(srow, gi)
            d = builder.fpext(builder.bitcast(builder.load(builder.gep(sa.data, [soff])), ir.HalfType()), _F32)
            m = builder.fpext(builder.bitcast(builder.load(builder.gep(ma.data, [soff])), ir.HalfType()), _F32) \
                if is_asym else d
            builder.store(builder.fadd(builder.load(mtail), builder.fmul(m, builder.load(builder.gep(xa.data, [gi])))),
                          mtail)
            s = builder.fmul(d, builder.load(builder.gep(da.data, [gi])))
            sv = builder.insert_element(ir.Constant(v8f, ir.Undefined), s, ir.Constant(_I32, 0))
            group(gi, builder.shuffle_vector(sv, sv, ir.Constant(ir.VectorType(_I32, 8), [0] * 8)), 0)

        rfn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, v8f]),
                                             "llvm.vector.reduce.fadd.v8f32")
        dot = builder.call(rfn, [ir.Constant(_F32, 0.0), builder.fadd(builder.load(facc[0]), builder.load(facc[1]))])
        mins_sum = builder.fadd(builder.call(rfn, [ir.Constant(_F32, 0.0), builder.load(macc)]), builder.load(mtail))
        if not is_asym:
            mins_sum = builder.fmul(mins_sum, ir.Constant(_F32, zp))
        return builder.fsub(dot, mins_sum)

    return sig, codegen
