"""numba CPU kernel of prompt attention (several queries over the KV cache), with register-blocked SIMD micro-kernels.

``cpu_attention.attention`` takes eight keys at a time against one query row: each score is a dot product of two
short rows (eight partial sums and a transpose-and-add per eight keys), and the weighted sum of values loads and
stores the output row every eight keys, so a 512-token prompt of SmolLM2-135M spent a third of its prefill there.
Here a pass is two matrix products per key/value head, blocked as a GEMM is:

1. once per pass, every key/value head's cached positions that any query sees are decoded to float32 (any cache
   format: ``cpu_attention.load_rows``) into ``kt[kv, hd, keys]`` (keys transposed) and ``vf[kv, keys, hdp]``
   (values, head dim padded to whole vectors);
2. a work item is ``QUERY_BLOCK`` queries × the query heads sharing one key/value head. :func:`score_tile`
   computes ``rows`` query rows × ``W`` keys (W = 16 floats with AVX-512, else 8): per element of the head dim one
   load of W keys and one broadcast fused multiply-add per row, the sums held in registers;
3. the softmax of each row (``cpu_attention._exp_rows``: masked keys exactly 0, the sum in eight lanes by absolute
   position);
4. :func:`value_tile` adds ``Σ_s p[r, s] · v[s]`` for ``rows`` rows × ``cols`` vectors of the head dim over all
   the item's keys, the sums in registers from the first key to the last.

A query's numbers do not depend on which queries share its pass or its block (a prompt computed in one pass, in
chunks, or after a cached prefix agree bit for bit): each score is ``scale · Σ_j q_j k_j`` added in head-dim order
in its own vector lane; masked keys weigh exactly 0; the value sums run over the keys in position order. Decode
steps (one query) keep ``cpu_attention``'s kernels.

The kernels inline code from cpu_attention (and what it inlines); numba's on-disk cache checks only this file, so
:func:`kernels` captures a CRC of those modules (as kernels/cpu_attention_batch.py does).
"""

from __future__ import annotations

import inspect
import zlib
from functools import lru_cache

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from lowbit.kernels.cpu import JIT, PRANGE
from lowbit.kernels.cpu_attention import KEYS, MASKED, _cap8, _data, _exp_rows, load_rows, mask_rows
from lowbit.kernels.ir.simd import host_cpu_features

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
QUERY_BLOCK = 16  # queries per work item: each decoded key and value row is read by QUERY_BLOCK · rep rows
SCORE_ROWS = 8  # query rows per score_tile call (8 vector accumulators)
VALUE_COLS = 4  # head-dim vectors per value_tile call
VALUE_KEYS = 64  # value rows per value_tile call (its sums are stored and loaded again between chunks: same numbers)


def vector_width() -> int:
    """Floats per SIMD vector of the micro-kernels: 16 with AVX-512, else 8."""
    return 16 if host_cpu_features().get("avx512f") else 8


def value_rows(width: int) -> int:
    """Query rows per value_tile call: rows × VALUE_COLS accumulators fit the register file (32 zmm, 16 ymm)."""
    return 4 if width == 16 else 2


def _i64(builder, v):
    return v if v.type.width == 64 else builder.sext(v, _I64)


def _literal(v, name: str) -> int:
    if not isinstance(v, types.IntegerLiteral):
        raise errors.RequireLiteralValue(f"{name} must be a literal")
    return v.literal_value


def _vec_ptr(builder, ptr, off, vt):
    return builder.bitcast(builder.gep(ptr, [off]), vt.as_pointer())


def _splat(builder, x, vt, w):
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, w), [0] * w))


def _f32_arrays(*arrs):
    for a in arrs:
        if not (isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C"):
            raise errors.TypingError("prompt attention micro-kernels need C-contiguous float32 arrays")


@intrinsic
def score_tile(typingctx, sc, soff, sstride, q, qoff, qstride, kt, koff, kstride, hd, scale, rows, width):
    """sc[soff + r·sstride + i] = scale · Σ_j q[qoff + r·qstride + j] · kt[koff + j·kstride + i] for r < rows,
    i < width, j < hd (the sum in j order, fused multiply-adds). rows and width are literals."""
    _f32_arrays(sc, q, kt)
    nr, w = _literal(rows, "rows"), _literal(width, "width")
    sig = types.void(sc, soff, sstride, q, qoff, qstride, kt, koff, kstride, hd, scale, rows, width)

    def codegen(context, builder, signature, args):
        a = signature.args
        sptr, qptr, kptr = (_data(context, builder, a[i], args[i], args[i + 1]) for i in (0, 3, 6))
        sst, qst, kst, n = (_i64(builder, args[i]) for i in (2, 5, 8, 9))
        vt = ir.VectorType(_F32, w)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt] * 3), f"llvm.fma.v{w}f32")
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vt, [0.0] * w)) for _ in range(nr)]
        with cgutils.for_range(builder, n) as loop:
            j = loop.index
            kv = builder.load(_vec_ptr(builder, kptr, builder.mul(j, kst), vt), align=4)
            for r in range(nr):
                qs = builder.load(builder.gep(qptr, [builder.add(builder.mul(qst, ir.Constant(_I64, r)), j)]))
                builder.store(builder.call(fma, [_splat(builder, qs, vt, w), kv, builder.load(accs[r])]), accs[r])
        sv = _splat(builder, args[10], vt, w)
        for r in range(nr):
            dst = _vec_ptr(builder, sptr, builder.mul(sst, ir.Constant(_I64, r)), vt)
            builder.store(builder.fmul(builder.load(accs[r]), sv), dst, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def value_tile(typingctx, dst, doff, dstride, p, poff, pstride, v, voff, vstride, n, rows, cols, width):
    """dst[doff + r·dstride + c] += Σ_s p[poff + r·pstride + s] · v[voff + s·vstride + c] for r < rows,
    c < cols·width, s < n (in s order, fused multiply-adds, the sums in registers throughout). rows, cols, width
    are literals."""
    _f32_arrays(dst, p, v)
    nr, nc, w = _literal(rows, "rows"), _literal(cols, "cols"), _literal(width, "width")
    sig = types.void(dst, doff, dstride, p, poff, pstride, v, voff, vstride, n, rows, cols, width)

    def codegen(context, builder, signature, args):
        a = signature.args
        dptr, pptr, vptr = (_data(context, builder, a[i], args[i], args[i + 1]) for i in (0, 3, 6))
        dst_, pst, vst, cnt = (_i64(builder, args[i]) for i in (2, 5, 8, 9))
        vt = ir.VectorType(_F32, w)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt] * 3), f"llvm.fma.v{w}f32")

        def dptr_of(r, c):
            return _vec_ptr(builder, dptr, builder.add(builder.mul(dst_, ir.Constant(_I64, r)),
                                                       ir.Constant(_I64, c * w)), vt)  # fmt: skip

        accs = [[cgutils.alloca_once_value(builder, builder.load(dptr_of(r, c), align=4)) for c in range(nc)]
                for r in range(nr)]  # fmt: skip
        with cgutils.for_range(builder, cnt) as loop:
            s = loop.index
            row = builder.mul(s, vst)
            vv = [builder.load(_vec_ptr(builder, vptr, builder.add(row, ir.Constant(_I64, c * w)), vt), align=4)
                  for c in range(nc)]  # fmt: skip
            for r in range(nr):
                ps = builder.load(builder.gep(pptr, [builder.add(builder.mul(pst, ir.Constant(_I64, r)), s)]))
                sp = _splat(builder, ps, vt, w)
                for c in range(nc):
                    builder.store(builder.call(fma, [sp, vv[c], builder.load(accs[r][c])]), accs[r][c])
        for r in range(nr):
            for c in range(nc):
                builder.store(builder.load(accs[r][c]), dptr_of(r, c), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _dependency_key() -> int:
    from lowbit.kernels import cpu, cpu_attention, kv_formats
    from lowbit.kernels.ir import simd

    return zlib.crc32("".join(inspect.getsource(m) for m in (cpu, cpu_attention, kv_formats, simd)).encode())


@lru_cache(maxsize=None)
def kernels():
    """(attention_prompt,) for this CPU's vector width, compiled on first call (or loaded from numba's cache)."""
    deps = _dependency_key()
    w = vector_width()
    sr = SCORE_ROWS
    vr = value_rows(w)
    vc = VALUE_COLS
    qb = QUERY_BLOCK

    @nb.njit(parallel=PRANGE, **JIT)
    def attention_prompt(out, q, kd, ks, vd, vs, start, scale, window, cap):
        """Causal GQA attention of queries at positions start..start+T-1 over the KV cache; arguments as in
        cpu_attention.attention (out, q: f32[T, n_heads, hd]; the cache holds positions up to start+T-1)."""
        if deps == 0:  # never: the captured key only makes numba's cache entry depend on the inlined modules
            return
        t_n, nh, hd = q.shape
        n_kv = kd.shape[0]
        rep = nh // n_kv
        lo_all = 0
        if window > 0 and start - window + 1 > 0:
            lo_all = start - window + 1
        nk = start + t_n - lo_all
        hdp = (hd + vc * w - 1) // (vc * w) * (vc * w)
        kt = np.zeros((n_kv, hd, nk + w), dtype=np.float32)  # w columns of zeros past the last key
        vf = np.zeros((n_kv, nk + w, hdp), dtype=np.float32)
        nb8 = (nk + KEYS - 1) // KEYS
        for it in nb.prange(n_kv * nb8):  # the keys (transposed) and values every query of the pass reads
            kv = it // nb8
            s = it % nb8 * KEYS
            m = min(KEYS, nk - s)
            tile = np.empty((KEYS, hd), dtype=np.float32)
            rows, r0 = load_rows(tile, kd, ks, kv, lo_all + s, m)
            for i in range(m):
                for j in range(hd):
                    kt[kv, j, s + i] = rows[r0 + i, j]
            rows, r0 = load_rows(tile, vd, vs, kv, lo_all + s, m)
            for i in range(m):
                for j in range(hd):
                    vf[kv, s + i, j] = rows[r0 + i, j]
        n_blocks = (t_n + qb - 1) // qb
        for it in nb.prange(n_blocks * n_kv):
            t0 = it // n_kv * qb
            kv = it % n_kv
            h0 = kv * rep
            nq = min(qb, t_n - t0)
            first = start + t0
            lo = 0
            if window > 0 and first - window + 1 > 0:
                lo = first - window + 1
            n = first + nq - lo  # keys lo .. the last query's position
            npad = (n + w - 1) // w * w
            rows_p = (nq * rep + sr - 1) // sr * sr  # the item's query rows, padded for the tiles (zero rows)
            qr = np.zeros((rows_p, hd), dtype=np.float32)
            for j in range(nq):
                for r in range(rep):
                    for e in range(hd):
                        qr[j * rep + r, e] = q[t0 + j, h0 + r, e]
            sc = np.empty((rows_p, npad), dtype=np.float32)
            k0 = lo - lo_all
            for s in range(0, npad, w):  # a vector of keys (hd · w floats) serves every row block from L1
                for r0 in range(0, rows_p, sr):
                    score_tile(sc, r0 * npad + s, npad, qr, r0 * hd, hd, kt[kv], k0 + s, nk + w, hd, scale, sr, w)
            if cap > 0:
                for r in range(nq * rep):
                    for s in range(0, npad, KEYS):
                        _cap8(sc[r], s, cap)
            mask_rows(sc, nq, rep, first, lo, window, npad)
            for r in range(nq * rep, rows_p):  # padding rows: weights 0 (their sums are never read)
                for s in range(npad):
                    sc[r, s] = MASKED
            mx = np.empty(rows_p, dtype=np.float32)
            tot = np.empty(rows_p, dtype=np.float32)
            _exp_rows(sc, npad, mx, tot, lo)
            dst = np.zeros((rows_p, hdp), dtype=np.float32)
            for s0 in range(0, n, VALUE_KEYS):  # a chunk of value rows serves every row block from L1
                m = min(VALUE_KEYS, n - s0)
                for r0 in range(0, rows_p, vr):
                    for c0 in range(0, hdp, vc * w):
                        value_tile(dst, r0 * hdp + c0, hdp, sc, r0 * npad + s0, npad, vf[kv], (k0 + s0) * hdp + c0,
                                   hdp, m, vr, vc, w)  # fmt: skip
            for j in range(nq):
                for r in range(rep):
                    inv = np.float32(1.0) / tot[j * rep + r]
                    for e in range(hd):
                        out[t0 + j, h0 + r, e] = dst[j * rep + r, e] * inv

    return (attention_prompt,)
