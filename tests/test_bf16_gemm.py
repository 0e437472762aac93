"""The bfloat16 prompt GEMM (kernels/ir/gemm_bf16.py, kernels/cpu_half.py's bf16_kernels): the tile intrinsic against
its numpy twin, the product against numpy on awkward shapes, a token's numbers independent of the prompt it is in,
the activations' rounding, and ``--exact-activations`` taking the float32 path back."""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest

from lowbit.formats.qtypes import REGISTRY
from lowbit.formats.reader import StoredTensor
from lowbit.kernels import cpu_half, dispatch, ref
from lowbit.kernels import ref_intrinsics as twin
from lowbit.kernels.ir.gemm_bf16 import host_has_bf16_dot, tile_bf16

needs_bf16 = pytest.mark.skipif(not host_has_bf16_dot(), reason="needs AVX512-BF16")
RNG = np.random.default_rng(11)


_bits = ref.f32_to_bf16  # the numpy reference of the kernel's rounding


def _weight(rows: int, cols: int, seed: int) -> tuple[dispatch.Weight, np.ndarray]:
    f = (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.5).astype(np.float32)
    data = (f.view(np.uint32) >> 16).astype(np.uint16)
    return dispatch.Weight(StoredTensor("w", REGISTRY["bf16"], (rows, cols), {"data": data})), ref.bf16_to_f32(data)


def test_rounding_to_bfloat16_pairs():
    """Round to nearest, ties to even (halfway cases both ways, a carry into the exponent), pairs low-first, the
    token count padded with zero rows to a whole tile."""
    x = np.array([[1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, 1.9999999, 3e-39, 0.0, -0.0]], dtype=np.float32)
    xb = cpu_half.round_pairs(x)
    assert xb.shape == (cpu_half.BF16_TOKENS, 4) and not xb[1:].any()
    got = np.stack([xb[0] & 0xFFFF, xb[0] >> 16], axis=1).reshape(-1).astype(np.uint16)
    np.testing.assert_array_equal(got, _bits(x[0]))
    assert got[1] == 0x3F80 and got[2] == 0x3F82  # 1 + 2^-8 ties down to 1.0 (even), 1 + 3·2^-8 up
    wide = RNG.standard_normal((13, 70)).astype(np.float32) * 10.0 ** RNG.integers(-30, 30, (13, 70))
    xb = cpu_half.round_pairs(wide)
    got = np.stack([xb[:13] & 0xFFFF, xb[:13] >> 16], axis=2).reshape(13, 70).astype(np.uint16)
    np.testing.assert_array_equal(got, _bits(wide))


@needs_bf16
@pytest.mark.parametrize("R,T", [(16, 1), (32, 8), (32, 5), (48, 3), (64, 6), (16, 12)])
def test_tile_matches_its_twin(R, T):
    kp = 37
    wb = RNG.integers(0, 1 << 32, kp * R, dtype=np.uint64).astype(np.uint32) & np.uint32(0xBFFFBFFF)  # |v| < 4
    xb = RNG.integers(0, 1 << 32, (T + 3, kp), dtype=np.uint64).astype(np.uint32) & np.uint32(0xBFFFBFFF)

    @nb.njit
    def run(yt, wb, xb, t0):
        tile_bf16(yt, wb, xb, t0, R, T)

    yt = np.full((T, R), np.nan, dtype=np.float32)
    run(yt, wb, xb, 2)
    want = twin.tile_bf16(wb, xb, 2, R, T)
    np.testing.assert_allclose(yt, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_bf16
@pytest.mark.parametrize("rows,cols,t", [(45, 576, 13), (32, 128, 8), (7, 34, 1), (96, 2048, 40), (200, 64, 17)])
def test_product_matches_numpy_on_rounded_activations(rows, cols, t):
    w, dense = _weight(rows, cols, seed=rows + t)
    assert w.bf16_dot
    x = RNG.standard_normal((t, cols)).astype(np.float32)
    got = dispatch.linear(w, x, prompt=True)
    xr = ref.bf16_to_f32(_bits(x))
    want = xr.astype(np.float64) @ dense.T.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())
    exact = x.astype(np.float64) @ dense.T.astype(np.float64)  # the rounding's cost: ~2^-9 relative per element
    assert np.abs(got - exact).max() < 2e-2 * np.abs(exact).max()


@needs_bf16
@pytest.mark.parametrize("rows,cols", [(45, 576), (4, 32), (7, 34), (130, 2048), (9, 94)])
def test_decode_products_match_numpy_and_each_lone_token(rows, cols):
    """One token (rows four at a time, a masked last chunk where cols/2 is not a multiple of 16) and a few tokens
    (each its lone numbers, bit for bit) on the pair dot product."""
    w, dense = _weight(rows, cols, seed=rows * cols)
    x = RNG.standard_normal((5, cols)).astype(np.float32)
    few = dispatch.linear(w, x)
    want = ref.bf16_to_f32(_bits(x)).astype(np.float64) @ dense.T.astype(np.float64)
    np.testing.assert_allclose(few, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())
    for t in range(5):
        np.testing.assert_array_equal(dispatch.linear(w, x[t : t + 1])[0], few[t])


@needs_bf16
def test_a_token_gets_the_same_numbers_in_any_prompt():
    """Rows of a prompt product do not depend on T or on the tile a token falls in (a chat continued from the cache
    equals a fresh prefill): each token alone, and the prompt cut in two, give the whole prompt's numbers bit for
    bit."""
    w, _ = _weight(70, 576, seed=5)
    x = RNG.standard_normal((21, 576)).astype(np.float32)
    whole = dispatch.linear(w, x, prompt=True)
    for t in (0, 7, 8, 20):
        np.testing.assert_array_equal(dispatch.linear(w, x[t : t + 1], prompt=True)[0], whole[t])
    cut = np.concatenate([dispatch.linear(w, x[:11], prompt=True), dispatch.linear(w, x[11:], prompt=True)])
    np.testing.assert_array_equal(cut, whole)


@needs_bf16
def test_exact_activations_take_the_float32_path():
    w, dense = _weight(40, 256, seed=9)
    x = RNG.standard_normal((12, 256)).astype(np.float32)
    rounded = dispatch.linear(w, x, prompt=True)
    dispatch.exact_activations(w)
    assert not w.bf16_dot
    exact = dispatch.linear(w, x, prompt=True)
    want = x.astype(np.float64) @ dense.T.astype(np.float64)
    np.testing.assert_allclose(exact, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert np.abs(exact - want).max() < np.abs(rounded - want).max()


def test_off_where_it_cannot_run():
    """float16 weights, odd row lengths and CPUs without AVX512-BF16 keep the float32 tiles."""
    f16 = dispatch.Weight(StoredTensor("w", REGISTRY["f16"], (8, 64), {"data": np.ones((8, 64), np.float16)}))
    odd, _ = _weight(8, 63, seed=1)
    assert not f16.bf16_dot and not odd.bf16_dot
    even, _ = _weight(8, 64, seed=1)
    assert even.bf16_dot == host_has_bf16_dot()
