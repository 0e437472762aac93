"""Weights pre-packed for decoding several sequences at once (continuous batching).

The prompt GEMM (``cpu_quant`` qgemm) unpacks each block of ``GEMM_ROWS`` rows into the interleaved layout of
:func:`lowbit.kernels.ir.gemm_vnni.tile_gemm` and multiplies it with tiles of tokens: one byte dot product covers
several rows of one token, so a few tokens cost little more than one. For a prompt the unpacking is paid once per block
and amortised over hundreds of tokens; for a decode step of 2..8 sequences it would cost more than the product.
Here the blocks are unpacked once, when batched decoding is switched on (``dispatch.pack_for_batches``), and kept
(``gemm_vnni.tile_gemm_kept``'s layout, ``gemm_vnni.kept_layout``): codes of up to 4 bits two to a byte (one mask
or shift per chunk unpacks them), 5-6-bit codes in three quarters of a byte (nibble pairs, and the high two bits of
four chunks in one byte), 8-bit codes one to a byte, and each group's float16 d and min: about the stored matrix's
own size. A decode pass of 8 sequences reads each weight once, from memory, so the kernel prefetches the codes 4 KiB
ahead; weights sharing an input (q/k/v, gate/up) take one call (``matmul3``). With codes one to a byte and float32
scales (this module's first layout) a pass read 1.6x the bytes of a 4-bit g32 matrix and was bound by them
(``python bench/decode_loop.py M --batch 8 --pack``).

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
from lowbit.kernels.cpu import JIT, PRANGE, variant
from lowbit.kernels.cpu_quant import DEPS, GEMM_ROWS, TILE_TOKENS, quantize8, row_dot8
from lowbit.kernels.ir.gemm_vnni import kept_bytes, tile_gemm_kept, unpack_row
from lowbit.kernels.timing import kernel_call

KEPT_TOKENS = 8  # tokens per kept tile: a decode pass has at most dispatch.SMALL_BATCH sequences


@lru_cache(maxsize=None)
def _key() -> int:
    """The kernels below inline code from cpu_quant (and, through it, the modules cpu_quant.DEPS covers); numba's
    cache checks only this file, and keys closures by their captured values: capturing this ties them to all of it.
    Read when a kernel is first made, not at import."""
    return zlib.crc32(inspect.getsource(cpu_quant).encode()) ^ DEPS


@lru_cache(maxsize=None)
def packed_kernels(bits: int, g: int, split: bool):
    """(prepack, matmul) for ``bits``-bit groups of ``g`` with int8 (split: int16-precision) activations:
    ``prepack(codes, scales, mins, asym) -> (wb, sc)`` and ``matmul(y, wb, sc, codes, scales, mins, x, asym)``
    for y[T, rows] = x @ W.T (rows past the last whole block from the codes, one at a time)."""
    return _prepack(bits, g), _matmul(bits, g, split)


@nb.njit(inline="always", **JIT)
def _pack_block(wb, sc, codes, scales, mins, r0, asym, bits, g, br):
    """Rows r0..r0+br into wb, codes interleaved as [group][chunk of 4][row][4] in gemm_vnni.kept_layout(bits), and
    sc (u16[group, 2, row]: d, then the min or, symmetric, d again). bits, g and br arrive as literals."""
    cols = codes.shape[1] * 8 // bits
    row = np.empty(cols, dtype=np.uint8)
    v = br * 4  # bytes of one chunk of the block
    for r in range(br):
        unpack_row(row, codes[r0 + r], bits, g)
        for b in range(4):
            o = r * 4 + b
            if bits <= 4:
                for j in range(0, cols, 8):
                    wb[(j >> 3) * v + o] = row[j + b] | (row[j + 4 + b] << 4)
            elif bits <= 6:
                for j in range(0, cols, 16):
                    base = (j >> 4) * 3 * v + o
                    wb[base] = (row[j + b] & 15) | ((row[j + 4 + b] & 15) << 4)
                    wb[base + v] = (row[j + 8 + b] & 15) | ((row[j + 12 + b] & 15) << 4)
                    top = 0
                    for k in range(4):
                        top |= ((row[j + 4 * k + b] >> 4) & 3) << (2 * k)
                    wb[base + 2 * v] = top
            else:
                for j in range(0, cols, 4):
                    wb[(j >> 2) * v + o] = row[j + b]
        for gi in range(cols // g):
            sc[gi, 0, r] = scales[r0 + r, gi]
            sc[gi, 1, r] = mins[r0 + r, gi] if asym else scales[r0 + r, gi]


@lru_cache(maxsize=None)
def _prepack(bits: int, g: int):
    """One closure per (bits, g): two live closures with the same captured values would share a cache entry."""
    tag = f"b{bits}g{g}"
    br = GEMM_ROWS
    key = _key()
    per16 = kept_bytes(bits, 16)  # bytes of 16 codes (a block's rows x cols is a multiple of 16)

    @nb.njit(parallel=PRANGE, **JIT)
    @variant(tag)
    def prepack(codes, scales, mins, asym):
        if key == 0:  # never true; ties the cached code to _key()
            return None
        nblk = codes.shape[0] // br
        cols = codes.shape[1] * 8 // bits
        ng = cols // g
        wb = np.empty((nblk, cols * br // 16 * per16), dtype=np.uint8)
        sc = np.empty((nblk, ng, 2, br), dtype=np.uint16)
        for i in nb.prange(nblk):
            _pack_block(wb[i], sc[i], codes, scales, mins, i * br, asym, bits, g, br)
        return wb, sc

    return prepack


@nb.njit(inline="always", **JIT)
def _activations(x, asym, bits, g, split):
    """What every kept product needs of its input: the min term's factor (see tile_gemm_kept), the rounded
    activations and their per-group scales and sums token-major as the tiles read them."""
    mult = np.float32(-1.0) if asym else np.float32(-(1 << (bits - 1)))
    xh, xl, dx, xs = quantize8(x, g, split)
    return mult, xh, xl, dx, xs, np.ascontiguousarray(dx.T), np.ascontiguousarray(xs.T)


@nb.njit(inline="always", **JIT)
def _block(y, wb, sc, mult, xh, xl, dxT, xsT, r0, t_n, bits, g, split, br, tt):
    """y[:, r0:r0+br] from one kept block: tiles of tt tokens, then of 4, 2 and 1 (a decode pass has 2..8)."""
    t0 = 0
    while t0 + tt <= t_n:
        tile_gemm_kept(y, wb, sc, mult, xh, xl, dxT, xsT, r0, t0, bits, g, split, br, tt)
        t0 += tt
    while tt > 4 and t0 + 4 <= t_n:
        tile_gemm_kept(y, wb, sc, mult, xh, xl, dxT, xsT, r0, t0, bits, g, split, br, 4)
        t0 += 4
    while t0 + 2 <= t_n:
        tile_gemm_kept(y, wb, sc, mult, xh, xl, dxT, xsT, r0, t0, bits, g, split, br, 2)
        t0 += 2
    if t0 < t_n:
        tile_gemm_kept(y, wb, sc, mult, xh, xl, dxT, xsT, r0, t0, bits, g, split, br, 1)


@lru_cache(maxsize=None)
def _matmul(bits: int, g: int, split: bool):
    tag = f"b{bits}g{g}" + ("s" if split else "i")
    br = GEMM_ROWS
    tt = min(TILE_TOKENS["split" if split else "int8"], KEPT_TOKENS)
    key = _key()

    @nb.njit(parallel=PRANGE, **JIT)
    @variant(tag)
    def matmul(y, wb, sc, codes, scales, mins, x, asym):
        if key == 0:  # never true; ties the cached code to _key()
            return
        rows = codes.shape[0]
        t_n = x.shape[0]
        mult, xh, xl, dx, xs, dxT, xsT = _activations(x, asym, bits, g, split)
        nblk = wb.shape[0]
        for i in nb.prange(nblk + (rows - nblk * br)):
            if i < nblk:
                _block(y, wb[i], sc[i], mult, xh, xl, dxT, xsT, i * br, t_n, bits, g, split, br, tt)
            else:
                r = nblk * br + (i - nblk)
                for t in range(t_n):
                    y[t, r] = row_dot8(codes, scales, mins, r, xh[t], xl[t], dx[t], xs[t], asym, bits, g, split)

    return matmul


@lru_cache(maxsize=None)
def matmul3(bits: int, g: int, split: bool):
    """``matmul3(y1, wb1, sc1, y2, wb2, sc2, y3, wb3, sc3, x, asym)``: x times two or three kept matrices of one
    type that share the input (q/k/v, gate/up; the third may have no blocks), whole blocks only, in one call: the
    activations quantized once, one parallel loop over the blocks of all of them. Each y is what ``matmul`` gives."""
    tag = f"b{bits}g{g}" + ("s" if split else "i")
    br = GEMM_ROWS
    tt = min(TILE_TOKENS["split" if split else "int8"], KEPT_TOKENS)
    key = _key()

    @nb.njit(parallel=PRANGE, **JIT)
    @variant(tag)
    def fused(y1, wb1, sc1, y2, wb2, sc2, y3, wb3, sc3, x, asym):
        if key == 0:  # never true; ties the cached code to _key()
            return
        t_n = x.shape[0]
        mult, xh, xl, _, _, dxT, xsT = _activations(x, asym, bits, g, split)
        n1, n2 = wb1.shape[0], wb2.shape[0]
        for i in nb.prange(n1 + n2 + wb3.shape[0]):
            if i < n1:
                _block(y1, wb1[i], sc1[i], mult, xh, xl, dxT, xsT, i * br, t_n, bits, g, split, br, tt)
            elif i < n1 + n2:
                j = i - n1
                _block(y2, wb2[j], sc2[j], mult, xh, xl, dxT, xsT, j * br, t_n, bits, g, split, br, tt)
            else:
                j = i - n1 - n2
                _block(y3, wb3[j], sc3[j], mult, xh, xl, dxT, xsT, j * br, t_n, bits, g, split, br, tt)

    return fused


_NO_ROWS = np.empty((0, 0), dtype=np.float32)  # the third y of a two-matrix call (no blocks: never written)


def kept_together(ws: list) -> bool:
    """Whether dispatch Weights ws (2 or 3) can take one matmul3 call: all kept for batches, one type and activation
    mode, no extras, whole blocks of rows."""
    w0 = ws[0]
    return 2 <= len(ws) <= 3 and all(
        w.packed is not None and w.int_kernels is w0.int_kernels and w.asym == w0.asym and w.had_d is None
        and w.lr_a is None and w.act_q is None and w.rows % GEMM_ROWS == 0 for w in ws)


def kept_many(ws: list, x: np.ndarray) -> list[np.ndarray]:
    """[dispatch.linear(w, x) for w in ws] for weights that :func:`kept_together` accepts, in one matmul3 call."""
    w0 = ws[0]
    ys = [np.empty((x.shape[0], w.rows), dtype=np.float32) for w in ws]
    args = [a for w, y in zip(ws, ys) for a in (y, w.packed[0], w.packed[1])]
    if len(ws) == 2:
        args += [_NO_ROWS, w0.packed[0][:0], w0.packed[1][:0]]
    fused = matmul3(w0.bits, w0.g, w0.act_mode == "split")
    kernel_call(fused, *args, np.ascontiguousarray(x), w0.asym)
    for w, y in zip(ws, ys):
        if w.bias is not None:
            y += w.bias
    return ys
