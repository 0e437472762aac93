"""numba CPU kernels of attention over the KV cache, and the SIMD intrinsics (LLVM IR) they are built on.

Attention for one query reads each cached key and value row once per query head. Written as plain loops, the
scores pay a horizontal sum per key (a dot product of two short rows), and the weighted sum of values loads and
stores the output row once per key. The intrinsics take eight keys at a time instead:

- ``scores8``: eight dot products ``q · k_i`` with eight independent vector accumulators (one fused multiply-add
  per 8 elements and key), then one 8×8 transpose-and-add that leaves the eight sums in one vector.
- ``values8``: ``out += Σ_i p_i · v_i`` over eight value rows, 8 elements at a time: the output chunk is loaded and
  stored once per eight keys.

Rows are ``n`` floats (the head dim, a multiple of 8: the kernels take plain loops otherwise) and the eight rows are
consecutive in memory (rows s .. s+7 of a ``[ctx, n]`` cache slice). Bounds are the caller's: the intrinsics read
``q[qoff : qoff + n]`` and ``k[koff : koff + 8n]`` (``values8``: ``p[poff : poff + 8]``, ``v[voff : voff + 8n]``
and ``out[ooff : ooff + n]``) without checks. Arrays must be C-contiguous float32.
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
from numba.extending import intrinsic

from lowbit.kernels.cpu import _JIT, fast_exp
from lowbit.kernels.simd import prefetch_line

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V8 = ir.VectorType(_F32, 8)
KEYS = 8  # rows per call
PREFETCH_AHEAD = 512  # floats (2 KiB) of cached keys/values ahead of the block being read that the kernels prefetch


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
    """Ask the cache for the line holding a.flat[off] (a hint: never faults, whatever the address)."""
    _check_arrays(a)
    sig = types.void(a, off)

    def codegen(context, builder, signature, args):
        prefetch_line(builder, _data(context, builder, signature.args[0], args[0], args[1]))
        return context.get_dummy_value()

    return sig, codegen


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


@nb.njit(inline="always", **_JIT)
def _scores(sc, q, t, h0, k_cache, kv, s0, m, scale, cap):
    """sc[r, s] = (soft-capped) scale * q[t, h0 + r] . k_cache[kv, s0 + s] for the rep heads of one kv head.
    Eight keys per call of the attention intrinsic where the head dim is a multiple of 8, the rest one by one."""
    rep = sc.shape[0]
    hd = q.shape[2]
    m8 = m // KEYS * KEYS if hd % 8 == 0 else 0
    kf = k_cache[kv]
    for s in range(0, m8, KEYS):
        for f in range(0, KEYS * hd, 64):  # every fourth line of the block 2 KiB ahead (more cost more than they
            prefetch(kf, (s0 + s) * hd + PREFETCH_AHEAD + f)  # save: the hardware follows on within a page)
        for r in range(rep):
            scores8(sc[r], s, q[t, h0 + r], 0, kf, (s0 + s) * hd, hd, scale)
    for s in range(m8, m):
        krow = kf[s0 + s]
        for r in range(rep):
            acc = np.float32(0.0)
            for j in range(hd):
                acc += q[t, h0 + r, j] * krow[j]
            sc[r, s] = acc * scale
    if cap > 0:
        for r in range(rep):
            for s in range(m):
                sc[r, s] = np.float32(cap * math.tanh(sc[r, s] / cap))


@nb.njit(inline="always", **_JIT)
def _exp_rows(sc, m, mx, tot):
    """sc[r, :m] = exp(sc[r, :m] - mx[r]) with mx[r] the row's max; tot[r] = the row's sum."""
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
        acc = np.float32(0.0)
        for s in range(m):
            e = fast_exp(row[s] - top)
            row[s] = e
            acc += e
        mx[r] = top
        tot[r] = acc


@nb.njit(inline="always", **_JIT)
def _weighted_values(dst, sc, v_cache, kv, s0, m):
    """dst[r, :] += sum_s sc[r, s] * v_cache[kv, s0 + s]. dst: f32[rep, hd] (C-contiguous). Eight value rows per
    call of the attention intrinsic where the head dim is a multiple of 8, the rest one by one."""
    hd = dst.shape[1]
    m8 = m // KEYS * KEYS if hd % 8 == 0 else 0
    vf = v_cache[kv]
    for s in range(0, m8, KEYS):
        for f in range(0, KEYS * hd, 64):  # as in _scores
            prefetch(vf, (s0 + s) * hd + PREFETCH_AHEAD + f)
        for r in range(dst.shape[0]):
            values8(dst[r], 0, sc[r], s, vf, (s0 + s) * hd, hd)
    for s in range(m8, m):
        vrow = vf[s0 + s]
        for r in range(dst.shape[0]):
            wgt = sc[r, s]
            for j in range(hd):
                dst[r, j] += wgt * vrow[j]


@nb.njit(parallel=True, **_JIT)
def attention(out, q, k_cache, v_cache, start, scale, window, cap):
    """Causal GQA attention over the KV cache.

    out, q: f32[T, n_heads, hd] (queries at positions start..start+T-1); k_cache, v_cache: f32[n_kv, ctx, hd]
    already holding keys/values up to start+T-1; window: 0 for full attention, else keys in (pos-window, pos];
    cap: 0, or soft-capped scores s = cap * tanh(scale * q.k / cap) before the softmax (gemma2).
    The query heads that share a key/value head are processed together, so each cached row is read once.
    """
    t_n, nh, hd = q.shape
    n_kv = k_cache.shape[0]
    rep = nh // n_kv
    for i in nb.prange(t_n * n_kv):
        t = i // n_kv
        kv = i % n_kv
        h0 = kv * rep
        pos = start + t
        lo = 0
        if window > 0 and pos - window + 1 > 0:
            lo = pos - window + 1
        n = pos + 1 - lo
        sc = np.empty((rep, n), dtype=np.float32)
        mx = np.empty(rep, dtype=np.float32)
        tot = np.empty(rep, dtype=np.float32)
        _scores(sc, q, t, h0, k_cache, kv, lo, n, scale, cap)
        _exp_rows(sc, n, mx, tot)
        dst = np.zeros((rep, hd), dtype=np.float32)
        _weighted_values(dst, sc, v_cache, kv, lo, n)
        for r in range(rep):
            inv = np.float32(1.0) / tot[r]
            for j in range(hd):
                out[t, h0 + r, j] = dst[r, j] * inv


@nb.njit(parallel=True, **_JIT)
def attention_decode(out, q, k_cache, v_cache, start, scale, window, cap, chunk):
    """attention() for one query token, split over chunks of ``chunk`` cached positions so that every thread has
    work even with few key/value heads; each chunk keeps its own softmax max and sum, combined at the end.

    out, q: f32[1, n_heads, hd]; other arguments as in attention(); chunk: positions per work item.
    """
    nh, hd = q.shape[1], q.shape[2]
    n_kv = k_cache.shape[0]
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
        _scores(sc, q, 0, kv * rep, k_cache, kv, s0, m, scale, cap)
        _exp_rows(sc, m, pmax[kv, c], psum[kv, c])
        _weighted_values(pout[kv, c], sc, v_cache, kv, s0, m)
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
