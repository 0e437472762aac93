"""Weights pre-packed for decoding several sequences at once (continuous batching).

The prompt GEMM (``cpu_quant`` qgemm) unpacks each block of ``GEMM_ROWS`` rows into the interleaved layout of
:func:`lowbit.kernels.ir.gemm_vnni.tile_gemm` and multiplies it with tiles of tokens: one byte dot product covers
several rows of one token, so a few tokens cost little more than one. For a prompt the unpacking is paid once per block
and amortised over hundreds of tokens; for a decode step of 2..8 sequences it would cost more than the product.
Here the blocks are unpacked once, when batched decoding is switched on (``dispatch.pack_for_batches``), and kept:
one byte per weight plus two float32 per group and row, about twice a 4-bit matrix. A decode pass of T sequences
then costs about what the one-sequence kernel costs for 2 (bench: 8 tokens of a 8192x576 4-bit matrix in 2x the
time of one).

The arithmetic is the prompt GEMM's, so a sequence's logits in a batch differ from its one-sequence decode by the
float rounding of a different summation order (relative ~1e-6; measured in tests/test_batching.py).
"""

from __future__ import annotations

import inspect
import zlib
from functools import lru_cache

import numba as nb
import numpy as np

from lowbit.kernels import cpu_quant
from lowbit.kernels.cpu import JIT, PRANGE
from lowbit.kernels.cpu_quant import DEPS, GEMM_ROWS, TILE_TOKENS, pack_block, quantize8, row_dot8
from lowbit.kernels.ir.gemm_vnni import tile_gemm


@lru_cache(maxsize=None)
def _key() -> int:
    """The kernels below inline code from cpu_quant (and, through it, the modules cpu_quant.DEPS covers); numba's
    cache checks only this file, and keys closures by their captured values: capturing this ties them to all of it.
    Read when a kernel is first made, not at import."""
    return zlib.crc32(inspect.getsource(cpu_quant).encode()) ^ DEPS


@lru_cache(maxsize=None)
def packed_kernels(bits: int, g: int, split: bool):
    """(prepack, matmul) for ``bits``-bit groups of ``g`` with int8 (split: int16-precision) activations:
    ``prepack(codes, scales, mins, asym) -> (wb, dsc, nmc)`` and ``matmul(y, wb, dsc, nmc, codes, scales, mins, x,
    asym)`` for y[T, rows] = x @ W.T (rows past the last whole block from the codes, one at a time)."""
    return _prepack(bits, g), _matmul(bits, g, split)


@lru_cache(maxsize=None)
def _prepack(bits: int, g: int):
    """One closure per (bits, g): two live closures with the same captured values would share a cache entry."""
    br = GEMM_ROWS
    key = _key()

    @nb.njit(parallel=PRANGE, **JIT)
    def prepack(codes, scales, mins, asym):
        if key == 0:  # never true; ties the cached code to _key()
            return None
        nblk = codes.shape[0] // br
        cols = codes.shape[1] * 8 // bits
        ng = cols // g
        wb = np.empty((nblk, cols * br), dtype=np.uint8)
        dsc = np.empty((nblk, ng, br), dtype=np.float32)
        nmc = np.empty((nblk, ng, br), dtype=np.float32)
        for i in nb.prange(nblk):
            b, d, n = pack_block(codes, scales, mins, i * br, asym, bits, g, br)
            wb[i] = b
            dsc[i] = d
            nmc[i] = n
        return wb, dsc, nmc

    return prepack


@lru_cache(maxsize=None)
def _matmul(bits: int, g: int, split: bool):
    br = GEMM_ROWS
    tt = TILE_TOKENS["split" if split else "int8"]
    key = _key()

    @nb.njit(parallel=PRANGE, **JIT)
    def matmul(y, wb, dsc, nmc, codes, scales, mins, x, asym):
        if key == 0:  # never true; ties the cached code to _key()
            return
        rows = codes.shape[0]
        t_n = x.shape[0]
        xh, xl, dx, xs = quantize8(x, g, split)
        dxT = np.ascontiguousarray(dx.T)
        xsT = np.ascontiguousarray(xs.T)
        nblk = wb.shape[0]
        for i in nb.prange(nblk + (rows - nblk * br)):
            if i < nblk:  # tiles of tt, then 4, 2 and 1 tokens (a decode pass has 2..8)
                t0 = 0
                while t0 + tt <= t_n:
                    tile_gemm(y, wb[i], dsc[i], nmc[i], xh, xl, dxT, xsT, i * br, t0, bits, g, split, br, tt)
                    t0 += tt
                if tt > 4 and t0 + 4 <= t_n:
                    tile_gemm(y, wb[i], dsc[i], nmc[i], xh, xl, dxT, xsT, i * br, t0, bits, g, split, br, 4)
                    t0 += 4
                if t0 + 2 <= t_n:
                    tile_gemm(y, wb[i], dsc[i], nmc[i], xh, xl, dxT, xsT, i * br, t0, bits, g, split, br, 2)
                    t0 += 2
                if t0 < t_n:
                    tile_gemm(y, wb[i], dsc[i], nmc[i], xh, xl, dxT, xsT, i * br, t0, bits, g, split, br, 1)
            else:
                r = nblk * br + (i - nblk)
                for t in range(t_n):
                    y[t, r] = row_dot8(codes, scales, mins, r, xh[t], xl[t], dx[t], xs[t], asym, bits, g, split)

    return matmul
