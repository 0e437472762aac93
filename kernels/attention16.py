"""The float16-cache fast path of decode attention's helpers (kernels/cpu_attention.py ``_scores`` and
``_weighted_values``): where the cache is float16, the head dim 64, at most four query rows share a key/value head (one
query of grouped-query attention), no soft-capping and the range does not wrap around a ring, the scores and the
weighted values run on kernels.ir.attn16's intrinsics, which read the float16 rows directly and share each load among
the four heads (the generic helpers decode eight rows into a float32 tile and take the heads one at a time). Each
helper returns True when it did the work; for other cache dtypes (or a cache that is not C-contiguous) it is
``False`` at compile time.

Every caller (the lone-query ``attention``, the split ``attention_decode`` and the batched decode kernel) goes through
the same helpers on the same ranges, so a sequence's numbers stay the same in all three bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from lowbit.kernels.cpu import JIT
from lowbit.kernels.ir.attn16 import HD, HEADS, scores16x4, values16x4


def scores16(sc, q, t0, rep, h0, kd, kv, s0, m, scale, cap):
    """_scores on a float16 cache with kernels.ir.attn16 (head dim 64, at most four query rows, no soft-capping, a
    range that does not wrap around the ring): True if it did the work. (Overloaded per cache dtype.)"""


@overload(scores16, jit_options=JIT)
def _scores16(sc, q, t0, rep, h0, kd, kv, s0, m, scale, cap):
    if kd.dtype != types.uint16 or kd.layout != "C":  # the intrinsics address rows of a C-contiguous cache
        return lambda sc, q, t0, rep, h0, kd, kv, s0, m, scale, cap: False

    def impl(sc, q, t0, rep, h0, kd, kv, s0, m, scale, cap):
        size = kd.shape[1]
        r0 = s0 % size
        if q.shape[2] != HD or sc.shape[0] > HEADS or cap > 0 or r0 + m > size:
            return False
        q4 = np.zeros((HEADS, HD), dtype=np.float32)
        for i in range(sc.shape[0]):
            for j in range(HD):
                q4[i, j] = q[t0 + i // rep, h0 + i % rep, j]
        mp = (m + 3) // 4 * 4
        sc4 = np.empty((HEADS, mp), dtype=np.float32)
        m4 = m // 4 * 4
        base = (kv * size + r0) * HD
        for s in range(0, m4, 4):
            scores16x4(sc4, s, mp, q4, kd, base + s * HD, scale)
        if m4 < m:  # the last keys zero-padded to four: each score is computed alike wherever it falls
            pad = np.zeros(4 * HD, dtype=np.uint16)
            for i in range(m - m4):
                for j in range(HD):
                    pad[i * HD + j] = kd[kv, r0 + m4 + i, j]
            scores16x4(sc4, m4, mp, q4, pad, 0, scale)
        for i in range(sc.shape[0]):
            for s in range(m):
                sc[i, s] = sc4[i, s]
        return True

    return impl


def values16(dst, sc, vd, kv, s0, m):
    """_weighted_values on a float16 cache with kernels.ir.attn16, under scores16's conditions: True if it did the
    work. (Overloaded per cache dtype.)"""


@overload(values16, jit_options=JIT)
def _values16(dst, sc, vd, kv, s0, m):
    if vd.dtype != types.uint16 or vd.layout != "C":
        return lambda dst, sc, vd, kv, s0, m: False

    def impl(dst, sc, vd, kv, s0, m):
        size = vd.shape[1]
        r0 = s0 % size
        if dst.shape[1] != HD or dst.shape[0] > HEADS or r0 + m > size:
            return False
        dst4 = np.zeros((HEADS, HD), dtype=np.float32)
        p4 = np.zeros((HEADS, m), dtype=np.float32)
        for i in range(dst.shape[0]):
            for j in range(HD):
                dst4[i, j] = dst[i, j]
            for s in range(m):
                p4[i, s] = sc[i, s]
        values16x4(dst4, p4, m, vd, (kv * size + r0) * HD, m)
        for i in range(dst.shape[0]):
            for j in range(HD):
                dst[i, j] = dst4[i, j]
        return True

    return impl
