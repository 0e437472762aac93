"""numba CPU kernels of 16-bit float weights (float16 and bfloat16, ``--bits 16``), read as stored.

A float16 or bfloat16 matrix used to be widened to float32 at load: twice the memory, and a decode step that reads
twice the bytes (decode is bound by memory bandwidth). Here it stays as its 16-bit patterns (uint16, numba has no
float16) and each product widens the elements as it reads them: float16 by the CPU's conversion instruction (F16C's
``vcvtph2ps``; a table-free integer decoder elsewhere), bfloat16 by a 16-bit shift into a float32's high half.

- :func:`kernels` ``matvec``: one token, rows in parallel four at a time (four vectorised dot products sharing each
  load of the activations);
- ``matmul_small``: a few tokens (a decode pass of several sequences), each (row, token) the one-token kernel's
  loop, so a sequence in a batch gets its lone step's numbers bit for bit;
- ``widen_rows``: rows r0.. as float32 into a tile, for prompts (the tile then goes to BLAS, as float32 weights do);
- :func:`bf16_kernels` ``prompt``: a bfloat16 matrix times a prompt on the CPU's bfloat16 pair dot product
  (kernels/ir/gemm_bf16.py; activations rounded to bfloat16, as llama.cpp's BF16 products do) where the CPU has it:
  about twice the float32 tiles' rate. ``--exact-activations`` keeps the float32 tiles.

The kernels inline code from kernels/cpu.py and kernels/ir/simd.py; numba's on-disk cache checks only this file, so
:func:`kernels` captures a CRC of those modules (as kernels/cpu_quant.py does).
"""

from __future__ import annotations

import inspect
import zlib
from functools import lru_cache

import numba as nb
import numpy as np

from lowbit.kernels.cpu import JIT, PRANGE, h2f, variant
from lowbit.kernels.ir.gemm_bf16 import rows_dot_bf16, tile_bf16
from lowbit.kernels.ir.simd import bits_to_float


@nb.njit(inline="always", **JIT)
def _widen(h, bf):
    """float32 of 16-bit float bits h (bf: bfloat16, else float16)."""
    return bits_to_float(np.uint32(h) << np.uint32(16)) if bf else h2f(h)


@nb.njit(inline="always", **JIT)
def _dot(w, r, x, t, bf):
    """Σ_j float(w[r, j]) · x[t, j]."""
    acc = np.float32(0.0)
    for j in range(w.shape[1]):
        acc += _widen(w[r, j], bf) * x[t, j]
    return acc


@nb.njit(inline="always", **JIT)
def _dot4(y, w, r, x, t, bf):
    """y[t, r + i] = Σ_j float(w[r + i, j]) · x[t, j] for i < 4: four independent sums per load of x (one row's
    sum alone is a chain of dependent additions)."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    for j in range(w.shape[1]):
        xj = x[t, j]
        a0 += _widen(w[r, j], bf) * xj
        a1 += _widen(w[r + 1, j], bf) * xj
        a2 += _widen(w[r + 2, j], bf) * xj
        a3 += _widen(w[r + 3, j], bf) * xj
    y[t, r] = a0
    y[t, r + 1] = a1
    y[t, r + 2] = a2
    y[t, r + 3] = a3


@nb.njit(inline="always", **JIT)
def _rows(y, w, i, x, t, bf):
    """Rows 4i .. 4i+3 of token t (those that exist): the same arithmetic whatever the token count."""
    r = 4 * i
    if r + 4 <= w.shape[0]:
        _dot4(y, w, r, x, t, bf)
    else:
        for rr in range(r, w.shape[0]):
            y[t, rr] = _dot(w, rr, x, t, bf)


def _dependency_key() -> int:
    from lowbit.kernels import cpu
    from lowbit.kernels.ir import gemm_bf16, simd

    return zlib.crc32("".join(inspect.getsource(m) for m in (cpu, simd, gemm_bf16)).encode())


@lru_cache(maxsize=None)
def kernels():
    """(matvec, matmul_small, widen_rows), compiled on first call (or loaded from numba's cache).

    ``matvec(y, w, x, bf)``: y f32[1, rows] = W @ x[0]; ``matmul_small(y, w, x, bf)``: y f32[T, rows] = x @ W.T;
    ``widen_rows(out, w, r0, bf)``: out f32[n, cols] = rows r0..r0+n-1 of W. w: u16[rows, cols] (the stored bits),
    x: f32[T, cols], bf: bfloat16 (True) or float16 (False)."""
    deps = _dependency_key()

    @nb.njit(parallel=PRANGE, **JIT)
    def matvec(y, w, x, bf):
        if deps == 0:  # never: the captured key only makes numba's cache entry depend on the inlined modules
            return
        for i in nb.prange((w.shape[0] + 3) // 4):
            _rows(y, w, i, x, 0, bf)

    @nb.njit(parallel=PRANGE, **JIT)
    def matmul_small(y, w, x, bf):
        if deps == 0:
            return
        for i in nb.prange((w.shape[0] + 3) // 4):
            for t in range(x.shape[0]):
                _rows(y, w, i, x, t, bf)

    @nb.njit(parallel=PRANGE, **JIT)
    def widen_rows(out, w, r0, bf):
        if deps == 0:
            return
        for i in nb.prange(out.shape[0]):
            if bf:
                for j in range(out.shape[1]):
                    out[i, j] = _widen(w[r0 + i, j], True)
            else:
                for j in range(out.shape[1]):
                    out[i, j] = _widen(w[r0 + i, j], False)

    return matvec, matmul_small, widen_rows


BF16_ROWS = 32  # rows of one interleaved block of the bfloat16 prompt GEMM (two vectors of 16 lanes)
BF16_TOKENS = 8  # tokens of one tile: 16 accumulators in registers


def round_pairs(x: np.ndarray, pad_tiles: bool = True) -> np.ndarray:
    """xb u32[T_pad, cols/2]: x f32[T, cols] (cols even) rounded to bfloat16 (to nearest, ties to even), two columns
    to a word (the even one low), the token count padded with zero rows to a multiple of BF16_TOKENS (pad_tiles)."""
    t = x.shape[0]
    pad = -t % BF16_TOKENS if pad_tiles else 0
    xb = np.empty((t + pad, x.shape[1] // 2), dtype=np.uint32)
    bf16_kernels()[0](xb, np.ascontiguousarray(x, dtype=np.float32).view(np.uint32))
    return xb


@lru_cache(maxsize=None)
def bf16_kernels():
    """(round_pairs, prompt, matmul_small) for bfloat16 products on the pair dot product (callers check
    ``gemm_bf16.host_has_bf16_dot``).

    ``round_pairs(xb, xu)``: see :func:`round_pairs` (xu: the activations' float32 bits, u32[T, cols]);
    ``prompt(y, w32, xb)``: y f32[T, rows] = x @ W.T for w32 u32[rows, cols/2] (the bfloat16 matrix's bits viewed
    two columns to a word) and xb from round_pairs (its padding rows are computed and dropped);
    ``matmul_small(y, w32, xb)``: y f32[T, rows] for one token (a decode step) or a few, rows four at a time, each
    (row, token) the same arithmetic whatever T is, so each token gets its lone numbers."""
    deps = _dependency_key()
    nr, nt = BF16_ROWS, BF16_TOKENS

    @nb.njit(**JIT)
    @variant("bf16")
    def round_pairs_k(xb, xu):
        if deps == 0:
            return
        half = np.uint32(0x7FFF)
        for t in range(xu.shape[0]):
            for k in range(xb.shape[1]):
                lo = xu[t, 2 * k]
                hi = xu[t, 2 * k + 1]
                lo = (lo + half + ((lo >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                hi = (hi + half + ((hi >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                xb[t, k] = lo | (hi << np.uint32(16))
        for t in range(xu.shape[0], xb.shape[0]):
            for k in range(xb.shape[1]):
                xb[t, k] = 0

    @nb.njit(parallel=PRANGE, **JIT)
    @variant("bf16")
    def prompt(y, w32, xb):
        if deps == 0:
            return
        rows, kp = w32.shape
        n_tok = y.shape[0]
        for b in nb.prange((rows + nr - 1) // nr):
            r0 = b * nr
            n = min(nr, rows - r0)
            wb = np.zeros(kp * nr, dtype=np.uint32)  # rows past the matrix stay zero
            for k in range(kp):
                for r in range(n):
                    wb[k * nr + r] = w32[r0 + r, k]
            yt = np.empty((nt, nr), dtype=np.float32)
            for t0 in range(0, n_tok, nt):
                tile_bf16(yt, wb, xb, t0, nr, nt)
                for t in range(min(nt, n_tok - t0)):
                    for r in range(n):
                        y[t0 + t, r0 + r] = yt[t, r]

    @nb.njit(parallel=PRANGE, **JIT)
    @variant("bf16")
    def matmul_small(y, w32, xb):
        if deps == 0:
            return
        rows = w32.shape[0]
        for i in nb.prange(rows // 4):
            for t in range(y.shape[0]):
                rows_dot_bf16(y, t * rows + 4 * i, w32, 4 * i, xb, t, 4)
        for t in range(y.shape[0]):
            for r in range(rows // 4 * 4, rows):
                rows_dot_bf16(y, t * rows + r, w32, r, xb, t, 1)

    return round_pairs_k, prompt, matmul_small
