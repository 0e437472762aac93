"""Fused dequantize-and-dot kernels for decode and small batches, on integer-quantized activations.

Per token, activations are quantized per group of the weight's group size (``x ≈ dx · xq``) and the sums of the
rounded values ``xs = dx · Σxq`` are kept for the min term. A row is then
``y = Σ_g d_g · dx_g · (u_g · xq_g) − m_g · xs_g`` (exactly ``W · x̂`` for the rounded ``x̂``), where the integer
dot ``u_g · xq_g`` runs on SIMD integer multiply-adds (no float conversion of the codes). Three activation
modes (``ACT_MODES``):

- ``int16``: xq in ±32767 (relative error ~1e-5, far below the weights' own); ``kernels.ir.simd`` (portable IR).
- ``split``: the same int16 numbers fed to the byte dot product of ``kernels.ir.vnni`` as two signed bytes
  (|xq| <= 32639); identical results, ~1.6x the rate. Needs AVX-512 VNNI or AVX-VNNI.
- ``int8``: xq in ±127 per group (as llama.cpp's Q8 activations), one byte dot product per 32 codes, ~2x the rate
  of ``int16``; adds an activation rounding error of ~0.4% of the group's largest value. Needs VNNI, or AVX2 for
  codes of up to 7 bits (``kernels.ir.vnni``: the byte dot product as vpmaddubsw + vpmaddwd, the same integers).

:func:`activation_mode` picks the default: ``int8`` for types below 8 bits where the CPU has the byte dot product
(VNNI or AVX2), and for 8-bit weights (which stay the near-lossless reference) ``split`` on VNNI, ``int16`` on
AVX2; ``int16`` everywhere else. So every AVX2 or VNNI CPU computes the same numbers in the default mode.
One kernel body serves every quant type with a fixed group size (32/64/128): a cached factory closes over ``bits``,
``g`` and the mode, so each type gets its own machine code with them as constants (and its own entry in numba's
on-disk cache, which keys closures by their captured values).
Per-channel types (group = a whole row) use the plane-loop kernels of ``kernels.cpu``.
"""

from __future__ import annotations

import inspect
import zlib
from functools import lru_cache
from typing import Callable, NamedTuple

import numba as nb
import numpy as np

from lowbit.formats.qtypes import GROUP_SIZES
from lowbit.kernels.act8 import QMAX_INT8, QMAX_SPLIT, ROUND_JIT, quantize8
from lowbit.kernels.cpu import JIT, PRANGE, h2f, variant
from lowbit.kernels.ir.amx import TILE, amx_begin, amx_end, amx_tiles, host_has_amx, pack_tokens
from lowbit.kernels.ir.gemm_vnni import tile_gemm, unpack_row
from lowbit.kernels.ir.simd import group_idot, host_has_f16c, quad_fdot, quad_fdot_unpacked
from lowbit.kernels.ir.vnni import byte_dot_max_bits, host_has_avx512_vnni, host_has_byte_dot, host_has_vnni, row_fdot8

XQ_MAX = 32767.0
XQ_MAX_SPLIT = QMAX_SPLIT  # 127 * 256 + 127: the high byte of round(x / dx) + 128 stays a signed byte
XQ_MAX_INT8 = QMAX_INT8
ACT_MODES = ("int16", "split", "int8")


def _dependency_key() -> int:
    """CRC of the modules these kernels inline code from. numba's on-disk cache checks only the kernel's own source
    file; the factory's kernels capture this value, and numba keys closures by their captured values, so an edit to
    the intrinsic or the fp16 decoder invalidates the cached kernels too."""
    from lowbit.kernels import act8, cpu
    from lowbit.kernels.ir import amx, gemm_vnni, simd, vnni

    return zlib.crc32("".join(inspect.getsource(m) for m in (cpu, simd, vnni, gemm_vnni, amx, act8)).encode())


DEPS = _dependency_key()
# scale/min decoding: one hardware conversion where the CPU has it, the table-based decoder elsewhere
HAS_F16C = host_has_f16c()
HAS_VNNI = HAS_F16C and host_has_vnni()
# the byte dot-product kernels (int8 / split modes): natively with VNNI, as the AVX2 pair (codes up to 7 bits) else
HAS_BYTE_DOT = HAS_F16C and host_has_byte_dot()
BYTE_DOT_MAX_BITS = byte_dot_max_bits()
# weight rows per prefill GEMM block: one 32-bit lane each of a 512-bit vpdpbusd with AVX-512, of a 256-bit one else
GEMM_ROWS = 16 if host_has_avx512_vnni() else 8
# prefill GEMM tile (kernels.ir.gemm_vnni): tokens per tile, per activation mode. Each token keeps an integer and a
# float accumulator in registers (split: two integer ones), and each chunk's byte dot products are independent
# chains only across tokens: with AVX-512's 32 registers 12 tokens kept the two vpdpbusd a cycle this Xeon can issue
# busier than 8 (a Llama-3.2-1B-shaped 512-token prefill without AMX: 238 -> 277 tok/s; 10: 255, 14: 267, 16: 240;
# split 6 instead of 4: no change on an 8-bit file); AVX2's 16 registers hold 8
TILE_TOKENS = {"split": 4, "int8": 12 if GEMM_ROWS == 16 else 8}
# the int8 prompt GEMM with AVX-512: blocks of 32 rows by 6 tokens (two 512-bit lanes of rows share each broadcast of
# a token's bytes: 8 loads per 12 vpdpbusd instead of 13 per 12), a last 16-row block as above, so that rows in
# whole 16-row blocks take tiles as the packed batched-decode layout does (the same numbers, lane for lane)
WIDE_ROWS, WIDE_TOKENS = (32, 6) if GEMM_ROWS == 16 else (0, 0)
AMX_BLOCKS = 4  # 16-row blocks per parallel work item of the AMX GEMM (their buffers are allocated once per item)


def specialised(bits: int, g: int) -> bool:
    """Whether the integer kernels serve this type (g: elements per group of the stored layout)."""
    return g in GROUP_SIZES


def activation_mode(bits: int, exact: bool = False) -> str:
    """The activation mode for ``bits``-bit weights on this CPU: the default (module docstring), or with ``exact``
    the int16-precision mode (split where the CPU has VNNI, else int16: the same numbers)."""
    if not byte_dot_serves(bits):
        return "int16"
    if bits >= 8 or exact:
        return "split" if HAS_VNNI else "int16"
    return "int8"


def byte_dot_serves(bits: int) -> bool:
    """Whether the byte dot-product modes (int8, split) multiply ``bits``-bit codes exactly on this CPU."""
    return HAS_BYTE_DOT and bits <= BYTE_DOT_MAX_BITS


@nb.njit(**JIT)
def _absmax(x, t, j0, g):
    """max |x[t, j0:j0+g]| (exact in any order, so fast math may vectorize it)."""
    amax = np.float32(0.0)
    for j in range(g):
        a = abs(x[t, j0 + j])
        if a > amax:
            amax = a
    return amax


@nb.njit(inline="always", **ROUND_JIT)
def _group_scale(x, t, j0, g, qmax):
    """(d, 1/d) for x[t, j0:j0+g]: d = absmax / qmax (1/d = 0 for an all-zero group)."""
    d = _absmax(x, t, j0, g) / qmax
    return d, (np.float32(1.0) / d if d > 0 else np.float32(0.0))


@nb.njit(**ROUND_JIT)
def quantize_activations(xq, dx, xs, x, g):
    """xq: i16[T, cols] = round(x / dx); dx, xs: f32[T, ng] scale and sum of the rounded activations (dx · Σxq,
    see quantize_activations8) per group; x: f32[T, cols]."""
    t_n, cols = x.shape
    ng = cols // g
    for t in range(t_n):
        for gi in range(ng):
            d, inv = _group_scale(x, t, gi * g, g, np.float32(XQ_MAX))
            qsum = 0
            for j in range(g):
                q = np.int32(np.rint(x[t, gi * g + j] * inv))
                qsum += q
                xq[t, gi * g + j] = np.int16(q)
            dx[t, gi] = d
            xs[t, gi] = d * np.float32(qsum)


class Kernels(NamedTuple):
    """The integer kernels of one (bits, group, activation mode): ``matvec`` (one token), ``matmul_small`` (up to
    dispatch.SMALL_BATCH tokens), ``gemm`` (prompts) and ``matvec3`` (one token times up to three matrices of the
    same type sharing the input, as q/k/v or gate/up: one call, the activations quantized once); the last two are
    None in mode int16."""

    matvec: Callable
    matmul_small: Callable
    gemm: Callable | None
    matvec3: Callable | None


def make_kernels(bits: int, g: int, mode: str | None = None, amx: bool | None = None) -> Kernels:
    """:class:`Kernels` for ``bits``-bit groups of ``g`` with activation ``mode`` (default:
    :func:`activation_mode`), compiled with all three as constants. ``amx``: whether the prompt GEMM runs on AMX
    tiles (kernels/ir/amx.py; default: where this process may use them)."""
    mode = activation_mode(bits) if mode is None else mode
    if amx is None:
        amx = mode != "int16" and HAS_VNNI and host_has_amx()
    elif amx and not host_has_amx():
        raise ValueError("this process may not use AMX (see kernels/ir/amx.py host_has_amx)")
    return _make_kernels(bits, g, mode, bool(amx))


@lru_cache(maxsize=None)
def _make_kernels(bits: int, g: int, mode: str, amx: bool) -> Kernels:
    if not specialised(bits, g):
        raise ValueError(f"no integer kernels for {bits}-bit groups of {g}")
    if mode not in ACT_MODES:
        raise ValueError(f"unknown activation mode {mode!r}; choose one of {', '.join(ACT_MODES)}")
    if mode != "int16" and not byte_dot_serves(bits):
        raise ValueError(f"activation mode {mode!r} for {bits}-bit weights needs a CPU with AVX-512 VNNI or AVX-VNNI"
                         + (" (or AVX2 for codes of up to 7 bits)" if bits <= 7 else ""))
    if amx and mode == "int16":
        raise ValueError("the AMX GEMM takes int8 or split activations")
    return Kernels(*(_int16_kernels(bits, g) if mode == "int16" else _vnni_kernels(bits, g, mode == "split", amx)))


@nb.njit(inline="always", **JIT)
def row_dot8(codes, scales, mins, r, xh, xl, dx, xs, asym, bits, g, split):
    """Row r of W times one token's activations (xh, xl: i8[cols]; dx, xs: f32[ng]) on the byte dot product.
    bits, g and split arrive as literals (the kernels below pass their closure constants), as the intrinsic needs.
    Module level, not a closure variable: numba keys a closure's cache entry by a pickle of its captured values,
    and a captured jitted function pickles differently in every process (nothing would ever load from cache)."""
    if asym:
        return row_fdot8(codes[r], scales, mins, r, xh, xl, dx, xs, bits, g, True, split)
    return row_fdot8(codes[r], scales, mins, r, xh, xl, dx, xs, bits, g, False, split)


@nb.njit(**JIT)
def pack_block(codes, scales, mins, r0, asym, bits, g, br):
    """Rows r0..r0+br of W for kernels.ir.gemm_vnni.tile_gemm: the codes interleaved as u8[group][chunk of 4][row][4],
    d and −m (m = d · 2**(bits-1) unless asym) as f32[group, row]. bits, g and br arrive as literals."""
    cols = codes.shape[1] * 8 // bits
    ng = cols // g
    wq = np.empty(cols // 4 * br, dtype=np.uint32)  # the quads of codes, moved four bytes at a time
    dsc = np.empty((ng, br), dtype=np.float32)
    nmc = np.empty((ng, br), dtype=np.float32)
    rows = np.empty((br, cols), dtype=np.uint8)
    for r in range(br):
        unpack_row(rows[r], codes[r0 + r], bits, g)
    rq = rows.view(np.uint32)
    zp = np.float32(1 << (bits - 1))
    for j in range(cols // 4):
        for r in range(br):
            wq[j * br + r] = rq[r, j]
    for r in range(br):
        for gi in range(ng):
            d = h2f(scales[r0 + r, gi])
            dsc[gi, r] = d
            nmc[gi, r] = -h2f(mins[r0 + r, gi]) if asym else -d * zp
    return wq.view(np.uint8), dsc, nmc


def _vnni_kernels(bits: int, g: int, split: bool, amx: bool):
    tag = f"b{bits}g{g}" + ("s" if split else "i") + ("x" if amx else "")
    tt = TILE_TOKENS["split" if split else "int8"]
    br = GEMM_ROWS
    wide = WIDE_ROWS > 0 and not split  # 32-row blocks: int8 activations, AVX-512
    wr, wt = (WIDE_ROWS, WIDE_TOKENS) if wide else (br, tt)  # (else the first branch below never runs)
    deps = DEPS

    @nb.njit(parallel=PRANGE, **JIT)
    @variant(tag)
    def qmatvec(y, codes, scales, mins, x, asym):
        """y[rows] = W @ x for one token; arguments as in the int16 qmatvec."""
        xh, xl, dx, xs = quantize8(x, g, split)
        if deps == 0:  # never true; ties the compiled code to the dependency key (see _dependency_key)
            return
        for r in nb.prange(codes.shape[0]):
            y[r] = row_dot8(codes, scales, mins, r, xh[0], xl[0], dx[0], xs[0], asym, bits, g, split)

    @nb.njit(parallel=PRANGE, **JIT)
    @variant(tag)
    def qmatmul_small(y, codes, scales, mins, x, asym):
        """y[T, rows] = x @ W.T for a few tokens, each row and token as the one-token kernel computes it (so a
        decode pass of several sequences gives each one's numbers bit for bit); arguments as in the int16
        qmatmul_small."""
        xh, xl, dx, xs = quantize8(x, g, split)
        if deps == 0:  # never true; see _dependency_key
            return
        for r in nb.prange(codes.shape[0]):
            for t in range(x.shape[0]):
                y[t, r] = row_dot8(codes, scales, mins, r, xh[t], xl[t], dx[t], xs[t], asym, bits, g, split)

    @nb.njit(parallel=PRANGE, **JIT)
    @variant(tag)
    def qgemm(y, codes, scales, mins, x, asym):
        """y[T, rows] = x @ W.T for a prompt: blocks of WIDE_ROWS rows (int8 activations on AVX-512), then of
        GEMM_ROWS rows, each unpacked once into an interleaved buffer and multiplied with tiles of tokens
        (kernels.ir.gemm_vnni); the last rows % GEMM_ROWS rows one (row, token) at a time. Arguments as in
        qmatmul_small."""
        rows = codes.shape[0]
        t_n, cols = x.shape
        xh, xl, dx, xs = quantize8(x, g, split, True)
        dxT = np.ascontiguousarray(dx.T)
        xsT = np.ascontiguousarray(xs.T)
        if deps == 0:  # never true; see _dependency_key
            return
        nwide = rows // wr if wide else 0
        nblk = (rows - nwide * wr) // br
        rest = nwide * wr + nblk * br
        for i in nb.prange(nwide + nblk + (rows - rest)):
            if i < nwide:
                r0 = i * wr
                wb, dsc, nmc = pack_block(codes, scales, mins, r0, asym, bits, g, wr)
                t0 = 0
                while t0 + wt <= t_n:
                    tile_gemm(y, wb, dsc, nmc, xh, xl, dxT, xsT, r0, t0, bits, g, split, wr, wt)
                    t0 += wt
                while t0 + 4 <= t_n:
                    tile_gemm(y, wb, dsc, nmc, xh, xl, dxT, xsT, r0, t0, bits, g, split, wr, 4)
                    t0 += 4
                while t0 < t_n:
                    tile_gemm(y, wb, dsc, nmc, xh, xl, dxT, xsT, r0, t0, bits, g, split, wr, 1)
                    t0 += 1
            elif i < nwide + nblk:
                r0 = nwide * wr + (i - nwide) * br
                wb, dsc, nmc = pack_block(codes, scales, mins, r0, asym, bits, g, br)
                t0 = 0
                while t0 + tt <= t_n:
                    tile_gemm(y, wb, dsc, nmc, xh, xl, dxT, xsT, r0, t0, bits, g, split, br, tt)
                    t0 += tt
                while tt > 4 and t0 + 4 <= t_n:  # the last few tokens four at a time (each token's own numbers)
                    tile_gemm(y, wb, dsc, nmc, xh, xl, dxT, xsT, r0, t0, bits, g, split, br, 4)
                    t0 += 4
                while t0 < t_n:
                    tile_gemm(y, wb, dsc, nmc, xh, xl, dxT, xsT, r0, t0, bits, g, split, br, 1)
                    t0 += 1
            else:
                r = rest + (i - nwide - nblk)
                for t in range(t_n):
                    y[t, r] = row_dot8(codes, scales, mins, r, xh[t], xl[t], dx[t], xs[t], asym, bits, g, split)

    @nb.njit(parallel=PRANGE, **JIT)
    @variant(tag)
    def qmatvec3(y1, c1, s1, m1, y2, c2, s2, m2, y3, c3, s3, m3, x, asym):
        """y_i[rows_i] = W_i @ x for one token and three matrices (a 0-row third for two), one parallel loop over
        all their rows; arguments per matrix as in qmatvec."""
        xh, xl, dx, xs = quantize8(x, g, split)
        if deps == 0:  # never true; see _dependency_key
            return
        r1 = c1.shape[0]
        r2 = c2.shape[0]
        for i in nb.prange(r1 + r2 + c3.shape[0]):
            if i < r1:
                y1[i] = row_dot8(c1, s1, m1, i, xh[0], xl[0], dx[0], xs[0], asym, bits, g, split)
            elif i < r1 + r2:
                y2[i - r1] = row_dot8(c2, s2, m2, i - r1, xh[0], xl[0], dx[0], xs[0], asym, bits, g, split)
            else:
                y3[i - r1 - r2] = row_dot8(c3, s3, m3, i - r1 - r2, xh[0], xl[0], dx[0], xs[0], asym, bits, g, split)

    @nb.njit(parallel=PRANGE, **JIT)
    @variant(tag)
    def qgemm_amx(y, codes, scales, mins, x, asym):
        """qgemm on AMX tiles (kernels/ir/amx.py): the activations packed once into B tiles, then blocks of 16 rows,
        each unpacked once into row-major codes and multiplied with every 16-token block."""
        rows = codes.shape[0]
        t_n, cols = x.shape
        ng = cols // g
        xh, xl, dx, xs = quantize8(x, g, split, True)
        nbt = (t_n + TILE - 1) // TILE
        xb = np.empty(nbt * TILE * cols, dtype=np.int8)
        pack_tokens(xb, xh)
        xbl = np.empty(nbt * TILE * cols if split else 1, dtype=np.int8)
        if split:
            pack_tokens(xbl, xl)
        dxT = np.zeros((ng, nbt * TILE), dtype=np.float32)
        xsT = np.zeros((ng, nbt * TILE), dtype=np.float32)
        dxT[:, :t_n] = dx.T
        xsT[:, :t_n] = xs.T
        if deps == 0:  # never true; see _dependency_key
            return
        nblk = (rows + TILE - 1) // TILE
        zp = np.float32(1 << (bits - 1))
        for w in nb.prange((nblk + AMX_BLOCKS - 1) // AMX_BLOCKS):
            abuf = np.zeros(TILE * cols, dtype=np.uint8)
            dsc = np.zeros(ng * TILE, dtype=np.float32)
            nmc = np.zeros(ng * TILE, dtype=np.float32)
            obuf = np.empty(TILE * TILE, dtype=np.float32)
            amx_begin(g, split)
            for blk in range(w * AMX_BLOCKS, min(nblk, (w + 1) * AMX_BLOCKS)):
                r0 = blk * TILE
                nr = min(TILE, rows - r0)
                for r in range(nr):
                    unpack_row(abuf[r * cols : (r + 1) * cols], codes[r0 + r], bits, g)
                    for gi in range(ng):
                        d = h2f(scales[r0 + r, gi])
                        dsc[gi * TILE + r] = d
                        nmc[gi * TILE + r] = -h2f(mins[r0 + r, gi]) if asym else -d * zp
                for r in range(nr, TILE):  # rows past the matrix: zero codes and scales, never copied out
                    abuf[r * cols : (r + 1) * cols] = 0
                    for gi in range(ng):
                        dsc[gi * TILE + r] = 0.0
                        nmc[gi * TILE + r] = 0.0
                for tb in range(nbt):
                    amx_tiles(obuf, abuf, dsc, nmc, xb, xbl, dxT, xsT, tb, g, split)
                    for n in range(min(TILE, t_n - tb * TILE)):
                        for r in range(nr):
                            y[tb * TILE + n, r0 + r] = obuf[r * TILE + n]
            amx_end()

    return qmatvec, qmatmul_small, qgemm_amx if amx else qgemm, qmatvec3


def _int16_kernels(bits: int, g: int):
    tag = f"b{bits}g{g}w"
    gbytes = g * bits // 8
    zp = np.float32(1 << (bits - 1))
    deps = DEPS
    quads = HAS_F16C

    @nb.njit(parallel=PRANGE, **JIT)
    @variant(tag)
    def qmatvec(y, codes, scales, mins, x, asym):
        """y[rows] = W @ x for one token. y: f32[rows]; codes: u8[rows, cols*bits/8]; scales, mins: u16[rows, ng]
        (float16 bits; mins unused unless asym); x: f32[1, cols]."""
        rows = codes.shape[0]
        ng = scales.shape[1]
        xq2 = np.empty(x.shape, dtype=np.int16)
        dx2 = np.empty((1, ng), dtype=np.float32)
        xs2 = np.empty((1, ng), dtype=np.float32)
        quantize_activations(xq2, dx2, xs2, x, g)
        xq = xq2[0]
        dx = dx2[0]
        xs = xs2[0]
        if deps == 0:  # never true; ties the compiled code to the dependency key (see _dependency_key)
            return
        nq = ng // 4 * 4 if quads else 0  # groups done four at a time; the rest one by one
        for r in nb.prange(rows):
            crow = codes[r]
            acc = np.float32(0.0)
            for gi in range(0, nq, 4):
                if asym:
                    acc += quad_fdot(crow, scales, mins, r, gi, xq, dx, xs, bits, g, True)
                else:
                    acc += quad_fdot(crow, scales, mins, r, gi, xq, dx, xs, bits, g, False)
            for gi in range(nq, ng):
                d = h2f(scales[r, gi])
                m = h2f(mins[r, gi]) if asym else d * zp
                s = group_idot(crow, gi * gbytes, xq, gi * g, bits, g)
                acc += d * dx[gi] * np.float32(s) - m * xs[gi]
            y[r] = acc

    @nb.njit(parallel=PRANGE, **JIT)
    @variant(tag)
    def qmatmul_small(y, codes, scales, mins, x, asym):
        """y[T, rows] = x @ W.T for a few tokens (x: f32[T, cols]), each row and token as the one-token kernel
        computes it, so a decode pass of several sequences gives each one's numbers bit for bit. Each row's codes
        are unpacked once (one byte per element) and taken through every token."""
        rows = codes.shape[0]
        ng = scales.shape[1]
        t_n = x.shape[0]
        xq = np.empty(x.shape, dtype=np.int16)
        dx = np.empty((t_n, ng), dtype=np.float32)
        xs = np.empty((t_n, ng), dtype=np.float32)
        quantize_activations(xq, dx, xs, x, g)
        if deps == 0:  # never true; see _dependency_key
            return
        nq = ng // 4 * 4 if quads else 0
        for r in nb.prange(rows):
            crow = codes[r]
            urow = np.empty(ng * g, dtype=np.uint8)
            if nq:
                unpack_row(urow, crow, bits, g)
            for t in range(t_n):  # the one-token kernel's loop, so each token's sum is its arithmetic exactly
                acc = np.float32(0.0)
                for gi in range(0, nq, 4):
                    if asym:
                        acc += quad_fdot_unpacked(urow, scales, mins, r, gi, xq[t], dx[t], xs[t], bits, g, True)
                    else:
                        acc += quad_fdot_unpacked(urow, scales, mins, r, gi, xq[t], dx[t], xs[t], bits, g, False)
                for gi in range(nq, ng):
                    d = h2f(scales[r, gi])
                    m = h2f(mins[r, gi]) if asym else d * zp
                    s = group_idot(crow, gi * gbytes, xq[t], gi * g, bits, g)
                    acc += d * dx[t, gi] * np.float32(s) - m * xs[t, gi]
                y[t, r] = acc

    return qmatvec, qmatmul_small, None, None  # prompts use dequantized tiles + BLAS; no fused matvec
