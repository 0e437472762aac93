"""numba CPU kernels of attention over the KV cache, and the SIMD intrinsics (LLVM IR) they are built on.

Attention for one query reads each cached key and value row once per query head. Written as plain loops, the
scores pay a horizontal sum per key (a dot product of two short rows), and the weighted sum of values loads and
stores the output row once per key. The intrinsics take eight keys at a time instead:

- ``scores8``: eight dot products ``q · k_i`` with eight independent vector accumulators (one fused multiply-add
  per 8 elements and key), then one 8×8 transpose-and-add that leaves the eight sums in one vector.
- ``values8``: ``out += Σ_i p_i · v_i`` over eight value rows, 8 elements at a time: the output chunk is loaded and
  stored once per eight keys.

Rows are ``n`` floats (the head dim, a multiple of 8: the kernels take plain loops otherwise) and the eight rows are
consecutive in memory (rows s .. s+7 of a ``[ctx, n]`` float32 cache slice, or of a small float32 tile that
``load_rows`` decodes a float16 or quantized cache into: kernels/kv_formats.py). Bounds are the caller's: the
intrinsics read ``q[qoff : qoff + n]`` and ``k[koff : koff + 8n]`` (``values8``: ``p[poff : poff + 8]``,
``v[voff : voff + 8n]`` and ``out[ooff : ooff + n]``) without checks. Arrays must be C-contiguous float32.
On a float16 cache with head dim 64 and at most four query heads per key/value head, ``_scores`` and
``_weighted_values`` hand a range to kernels/attention16.py instead (float16 rows read directly, every load shared
by the four heads: kernels/ir/attn16.py).
The intrinsics live in this file with the kernels that inline them because numba's on-disk cache checks only the
kernel's own source file.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload

from lowbit.kernels.attention16 import scores16, values16
from lowbit.kernels.cpu import JIT, PRANGE, fast_exp, h2f
from lowbit.kernels.ir.simd import prefetch_line

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V8 = ir.VectorType(_F32, 8)
KEYS = 8  # rows per call
PREFETCH_AHEAD = 2048  # bytes of cached keys/values ahead of the block being read that the kernels prefetch


def _check_arrays(*arrs):
    for a in arrs:
        if not (isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C"):
            raise errors.TypingError("attention intrinsics need C-contiguous float32 arrays")


def _data(context, builder, aty, aval, off):
    arr = context.make_array(aty)(context, builder, value=aval)
    return builder.gep(arr.data, [off if off.type.width == 64 else builder.sext(off, _I64)])


def _operands(context, builder, signature, args):
    """(pointer, pointer, pointer, row length as i64) of the intrinsics' (array, offset) × 3 + n arguments."""
    a = signature.args
    ptrs = [_data(context, builder, a[i], args[i], args[i + 1]) for i in (0, 2, 4)]
    width = args[6] if args[6].type.width == 64 else builder.sext(args[6], _I64)
    return (*ptrs, width)


def _load8(builder, ptr, off):
    return builder.load(builder.bitcast(builder.gep(ptr, [off]), _V8.as_pointer()), align=4)


def _fma(builder):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8, [_V8] * 3), "llvm.fma.v8f32")


def _transpose_sum(builder, accs):
    """<8 x float> whose lane i is the sum of accs[i]'s eight lanes (three rounds of pairwise shuffle-and-add)."""

    def pair(a, b, lo, hi):
        return builder.fadd(builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 8), lo)),
                            builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 8), hi)))

    l1 = [pair(accs[2 * i], accs[2 * i + 1], [0, 8, 2, 10, 4, 12, 6, 14], [1, 9, 3, 11, 5, 13, 7, 15])
          for i in range(4)]
    l2 = [pair(l1[2 * i], l1[2 * i + 1], [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]) for i in range(2)]
    return pair(l2[0], l2[1], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])


@intrinsic
def prefetch(typingctx, a, off):
    """Ask the cache for the line holding byte ``off`` of a's data (a hint: never faults, whatever the address)."""
    if not (isinstance(a, types.Array) and a.layout == "C"):
        raise errors.TypingError("prefetch needs a C-contiguous array")
    sig = types.void(a, off)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, value=args[0])
        base = builder.bitcast(arr.data, ir.IntType(8).as_pointer())
        o = args[1] if args[1].type.width == 64 else builder.sext(args[1], _I64)
        prefetch_line(builder, builder.gep(base, [o]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dequant8_q8(typingctx, out, ooff, src, soff, d):
    """out[ooff : ooff+8] = d · src[soff : soff+8] (int8 codes: sign-extended, converted, scaled in one vector)."""
    if not (isinstance(src, types.Array) and src.dtype == types.int8 and src.layout == "C"):
        raise errors.TypingError("dequant8_q8 needs C-contiguous int8 codes")
    _check_arrays(out)
    sig = types.void(out, ooff, src, soff, d)

    def codegen(context, builder, signature, args):
        a = signature.args
        optr = _data(context, builder, a[0], args[0], args[1])
        sptr = _data(context, builder, a[2], args[2], args[3])
        codes = builder.load(builder.bitcast(sptr, ir.VectorType(ir.IntType(8), 8).as_pointer()), align=1)
        x = builder.sitofp(codes, _V8)
        builder.store(builder.fmul(x, _splat(builder, args[4])), builder.bitcast(optr, _V8.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dequant8_q4(typingctx, out, ooff, src, soff, half, d):
    """Eight bytes of 4-bit codes src[soff : soff+8]: out[ooff + i] = d · (low nibble i - 8) and
    out[ooff + half + i] = d · (high nibble i - 8) for i in 0..7."""
    if not (isinstance(src, types.Array) and src.dtype == types.uint8 and src.layout == "C"):
        raise errors.TypingError("dequant8_q4 needs C-contiguous uint8 codes")
    _check_arrays(out)
    sig = types.void(out, ooff, src, soff, half, d)

    def codegen(context, builder, signature, args):
        a = signature.args
        optr = _data(context, builder, a[0], args[0], args[1])
        sptr = _data(context, builder, a[2], args[2], args[3])
        v8i8 = ir.VectorType(ir.IntType(8), 8)
        v8i32 = ir.VectorType(_I32, 8)
        codes = builder.zext(builder.load(builder.bitcast(sptr, v8i8.as_pointer()), align=1), v8i32)
        eight = ir.Constant(v8i32, [8] * 8)
        lo = builder.sub(builder.and_(codes, ir.Constant(v8i32, [15] * 8)), eight)
        hi = builder.sub(builder.lshr(codes, ir.Constant(v8i32, [4] * 8)), eight)
        dv = _splat(builder, args[5])
        builder.store(builder.fmul(builder.sitofp(lo, _V8), dv), builder.bitcast(optr, _V8.as_pointer()), align=4)
        hoff = args[4] if args[4].type.width == 64 else builder.sext(args[4], _I64)
        hptr = builder.gep(optr, [hoff])
        builder.store(builder.fmul(builder.sitofp(hi, _V8), dv), builder.bitcast(hptr, _V8.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _splat(builder, x):
    v = builder.insert_element(ir.Constant(_V8, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 8), [0] * 8))


def load_rows(tile, data, scales, kv, s, n):
    """Positions s .. s+n-1 (n <= 8) of one head of a cache as float32: (rows, r0) with position s + i at
    rows[r0 + i]. Position p is row p % (the cache's rows): a ring where a sliding-window layer keeps only its window.
    A float32 cache is read in place (unless the eight rows wrap around the ring); other formats are decoded into
    tile f32[8, hd]. (Overloaded per data dtype.)"""


@overload(load_rows, jit_options=JIT)
def _load_rows(tile, data, scales, kv, s, n):
    if data.dtype == types.float32:

        def impl(tile, data, scales, kv, s, n):
            size = data.shape[1]
            r = s % size
            if r + n <= size:
                return data[kv], r
            for i in range(n):
                rr = (s + i) % size
                for j in range(tile.shape[1]):
                    tile[i, j] = data[kv, rr, j]
            return tile, 0

        return impl
    if data.dtype == types.uint16:

        def impl(tile, data, scales, kv, s, n):
            size = data.shape[1]
            for i in range(n):
                rr = (s + i) % size
                for j in range(tile.shape[1]):
                    tile[i, j] = h2f(data[kv, rr, j])
            return tile, 0

        return impl
    if data.dtype == types.int8:

        def impl(tile, data, scales, kv, s, n):
            ng = scales.shape[2]
            hd = tile.shape[1]
            g = hd // ng
            size = data.shape[1]
            for i in range(n):
                rr = (s + i) % size
                base = (kv * size + rr) * hd  # of the row in data (flat)
                for gi in range(ng):
                    d = h2f(scales[kv, rr, gi])
                    if g % 8 == 0:
                        for j in range(gi * g, gi * g + g, 8):
                            dequant8_q8(tile, i * hd + j, data, base + j, d)
                    else:
                        for j in range(gi * g, gi * g + g):
                            tile[i, j] = np.float32(data[kv, rr, j]) * d
            return tile, 0

        return impl
    if data.dtype == types.uint8:

        def impl(tile, data, scales, kv, s, n):
            ng = scales.shape[2]
            hd = tile.shape[1]
            g = hd // ng
            half = g // 2
            size = data.shape[1]
            for i in range(n):
                rr = (s + i) % size
                base = (kv * size + rr) * (hd // 2)  # of the row in data (flat)
                for gi in range(ng):
                    d = h2f(scales[kv, rr, gi])
                    if half % 8 == 0:
                        for j in range(0, half, 8):
                            dequant8_q4(tile, i * hd + gi * g + j, data, base + gi * half + j, half, d)
                    else:
                        for j in range(half):
                            b = np.int32(data[kv, rr, gi * half + j])
                            tile[i, gi * g + j] = np.float32((b & 15) - 8) * d
                            tile[i, gi * g + half + j] = np.float32((b >> 4) - 8) * d
            return tile, 0

        return impl
    raise errors.TypingError(f"no KV cache format stores {data.dtype}")


@intrinsic
def scores8(typingctx, out, ooff, q, qoff, k, koff, n, scale):
    """out[ooff + i] = scale · (q[qoff : qoff+n] · k[koff + i·n : koff + (i+1)·n]) for i in 0..7."""
    _check_arrays(out, q, k)
    sig = types.void(out, ooff, q, qoff, k, koff, n, scale)

    def codegen(context, builder, signature, args):
        optr, qptr, kptr, width = _operands(context, builder, signature, args)
        fma = _fma(builder)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_V8, [0.0] * 8)) for _ in range(KEYS)]
        with cgutils.for_range(builder, builder.udiv(width, ir.Constant(_I64, 8))) as loop:
            c = builder.mul(loop.index, ir.Constant(_I64, 8))
            qv = _load8(builder, qptr, c)
            for i in range(KEYS):
                kv = _load8(builder, kptr, builder.add(builder.mul(width, ir.Constant(_I64, i)), c))
                builder.store(builder.call(fma, [qv, kv, builder.load(accs[i])]), accs[i])
        sums = _transpose_sum(builder, [builder.load(acc) for acc in accs])
        sv = builder.insert_element(ir.Constant(_V8, ir.Undefined), args[7], ir.Constant(_I32, 0))
        sv = builder.shuffle_vector(sv, sv, ir.Constant(ir.VectorType(_I32, 8), [0] * 8))
        builder.store(builder.fmul(sums, sv), builder.bitcast(optr, _V8.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def values8(typingctx, out, ooff, p, poff, v, voff, n):
    """out[ooff : ooff+n] += Σ_i p[poff + i] · v[voff + i·n : voff + (i+1)·n] for i in 0..7."""
    _check_arrays(out, p, v)
    sig = types.void(out, ooff, p, poff, v, voff, n)

    def codegen(context, builder, signature, args):
        optr, pptr, vptr, width = _operands(context, builder, signature, args)
        fma = _fma(builder)
        pv = _load8(builder, pptr, ir.Constant(_I64, 0))
        splats = [builder.shuffle_vector(pv, pv, ir.Constant(ir.VectorType(_I32, 8), [i] * 8)) for i in range(KEYS)]
        with cgutils.for_range(builder, builder.udiv(width, ir.Constant(_I64, 8))) as loop:
            c = builder.mul(loop.index, ir.Constant(_I64, 8))
            acc = _load8(builder, optr, c)
            for i in range(KEYS):
                vv = _load8(builder, vptr, builder.add(builder.mul(width, ir.Constant(_I64, i)), c))
                acc = builder.call(fma, [splats[i], vv, acc])
            builder.store(acc, builder.bitcast(builder.gep(optr, [c]), _V8.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@nb.njit(**JIT)
def _prefetch_rows(data, kv, s):
    """Prefetch every fourth line of the eight rows PREFETCH_AHEAD bytes past row s of head kv (more cost more
    than they save: the hardware follows on within a page)."""
    row = data.shape[2] * data.itemsize
    base = (kv * data.shape[1] + s % data.shape[1]) * row + PREFETCH_AHEAD
    for f in range(0, KEYS * row, 256):
        prefetch(data, base + f)


MASKED = np.float32(-3.0e38)  # the score of a key a query does not see (finite: the kernels assume no infinities)


@nb.njit(**JIT)
def _padded_rows(tile, data, scales, kv, s, n):
    """tile[:n] = positions s .. s+n-1 (n < 8) of one head as float32, tile[n:] = 0: the last keys of a range, so
    the intrinsics can take them as a group of eight."""
    rows, r0 = load_rows(tile, data, scales, kv, s, n)
    for i in range(n):
        for j in range(tile.shape[1]):
            tile[i, j] = rows[r0 + i, j]
    for i in range(n, KEYS):
        for j in range(tile.shape[1]):
            tile[i, j] = 0.0


@nb.njit(**JIT)
def _cap8(v, off, cap):
    """v[off : off+8] = cap * tanh(v / cap): eight scores at a time whatever the range's length, so that LLVM makes
    the same instructions of every score (a vectorized tanh and a scalar one differ in the last bits)."""
    for j in range(KEYS):
        v[off + j] = np.float32(cap * math.tanh(v[off + j] / cap))


@nb.njit(**JIT)
def _scores(sc, q, t0, rep, h0, kd, ks, kv, s0, m, scale, cap, tile):
    """sc[i · rep + r, s] = (soft-capped) scale * q[t0 + i, h0 + r] . key[kv, s0 + s]: the rep query heads of one kv
    head for queries t0 .. t0 + sc.shape[0] / rep - 1, so that each key is loaded (and decoded: load_rows) once for
    them all. Eight keys per call of the attention intrinsic where the head dim is a multiple of 8, the last ones
    too (zero-padded), so that a key's score is the same number whichever keys share its call (a prompt computed in
    one pass or after a cached prefix agree bit for bit); one by one otherwise."""
    if scores16(sc, q, t0, rep, h0, kd, kv, s0, m, scale, cap):
        return
    rows_n = sc.shape[0]
    hd = q.shape[2]
    m8 = m // KEYS * KEYS if hd % 8 == 0 else 0
    for s in range(0, m8, KEYS):
        _prefetch_rows(kd, kv, s0 + s)
        rows, r0 = load_rows(tile, kd, ks, kv, s0 + s, KEYS)
        for i in range(rows_n):
            scores8(sc[i], s, q[t0 + i // rep, h0 + i % rep], 0, rows, r0 * hd, hd, scale)
            if cap > 0:
                _cap8(sc[i], s, cap)
    part = np.zeros(KEYS, dtype=np.float32)
    if hd % 8 == 0 and m8 < m:
        _padded_rows(tile, kd, ks, kv, s0 + m8, m - m8)
        for i in range(rows_n):
            scores8(part, 0, q[t0 + i // rep, h0 + i % rep], 0, tile, 0, hd, scale)
            if cap > 0:
                _cap8(part, 0, cap)
            for s in range(m8, m):
                sc[i, s] = part[s - m8]
    for s in range(m8 if hd % 8 != 0 else m, m):
        rows, r0 = load_rows(tile, kd, ks, kv, s0 + s, 1)
        for i in range(rows_n):
            acc = np.float32(0.0)
            for j in range(hd):
                acc += q[t0 + i // rep, h0 + i % rep, j] * rows[r0, j]
            sc[i, s] = acc * scale
            if cap > 0:  # one score at a time (the head dim is not a multiple of 8): the same code for each
                part[0] = sc[i, s]
                _cap8(part, 0, cap)
                sc[i, s] = part[0]


@nb.njit(**JIT)
def _exp_rows(sc, m, mx, tot, s0):
    """sc[r, :m] = exp(sc[r, :m] - mx[r]) with mx[r] the row's max (masked scores: exactly 0); tot[r] = the row's
    sum, added in eight lanes by absolute key position s0 + s, so that it does not depend on where the range
    starts or how many masked keys follow (a prompt in one pass or after a cached prefix: the same sums)."""
    lanes = np.empty(KEYS, dtype=np.float32)
    for r in range(sc.shape[0]):
        row = sc[r]
        top = np.float32(-np.inf)
        m8 = m // KEYS * KEYS
        if m8 > 0:  # eight running maxima: LLVM does not vectorize a float max reduction written as one
            for j in range(KEYS):
                lanes[j] = row[j]
            for s in range(KEYS, m8, KEYS):
                for j in range(KEYS):
                    v = row[s + j]
                    lanes[j] = lanes[j] if lanes[j] > v else v
            for j in range(KEYS):
                top = top if top > lanes[j] else lanes[j]
        for s in range(m8, m):
            top = top if top > row[s] else row[s]
        for s in range(m):
            v = row[s]
            row[s] = fast_exp(v - top) if v > MASKED else np.float32(0.0)
        for j in range(KEYS):
            lanes[j] = 0.0
        head = min(m, (KEYS - s0 % KEYS) % KEYS)  # keys before the first position that is a multiple of 8
        for s in range(head):
            lanes[(s0 + s) % KEYS] += row[s]
        body = head + (m - head) // KEYS * KEYS
        for s in range(head, body, KEYS):  # each lane still adds its positions in order: the same sums
            for j in range(KEYS):
                lanes[j] += row[s + j]
        for s in range(body, m):
            lanes[(s0 + s) % KEYS] += row[s]
        mx[r] = top
        tot[r] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))


@nb.njit(**JIT)
def _weighted_values(dst, sc, vd, vs, kv, s0, m, tile):
    """dst[r, :] += sum_s sc[r, s] * value[kv, s0 + s]. dst: f32[rep, hd] (C-contiguous); values in any cache
    format (load_rows). Eight value rows per call of the attention intrinsic where the head dim is a multiple of 8,
    the last ones too (zero-padded, zero weights: each key is one fused multiply-add in key order whatever keys
    share its call); one by one otherwise."""
    if values16(dst, sc, vd, kv, s0, m):
        return
    hd = dst.shape[1]
    m8 = m // KEYS * KEYS if hd % 8 == 0 else 0
    for s in range(0, m8, KEYS):
        _prefetch_rows(vd, kv, s0 + s)
        rows, r0 = load_rows(tile, vd, vs, kv, s0 + s, KEYS)
        for r in range(dst.shape[0]):
            values8(dst[r], 0, sc[r], s, rows, r0 * hd, hd)
    if hd % 8 == 0 and m8 < m:
        wts = np.zeros(KEYS, dtype=np.float32)
        _padded_rows(tile, vd, vs, kv, s0 + m8, m - m8)
        for r in range(dst.shape[0]):
            for s in range(m8, m):
                wts[s - m8] = sc[r, s]
            values8(dst[r], 0, wts, 0, tile, 0, hd)
    for s in range(m8 if hd % 8 != 0 else m, m):
        rows, r0 = load_rows(tile, vd, vs, kv, s0 + s, 1)
        for r in range(dst.shape[0]):
            wgt = sc[r, s]
            for j in range(hd):
                dst[r, j] += wgt * rows[r0, j]


@nb.njit(**JIT)
def mask_rows(sc, nq, rep, first, lo, window, m):
    """sc[j · rep + r, :m] = MASKED where query j (at position first + j; rep rows, one per query head of a key/value
    head) does not see key lo + s: after its position, or with a window at or before its position − window."""
    for j in range(nq):
        pos = first + j
        qlo = 0
        if window > 0 and pos - window + 1 > lo:
            qlo = pos - window + 1 - lo
        for r in range(rep):
            row = sc[j * rep + r]
            for s in range(qlo):
                row[s] = MASKED
            for s in range(pos + 1 - lo, m):
                row[s] = MASKED


QUERIES = 8  # queries per work item of prompt attention: each key is loaded and decoded once for all of them


@nb.njit(parallel=PRANGE, **JIT)
def attention(out, q, kd, ks, vd, vs, start, scale, window, cap):
    """Causal GQA attention over the KV cache.

    out, q: f32[T, n_heads, hd] (queries at positions start..start+T-1); (kd, ks), (vd, vs): one layer's keys and
    values (data [n_kv, ctx, width], scales [n_kv, ctx, groups]: kernels/kv_formats.py) already holding positions up
    to start+T-1; window: 0 for full attention, else keys in (pos-window, pos]; cap: 0, or soft-capped scores
    s = cap * tanh(scale * q.k / cap) before the softmax (gemma2).
    A work item is QUERIES queries × the query heads that share one key/value head, so each cached row is read
    (and decoded) once per item; keys beyond a query's position or before its window are masked out.
    """
    t_n, nh, hd = q.shape
    n_kv = kd.shape[0]
    rep = nh // n_kv
    n_blocks = (t_n + QUERIES - 1) // QUERIES
    for i in nb.prange(n_blocks * n_kv):
        t0 = i // n_kv * QUERIES
        kv = i % n_kv
        h0 = kv * rep
        nq = min(QUERIES, t_n - t0)
        first = start + t0
        lo = 0
        if window > 0 and first - window + 1 > 0:
            lo = first - window + 1
        n = first + nq - lo  # keys lo .. the last query's position
        sc = np.empty((nq * rep, n), dtype=np.float32)
        tile = np.empty((KEYS, hd), dtype=np.float32)
        _scores(sc, q, t0, rep, h0, kd, ks, kv, lo, n, scale, cap, tile)
        mask_rows(sc, nq, rep, first, lo, window, n)
        mx = np.empty(nq * rep, dtype=np.float32)
        tot = np.empty(nq * rep, dtype=np.float32)
        _exp_rows(sc, n, mx, tot, lo)
        dst = np.zeros((nq * rep, hd), dtype=np.float32)
        _weighted_values(dst, sc, vd, vs, kv, lo, n, tile)
        for j in range(nq):
            for r in range(rep):
                inv = np.float32(1.0) / tot[j * rep + r]
                for e in range(hd):
                    out[t0 + j, h0 + r, e] = dst[j * rep + r, e] * inv


@nb.njit(parallel=PRANGE, **JIT)
def attention_decode(out, q, kd, ks, vd, vs, start, scale, window, cap, chunk):
    """attention() for one query token, split over chunks of ``chunk`` cached positions so that every thread has
    work even with few key/value heads; each chunk keeps its own softmax max and sum, combined at the end.

    out, q: f32[1, n_heads, hd]; other arguments as in attention(); chunk: positions per work item.
    """
    nh, hd = q.shape[1], q.shape[2]
    n_kv = kd.shape[0]
    rep = nh // n_kv
    lo = 0
    if window > 0 and start - window + 1 > 0:
        lo = start - window + 1
    n = start + 1 - lo
    nch = (n + chunk - 1) // chunk
    pmax = np.empty((n_kv, nch, rep), dtype=np.float32)
    psum = np.empty((n_kv, nch, rep), dtype=np.float32)
    pout = np.zeros((n_kv, nch, rep, hd), dtype=np.float32)
    for i in nb.prange(n_kv * nch):
        kv = i // nch
        c = i % nch
        s0 = lo + c * chunk
        m = min(chunk, lo + n - s0)
        sc = np.empty((rep, m), dtype=np.float32)
        tile = np.empty((KEYS, hd), dtype=np.float32)
        _scores(sc, q, 0, rep, kv * rep, kd, ks, kv, s0, m, scale, cap, tile)
        _exp_rows(sc, m, pmax[kv, c], psum[kv, c], s0)
        _weighted_values(pout[kv, c], sc, vd, vs, kv, s0, m, tile)
    for kv in range(n_kv):
        for r in range(rep):
            mx = np.float32(-np.inf)
            for c in range(nch):
                if pmax[kv, c, r] > mx:
                    mx = pmax[kv, c, r]
            tot = np.float32(0.0)
            for c in range(nch):
                tot += psum[kv, c, r] * np.float32(math.exp(pmax[kv, c, r] - mx))
            for j in range(hd):
                out[0, kv * rep + r, j] = 0.0
            for c in range(nch):
                f = np.float32(math.exp(pmax[kv, c, r] - mx)) / tot
                for j in range(hd):
                    out[0, kv * rep + r, j] += f * pout[kv, c, r, j]
