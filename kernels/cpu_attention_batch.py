"""numba CPU kernels of a decode step of several sequences at once (the server's continuous batching): RoPE and the
cache write, and attention, for one token of each sequence, each over its own cache, in one kernel call per layer.

A batched decode pass used to call the one-sequence kernels once per sequence and layer: for eight short
conversations on a small model that was half the step (a parallel region per call, Python around it). Here one call
takes every sequence of the pass. Each sequence's numbers are the one-sequence kernels' bit for bit: the same
helpers (``cpu_attention._scores``, ``_exp_rows``, ``_weighted_values``, ``cpu_kv.rope2_kv_write``) on the same
ranges, with attention split into chunks of ``chunk`` cached positions exactly as ``attention_decode`` splits a
long one (a sequence within one chunk is computed as ``attention`` computes a lone query).

The caches arrive as tuples of arrays, one entry per sequence, padded to ``dispatch.SMALL_BATCH`` entries (the
padding repeats the first sequence's arrays and is never read), so numba compiles one kernel per cache format, not
one per batch size. The kernels inline code from other modules; numba's on-disk cache checks only this file, so the
factory's kernels capture a CRC of those modules (as kernels/cpu_quant.py does) and an edit there recompiles them.
"""

from __future__ import annotations

import inspect
import math
import zlib
from functools import lru_cache

import numba as nb
import numpy as np

from lowbit.kernels.cpu import JIT, PRANGE
from lowbit.kernels.cpu_attention import KEYS, _exp_rows, _scores, _weighted_values
from lowbit.kernels.cpu_kv import rope2_kv_write


def _dependency_key() -> int:
    from lowbit.kernels import attention16, cpu, cpu_attention, cpu_kv, kv_formats
    from lowbit.kernels.ir import attn16, simd

    mods = (cpu, cpu_attention, cpu_kv, kv_formats, simd, attention16, attn16)
    return zlib.crc32("".join(inspect.getsource(m) for m in mods).encode())


@lru_cache(maxsize=None)
def kernels():
    """(rope_kv_write_batch, attention_decode_batch), compiled on first call (or loaded from numba's cache)."""
    deps = _dependency_key()

    @nb.njit(**JIT)
    def rope_kv_write_batch(q, k, v, cos, sin, kds, kss, vds, vss, starts, nseq):
        """rope2_kv_write of row b of q, k, v at position starts[b] into the caches (kds[b], kss[b], vds[b],
        vss[b]), for b < nseq. q: f32[B, n_heads, rot] (may be a view); k, v: f32[B, n_kv, hd]; cos, sin: the
        whole tables f32[ctx, rot/2]."""
        if deps == 0:  # never: the captured key only makes numba's cache entry depend on the inlined modules
            return
        for b in range(nseq):
            p = starts[b]
            rope2_kv_write(q[b : b + 1], k[b : b + 1], v[b : b + 1], cos[p : p + 1], sin[p : p + 1], kds[b], kss[b],
                           vds[b], vss[b], p)  # fmt: skip

    @nb.njit(parallel=PRANGE, **JIT)
    def attention_decode_batch(out, q, kds, kss, vds, vss, starts, nseq, scale, window, cap, chunk):
        """Attention of query b (q[b]: f32[n_heads, hd] at position starts[b]) over its cache (kds[b], kss[b],
        vds[b], vss[b]) for b < nseq, into out[b]. One work item is one chunk of one sequence's cached positions
        for one key/value head, so all threads have work whatever the lengths; window and cap as in attention()."""
        nh, hd = q.shape[1], q.shape[2]
        n_kv = kds[0].shape[0]
        rep = nh // n_kv
        los = np.empty(nseq, dtype=np.int64)
        ns = np.empty(nseq, dtype=np.int64)
        nchs = np.empty(nseq, dtype=np.int64)
        offs = np.zeros(nseq + 1, dtype=np.int64)  # first work item of each sequence
        most = 1
        for b in range(nseq):
            lo = 0
            if window > 0 and starts[b] - window + 1 > 0:
                lo = starts[b] - window + 1
            los[b] = lo
            ns[b] = starts[b] + 1 - lo
            nchs[b] = (ns[b] + chunk - 1) // chunk
            offs[b + 1] = offs[b] + n_kv * nchs[b]
            most = max(most, nchs[b])
        pmax = np.empty((nseq, n_kv, most, rep), dtype=np.float32)
        psum = np.empty((nseq, n_kv, most, rep), dtype=np.float32)
        pout = np.zeros((nseq, n_kv, most, rep, hd), dtype=np.float32)
        for i in nb.prange(offs[nseq]):
            b = 0
            while offs[b + 1] <= i:
                b += 1
            kv = (i - offs[b]) // nchs[b]
            c = (i - offs[b]) % nchs[b]
            s0 = los[b] + c * chunk
            m = min(chunk, los[b] + ns[b] - s0)
            sc = np.empty((rep, m), dtype=np.float32)
            tile = np.empty((KEYS, hd), dtype=np.float32)
            _scores(sc, q, b, rep, kv * rep, kds[b], kss[b], kv, s0, m, scale, cap, tile)
            _exp_rows(sc, m, pmax[b, kv, c], psum[b, kv, c], s0)
            _weighted_values(pout[b, kv, c], sc, vds[b], vss[b], kv, s0, m, tile)
        for b in range(nseq):  # the chunks' softmax parts combined as attention_decode combines them
            for kv in range(n_kv):
                for r in range(rep):
                    mx = np.float32(-np.inf)
                    for c in range(nchs[b]):
                        if pmax[b, kv, c, r] > mx:
                            mx = pmax[b, kv, c, r]
                    tot = np.float32(0.0)
                    for c in range(nchs[b]):
                        tot += psum[b, kv, c, r] * np.float32(math.exp(pmax[b, kv, c, r] - mx))
                    for j in range(hd):
                        out[b, kv * rep + r, j] = 0.0
                    for c in range(nchs[b]):
                        f = np.float32(math.exp(pmax[b, kv, c, r] - mx)) / tot
                        for j in range(hd):
                            out[b, kv * rep + r, j] += f * pout[b, kv, c, r, j]

    return rope_kv_write_batch, attention_decode_batch
