"""Each LLVM-IR intrinsic against its numpy twin (kernels/ref_intrinsics.py), on its own and on awkward shapes and
offsets, so that a wrong one shows as itself and not only as "the whole GEMM is off"."""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest
from lbtest import byte_dot_case

from lowbit.formats.qtypes import pack_codes, quant_type
from lowbit.kernels import ref_intrinsics as ref
from lowbit.kernels.act8 import quantize_row8
from lowbit.kernels.cpu_attention import dequant8_q4, dequant8_q8, prefetch, scores8, values8
from lowbit.kernels.cpu_attention_prompt import score_tile, value_tile
from lowbit.kernels.cpu_kv import float_bits, float_to_half
from lowbit.kernels.ir.amx import TILE, host_has_amx
from lowbit.kernels.ir.gemm_vnni import kept_bytes, tile_gemm, tile_gemm_kept, unpack_row
from lowbit.kernels.ir.simd import (
    bits_to_float,
    group_idot,
    half_to_float,
    host_has_f16c,
    quad_fdot,
    quad_fdot_unpacked,
)
from lowbit.kernels.ir.vnni import host_has_avx512_vnni, host_has_byte_dot, row_fdot8

RNG = np.random.default_rng(7)
# (bits, group) pairs: every bit-width once, every group size more than once (one compile each)
GROUPS = [(2, 128), (3, 64), (4, 32), (5, 128), (6, 32), (8, 64)]
needs_f16c = pytest.mark.skipif(not host_has_f16c(), reason="needs hardware float16 conversion")
needs_vnni = pytest.mark.skipif(not host_has_byte_dot(), reason="needs the byte dot product (VNNI or AVX2)")


def _packed(rows: int, cols: int, bits: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """(unsigned codes int32[rows, cols], packed u8[rows, cols·bits/8])."""
    u = RNG.integers(0, 1 << bits, size=(rows, cols)).astype(np.int32)
    return u, np.ascontiguousarray(pack_codes(u, quant_type(bits, g, True)))


def _halves(shape, lo=0.01, hi=0.2) -> np.ndarray:
    return RNG.uniform(lo, hi, size=shape).astype(np.float16).view(np.uint16)


@pytest.mark.parametrize("bits,g", GROUPS)
def test_group_idot(bits, g):
    @nb.njit
    def call(codes, boff, xq, xoff):
        return group_idot(codes, boff, xq, xoff, bits, g)

    u, packed = _packed(1, 5 * g, bits, g)
    codes = packed.reshape(-1)
    xq = RNG.integers(-32000, 32000, size=5 * g + 7).astype(np.int16)
    gbytes = g * bits // 8
    for gi, xoff in ((0, 0), (3, 3 * g + 7), (4, 1)):  # an unaligned activation offset too
        assert call(codes, gi * gbytes, xq, xoff) == ref.group_idot(codes, gi * gbytes, xq, xoff, bits, g)
    assert ref.codes_of_group(codes, 2 * gbytes, bits, g).tolist() == u[0, 2 * g : 3 * g].tolist()


@needs_f16c
@pytest.mark.parametrize("bits,g,asym", [(2, 128, True), (4, 32, False), (6, 64, True), (8, 64, False)])
def test_quad_fdot(bits, g, asym):
    @nb.njit
    def call(crow, scales, mins, r, gi, xq, dx, xs):
        return quad_fdot(crow, scales, mins, r, gi, xq, dx, xs, bits, g, asym)

    rows, ng = 3, 6
    _, packed = _packed(rows, ng * g, bits, g)
    scales, mins = _halves((rows, ng)), _halves((rows, ng))
    xq = RNG.integers(-32000, 32000, size=ng * g).astype(np.int16)
    dx, xs = RNG.uniform(1e-5, 1e-4, ng).astype(np.float32), RNG.uniform(-50, 50, ng).astype(np.float32)
    for r, gi in ((0, 0), (2, 2)):
        got = call(packed[r], scales, mins, r, gi, xq, dx, xs)
        want = ref.quad_fdot(packed[r], scales, mins, r, gi, xq, dx, xs, bits, g, asym)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-4)


@needs_f16c
@pytest.mark.parametrize("bits,g,asym", [(2, 128, True), (3, 64, False), (4, 32, True), (8, 64, False)])
def test_quad_fdot_unpacked_is_quad_fdot_bit_for_bit(bits, g, asym):
    """On codes unpacked by unpack_row, against its numpy twin and, exactly, against quad_fdot on the packed row."""

    @nb.njit
    def call(urow, crow, scales, mins, r, gi, xq, dx, xs):
        return (quad_fdot_unpacked(urow, scales, mins, r, gi, xq, dx, xs, bits, g, asym),
                quad_fdot(crow, scales, mins, r, gi, xq, dx, xs, bits, g, asym))

    @nb.njit
    def unpack(dst, crow):
        unpack_row(dst, crow, bits, g)

    rows, ng = 3, 6
    u, packed = _packed(rows, ng * g, bits, g)
    scales, mins = _halves((rows, ng)), _halves((rows, ng))
    xq = RNG.integers(-32000, 32000, size=ng * g).astype(np.int16)
    dx, xs = RNG.uniform(1e-5, 1e-4, ng).astype(np.float32), RNG.uniform(-50, 50, ng).astype(np.float32)
    for r, gi in ((0, 0), (2, 2)):
        urow = np.empty(ng * g, np.uint8)
        unpack(urow, packed[r])
        assert np.array_equal(urow, u[r])
        got, packed_got = call(urow, packed[r], scales, mins, r, gi, xq, dx, xs)
        assert got == packed_got
        want = ref.quad_fdot_unpacked(u[r].astype(np.uint8), scales, mins, r, gi, xq, dx, xs, bits, g, asym)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_scalar_conversions():
    @nb.njit
    def h2f(h):
        return half_to_float(h)

    @nb.njit
    def i2f(i):
        return bits_to_float(i)

    @nb.njit
    def f2h(x):
        return float_to_half(x)

    @nb.njit
    def f2i(x):
        return float_bits(x)

    special = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 65520.0, 1e-8, 6.1e-5, 5.96e-8, np.inf, -np.inf], np.float32)
    xs = np.concatenate([special, RNG.standard_normal(200).astype(np.float32) * 1000])
    for x in xs:
        assert f2h(x) == ref.float_to_half(x), x
        assert f2i(x) == ref.float_bits(x), x
        b = np.int64(ref.float_bits(x)) & 0xFFFFFFFF
        assert np.float32(i2f(b)).view(np.int32) == ref.bits_to_float(b).view(np.int32) == np.float32(x).view(np.int32)
    for h in list(range(0, 65536, 97)) + [0x7C00, 0xFC00, 0x0001, 0x8001, 0x3C00]:
        got, want = np.float32(h2f(np.uint16(h))), ref.half_to_float(h)
        assert got.view(np.int32) == want.view(np.int32) or (np.isnan(got) and np.isnan(want)), h


@needs_f16c
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("bits", [byte_dot_case(b, b, id=f"{b}bit") for b in (2, 3, 4, 5, 6, 8)])
def test_row_fdot8_is_exact_at_its_extremes(bits, split):
    """The decode row kernel with the largest codes of each width times extreme activation bytes over groups of 128
    (four 32-byte chunks, whose 16-bit pair sums AVX2 adds before widening, ``fused_chunks(bits)`` at a time): the
    integer sums exactly."""
    g = 128

    @nb.njit
    def call(crow, scales, mins, xh, xl, dx, xs):
        return row_fdot8(crow, scales, mins, 0, xh, xl, dx, xs, bits, g, False, split)

    top = (1 << bits) - 1
    crow = np.ascontiguousarray(pack_codes(np.full((1, g), top, dtype=np.int32), quant_type(bits, g, True)))[0]
    ones = np.full((1, 1), 0x3C00, dtype=np.uint16)  # float16 1.0
    for hi, lo in ((127, 127), (-128, -128), (127, -128), (-127, 127)):
        hi = hi if split else max(hi, -127)
        xh, xl = np.full(g, hi, dtype=np.int8), np.full(g, lo, dtype=np.int8)
        got = call(crow, ones, ones, xh, xl, np.ones(1, np.float32), np.zeros(1, np.float32))
        want = top * g * (256 * hi + lo if split else hi)
        # the integer sums are exact; their float combination rounds once past 2^24 (8-bit split reaches 2^30): a
        # 16-bit pair sum that saturated or wrapped would be off by far more than two float32 steps
        assert abs(got - want) <= 2.0**-22 * abs(want), (hi, lo, got, want)


@needs_vnni
@needs_f16c
@pytest.mark.parametrize("bits,g,asym,split", [(2, 128, True, False), (3, 64, True, False), (4, 32, False, False),
                                               (5, 128, True, True), byte_dot_case(8, 8, 64, False, True),
                                               (6, 32, True, False)])
def test_row_fdot8(bits, g, asym, split):
    @nb.njit
    def call(crow, scales, mins, r, xh, xl, dx, xs):
        return row_fdot8(crow, scales, mins, r, xh, xl, dx, xs, bits, g, asym, split)

    rows = 2
    for ng in (1, 8, 11):  # fewer than eight groups, exactly eight, eight and a tail
        _, packed = _packed(rows, ng * g, bits, g)
        scales, mins = _halves((rows, ng)), _halves((rows, ng))
        xh = RNG.integers(-127, 128, size=ng * g).astype(np.int8)
        xl = RNG.integers(-128, 128, size=ng * g).astype(np.int8)
        dx, xs = RNG.uniform(1e-3, 1e-2, ng).astype(np.float32), RNG.uniform(-50, 50, ng).astype(np.float32)
        got = call(packed[1], scales, mins, 1, xh, xl, dx, xs)
        want = ref.row_fdot8(packed[1], scales, mins, 1, xh, xl, dx, xs, bits, g, asym, split)
        assert got == pytest.approx(want, rel=2e-5, abs=1e-3), (ng, got, want)


@pytest.mark.parametrize("bits,g", GROUPS)
def test_unpack_row(bits, g):
    @nb.njit
    def call(dst, crow):
        unpack_row(dst, crow, bits, g)

    u, packed = _packed(2, 3 * g, bits, g)
    dst = np.zeros(3 * g, dtype=np.uint8)
    call(dst, packed[1])
    assert np.array_equal(dst, ref.unpack_row(packed[1], 3 * g, bits, g)) and np.array_equal(dst, u[1])


def _interleave(u: np.ndarray) -> np.ndarray:
    """u8[cols · R]: rows u[R, cols] as [chunk of 4][row][4] (the block layout of kernels.cpu_quant.pack_block)."""
    r_n, cols = u.shape
    return np.ascontiguousarray(u.reshape(r_n, cols // 4, 4).transpose(1, 0, 2).reshape(-1)).astype(np.uint8)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("bits", [byte_dot_case(b, b, id=f"{b}bit") for b in (2, 3, 4, 5, 6, 8)])
def test_byte_dot_is_exact_at_its_extremes(bits, split):
    """The largest codes of each width the host multiplies exactly (below 8 bits on AVX2, whose vpmaddubsw pair sums
    saturate at 2**15 − 1; 8 with VNNI) times the extreme activation bytes (−128, 127; int8 activations stay in
    ±127, split's low byte reaches −128), through the prompt GEMM over groups of 128 (32 chunks): the integer sums
    exactly — a saturated pair, or 16-bit pair sums added over more chunks than ``fused_chunks(bits)`` allows
    (AVX2), would be far off (with 255-codes on AVX2: 1,048,544 instead of 2,072,640)."""
    g, R = 128, 16 if host_has_avx512_vnni() else 8

    @nb.njit
    def call(y, wb, dsc, nmc, xh, xl, dxT, xsT):
        tile_gemm(y, wb, dsc, nmc, xh, xl, dxT, xsT, 0, 0, bits, g, split, R, 4)

    top = (1 << bits) - 1
    wb = np.full(g * R, top, dtype=np.uint8)
    dsc, nmc = np.ones((1, R), dtype=np.float32), np.zeros((1, R), dtype=np.float32)
    pairs = [(127, 127), (-128, -128), (127, -128), (-127, 127)]
    xh = np.array([[hi if split else max(hi, -127)] * g for hi, _ in pairs], dtype=np.int8)
    xl = np.array([[lo] * g for _, lo in pairs], dtype=np.int8)
    y = np.zeros((4, R), dtype=np.float32)
    call(y, wb, dsc, nmc, xh, xl, np.ones((1, 4), dtype=np.float32), np.zeros((1, 4), dtype=np.float32))
    per = top * ((256 * xh[:, 0].astype(np.int64) + xl[:, 0]) if split else xh[:, 0].astype(np.int64))
    np.testing.assert_allclose(y, np.repeat((per * g)[:, None], R, axis=1), rtol=1e-6)


@needs_vnni
@pytest.mark.parametrize("bits", [2, 4, 6])
@pytest.mark.parametrize("g,split,R,T", [(32, False, 16, 1), (64, True, 8, 5), (128, False, 16, 12),
                                         (64, False, 32, 6), (32, True, 32, 3)])
def test_tile_gemm(g, split, R, T, bits):
    R = R if host_has_avx512_vnni() else 8  # 16- and 32-row blocks are one and two 512-bit lanes

    @nb.njit
    def call(y, wb, dsc, nmc, xh, xl, dxT, xsT, r0, t0):
        tile_gemm(y, wb, dsc, nmc, xh, xl, dxT, xsT, r0, t0, bits, g, split, R, T)

    ng, tokens, rows = 3, T + 2, R + 5
    cols = ng * g
    u = RNG.integers(0, 1 << bits, size=(R, cols)).astype(np.uint8)
    wb = _interleave(u)
    dsc = RNG.uniform(0.01, 0.1, (ng, R)).astype(np.float32)
    nmc = RNG.uniform(-1, 1, (ng, R)).astype(np.float32)
    xh = RNG.integers(-127, 128, size=(tokens, cols)).astype(np.int8)
    xl = RNG.integers(-128, 128, size=(tokens, cols)).astype(np.int8)
    dxT = RNG.uniform(1e-4, 1e-3, (ng, tokens)).astype(np.float32)
    xsT = RNG.uniform(-5, 5, (ng, tokens)).astype(np.float32)
    y = RNG.standard_normal((tokens, rows)).astype(np.float32)
    want = ref.tile_gemm(y, wb, dsc, nmc, xh, xl, dxT, xsT, 3, 1, bits, g, split, R, T)
    call(y, wb, dsc, nmc, xh, xl, dxT, xsT, 3, 1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-3)


def _kept(u: np.ndarray, bits: int) -> np.ndarray:
    """The kept layout of rows u[R, cols] (kernels/packed.py, gemm_vnni.kept_layout), built from _interleave's."""
    wb = _interleave(u)
    v = u.shape[0] * 4
    if bits <= 4:
        runs = wb.reshape(-1, 2, v)
        return np.ascontiguousarray(runs[:, 0] | (runs[:, 1] << 4)).reshape(-1)
    if bits <= 6:
        q = wb.reshape(-1, 4, v)
        top = sum(((q[:, k] >> 4) & 3) << (2 * k) for k in range(4)).astype(np.uint8)
        parts = [(q[:, 0] & 15) | ((q[:, 1] & 15) << 4), (q[:, 2] & 15) | ((q[:, 3] & 15) << 4), top]
        return np.ascontiguousarray(np.stack(parts, axis=1)).reshape(-1)
    return wb


@needs_vnni
@pytest.mark.parametrize("bits", [2, 4, 5, 6, byte_dot_case(8, 8, id="8")])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("g,split,T", [(32, False, 1), (64, True, 5), (128, False, 8)])
def test_tile_gemm_kept(g, split, T, asym, bits):
    """The kept layout's product equals its twin and, bit for bit, tile_gemm on the same block unpacked with its
    float32 d and −m (what the batched decode pass is tested to share with the prompt GEMM)."""
    R = 16 if host_has_avx512_vnni() else 8

    @nb.njit
    def call(y, wb, sc, mult, xh, xl, dxT, xsT):
        tile_gemm_kept(y, wb, sc, mult, xh, xl, dxT, xsT, 3, 1, bits, g, split, R, T)

    @nb.njit
    def plain(y, wb, dsc, nmc, xh, xl, dxT, xsT):
        tile_gemm(y, wb, dsc, nmc, xh, xl, dxT, xsT, 3, 1, bits, g, split, R, T)

    ng, tokens, rows = 3, T + 2, R + 5
    cols = ng * g
    u = RNG.integers(0, 1 << bits, size=(R, cols)).astype(np.uint8)
    d16 = RNG.uniform(0.01, 0.1, (ng, R)).astype(np.float16)
    m16 = RNG.uniform(0, 1, (ng, R)).astype(np.float16) if asym else d16
    sc = np.ascontiguousarray(np.stack([d16, m16], axis=1).view(np.uint16))
    mult = np.float32(-1.0 if asym else -(1 << (bits - 1)))
    xh = RNG.integers(-127, 128, size=(tokens, cols)).astype(np.int8)
    xl = RNG.integers(-128, 128, size=(tokens, cols)).astype(np.int8)
    dxT = RNG.uniform(1e-4, 1e-3, (ng, tokens)).astype(np.float32)
    xsT = RNG.uniform(-5, 5, (ng, tokens)).astype(np.float32)
    y0 = RNG.standard_normal((tokens, rows)).astype(np.float32)
    wb = _kept(u, bits)
    assert wb.size == kept_bytes(bits, cols * R)
    want = ref.tile_gemm_kept(y0, wb, sc, mult, xh, xl, dxT, xsT, 3, 1, bits, g, split, R, T)
    y = y0.copy()
    call(y, wb, sc, mult, xh, xl, dxT, xsT)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-3)
    y2 = y0.copy()
    plain(y2, _interleave(u), d16.astype(np.float32), m16.astype(np.float32) * mult, xh, xl, dxT, xsT)
    assert np.array_equal(y, y2)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_quantize_row8_matches_its_twin_bit_for_bit(g, split):
    """Every byte and float of the vector quantizer equals the plain float32 arithmetic: magnitudes from 1e-30 to
    1e30, an all-zero group, values on (near) half levels, one group with a single non-zero."""

    @nb.njit(fastmath=False)
    def call(xh, xl, dx, xs, x, t):
        quantize_row8(xh, xl, dx, xs, x, t, g, split)

    ng = 6
    x = (RNG.standard_normal((3, ng * g)) * 10.0 ** RNG.uniform(-30, 30, (3, ng * g))).astype(np.float32)
    x[1] = (RNG.standard_normal(ng * g) * 3).astype(np.float32)
    x[1, :g] = 0.0
    qmax = 32639.0 if split else 127.0
    x[1, 2 * g - 1] = 1.0  # the group's absmax: a level is ~1/qmax, and the others sit on (near) half levels
    x[1, g : 2 * g - 1] = ((np.arange(g - 1) - g // 2 + 0.5) / qmax).astype(np.float32)
    x[2, 3 * g : 4 * g] = 0.0
    x[2, 3 * g + 5] = -7.5
    for t in range(3):
        xh = np.zeros((3, ng * g), dtype=np.int8)
        xl = np.zeros((3, ng * g), dtype=np.int8)
        dx = np.zeros((3, ng), dtype=np.float32)
        xs = np.zeros((3, ng), dtype=np.float32)
        call(xh, xl, dx, xs, x, t)
        wh, wl, wd, ws = ref.quantize_row8(x, t, g, split)
        assert np.array_equal(xh[t], wh) and np.array_equal(dx[t], wd) and np.array_equal(xs[t], ws), t
        if split:
            assert np.array_equal(xl[t], wl)
        assert not xh[(t + 1) % 3].any()  # only token t is written


def _amx_inputs(g: int, ng: int, tokens: int) -> dict:
    """Random operands of amx_block: 16 weight rows (abuf), d/−m per group and row, int8 activations (xh, xl) also
    packed in the B-tile layout (xb, xbl), dx/xs per group and token (zero beyond the last token)."""
    from lowbit.kernels.ir.amx import pack_tokens

    cols = ng * g
    nbt = (tokens + TILE - 1) // TILE
    v = {"abuf": RNG.integers(0, 256, size=TILE * cols).astype(np.uint8),
         "dsc": RNG.uniform(0.01, 0.1, ng * TILE).astype(np.float32),
         "nmc": RNG.uniform(-1, 1, ng * TILE).astype(np.float32),
         "xh": RNG.integers(-127, 128, size=(tokens, cols)).astype(np.int8),
         "xl": RNG.integers(-128, 128, size=(tokens, cols)).astype(np.int8),
         "xb": np.zeros(nbt * TILE * cols, np.int8), "xbl": np.zeros(nbt * TILE * cols, np.int8),
         "dxT": np.zeros((ng, nbt * TILE), np.float32), "xsT": np.zeros((ng, nbt * TILE), np.float32)}  # fmt: skip
    pack_tokens(v["xb"], v["xh"])
    pack_tokens(v["xbl"], v["xl"])
    v["dxT"][:, :tokens] = RNG.uniform(1e-4, 1e-3, (ng, tokens))
    v["xsT"][:, :tokens] = RNG.uniform(-5, 5, (ng, tokens))
    return v


@pytest.mark.skipif(not host_has_amx(), reason="needs AMX-INT8 and the kernel's permission for the tile state")
@pytest.mark.parametrize("g,split", [(32, False), (128, True)])
def test_amx_block(g, split):
    from lowbit.kernels.ir.amx import amx_block

    @nb.njit
    def call(obuf, abuf, dsc, nmc, xb, xbl, dxT, xsT, tb):
        amx_block(obuf, abuf, dsc, nmc, xb, xbl, dxT, xsT, tb, g, split)

    v = _amx_inputs(g, 2, 20)
    abuf, dsc, nmc, xb, xbl, dxT, xsT = (v[k] for k in ("abuf", "dsc", "nmc", "xb", "xbl", "dxT", "xsT"))
    obuf = np.zeros(TILE * TILE, np.float32)
    call(obuf, abuf, dsc, nmc, xb, xbl, dxT, xsT, 1)
    want = ref.amx_block(abuf, dsc, nmc, xb, xbl, dxT, xsT, 1, g, split)
    np.testing.assert_allclose(obuf.reshape(TILE, TILE), want, rtol=1e-5, atol=1e-3)


@nb.njit
def _scores(out, ooff, q, qoff, k, koff, n, scale):
    scores8(out, ooff, q, qoff, k, koff, n, scale)


@nb.njit
def _values(out, ooff, p, poff, v, voff, n):
    values8(out, ooff, p, poff, v, voff, n)


@pytest.mark.parametrize("n", [8, 24, 64, 256])
def test_scores8_and_values8(n):
    q = RNG.standard_normal(3 * n).astype(np.float32)
    k = RNG.standard_normal(8 * n + 5 * n).astype(np.float32)
    out = np.full(11, 7.0, np.float32)
    _scores(out, 2, q, n, k, 5 * n, n, np.float32(0.3))
    np.testing.assert_allclose(out[2:10], ref.scores8(q, n, k, 5 * n, n, 0.3), rtol=1e-5, atol=1e-5)
    assert out[:2].tolist() == [7.0, 7.0] and out[10] == 7.0  # nothing outside the eight
    p = RNG.uniform(0, 1, 12).astype(np.float32)
    acc = RNG.standard_normal(2 * n + 3).astype(np.float32)
    want = ref.values8(acc, 3, p, 4, k, n, n)
    _values(acc, 3, p, 4, k, n, n)
    np.testing.assert_allclose(acc, want, rtol=1e-5, atol=1e-5)


def test_cache_row_decoders_and_prefetch():
    @nb.njit
    def q8(out, ooff, src, soff, d):
        dequant8_q8(out, ooff, src, soff, d)

    @nb.njit
    def q4(out, ooff, src, soff, half, d):
        dequant8_q4(out, ooff, src, soff, half, d)

    @nb.njit
    def fetch(a, off):
        prefetch(a, off)

    src8 = RNG.integers(-128, 128, size=21).astype(np.int8)
    out = np.zeros(30, np.float32)
    q8(out, 5, src8, 13, np.float32(0.25))
    assert np.array_equal(out[5:13], ref.dequant8_q8(src8, 13, 0.25)) and not out[:5].any() and not out[13:].any()
    src4 = RNG.integers(0, 256, size=19).astype(np.uint8)
    out = np.zeros(40, np.float32)
    q4(out, 3, src4, 11, 16, np.float32(-1.5))
    lo, hi = ref.dequant8_q4(src4, 11, -1.5)
    assert np.array_equal(out[3:11], lo) and np.array_equal(out[19:27], hi)
    assert not out[11:19].any() and not out[27:].any() and not out[:3].any()
    a = RNG.standard_normal(64).astype(np.float32)
    before = a.copy()
    for off in (0, 255, 1 << 20, -4096):  # a hint: any address, never a fault, nothing changes
        fetch(a, off)
    assert np.array_equal(a, before)


@pytest.mark.parametrize("split", [False, True])
def test_amx_twin_reads_the_packed_token_layout(split):
    """The AMX twin (checked against the intrinsic only where AMX runs) unpacks pack_tokens' layout: it equals the
    product written on the unpacked activations."""
    g, ng, tokens = 32, 3, 21
    v = _amx_inputs(g, ng, tokens)
    a, dsc, nmc, xh, xl, dxT, xsT = (v[k] for k in ("abuf", "dsc", "nmc", "xh", "xl", "dxT", "xsT"))
    got = ref.amx_block(a, dsc, nmc, v["xb"], v["xbl"], dxT, xsT, 1, g, split)
    a = a.reshape(TILE, ng * g)
    x = ref.split_activations(xh, xl, split)
    want = np.zeros((TILE, TILE))
    for r in range(TILE):
        for n in range(TILE):
            t = TILE + n
            for gi in range(ng):
                s = slice(gi * g, (gi + 1) * g)
                isum = int(a[r, s].astype(np.int64) @ x[t, s]) if t < tokens else 0
                want[r, n] += dsc[gi * TILE + r] * dxT[gi, t] * isum + nmc[gi * TILE + r] * xsT[gi, t]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _score_tile(rows: int, width: int):
    """score_tile with rows and width compile-time constants (as the kernel's closure passes them)."""

    @nb.njit
    def call(sc, soff, sstride, q, qoff, qstride, kt, koff, kstride, hd, scale):
        score_tile(sc, soff, sstride, q, qoff, qstride, kt, koff, kstride, hd, scale, rows, width)

    return call


def _value_tile(rows: int, cols: int, width: int):
    @nb.njit
    def call(dst, doff, dstride, p, poff, pstride, v, voff, vstride, n):
        value_tile(dst, doff, dstride, p, poff, pstride, v, voff, vstride, n, rows, cols, width)

    return call


@pytest.mark.parametrize("width", [8, 16])
@pytest.mark.parametrize("rows", [2, 8])
@pytest.mark.parametrize("hd", [1, 20, 64])
def test_score_tile(width, rows, hd):
    """rows × width scores at odd offsets and strides; nothing written outside the tile."""
    kstride, qstride, sstride = width + 13, hd + 3, width + 5
    q = RNG.standard_normal(7 + rows * qstride).astype(np.float32)
    kt = RNG.standard_normal(4 + hd * kstride).astype(np.float32)
    sc = np.full(9 + rows * sstride, 7.0, np.float32)
    want = ref.score_tile(sc, 9, sstride, q, 7, qstride, kt, 4, kstride, hd, 0.3, rows, width)
    _score_tile(rows, width)(sc, 9, sstride, q, 7, qstride, kt, 4, kstride, hd, np.float32(0.3))
    np.testing.assert_allclose(sc, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [8, 16])
@pytest.mark.parametrize("rows,cols", [(2, 4), (4, 4), (3, 1)])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_value_tile(width, rows, cols, n):
    """dst += p · v over n value rows, added to what dst holds, at odd offsets and strides; nothing written outside."""
    m = cols * width
    dstride, pstride, vstride = m + 3, n + 2, m + 7
    dst = RNG.standard_normal(5 + rows * dstride).astype(np.float32)
    p = RNG.uniform(0, 1, 3 + rows * pstride).astype(np.float32)
    v = RNG.standard_normal(6 + max(n, 1) * vstride).astype(np.float32)
    want = ref.value_tile(dst, 5, dstride, p, 3, pstride, v, 6, vstride, n, rows, cols, width)
    _value_tile(rows, cols, width)(dst, 5, dstride, p, 3, pstride, v, 6, vstride, n)
    np.testing.assert_allclose(dst, want, rtol=1e-5, atol=1e-5)
