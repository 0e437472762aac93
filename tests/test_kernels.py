"""numba kernels against the numpy reference, for every registered quant type and awkward shapes."""

import numpy as np
import pytest

from lowbit.formats.qtypes import REGISTRY, QType, pack_codes
from lowbit.formats.reader import StoredTensor
from lowbit.kernels import dispatch, ref

QUANT = [q for q in REGISTRY.values() if not q.is_float]


def random_parts(qt: QType, rows: int, cols: int, rng) -> dict[str, np.ndarray]:
    g = qt.layout_group(cols)
    u = rng.integers(0, qt.max_code + 1, size=(rows, cols))
    parts = {
        "codes": pack_codes(u, qt),
        "scales": (rng.standard_normal((rows, cols // g)) * 0.05).astype(np.float16),
    }
    if qt.asym:
        parts["mins"] = (rng.standard_normal((rows, cols // g)) * 0.1).astype(np.float16)
    return parts


def shape_for(qt: QType) -> tuple[int, int]:
    return (13, 96) if qt.group_size == 0 else (13, 5 * qt.group_size)  # 5 groups: one block of four and one more


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 3, 8, 9, 40])
def test_linear_matches_reference(qt, t):
    rng = np.random.default_rng(qt.id + t)
    rows, cols = shape_for(qt)
    parts = random_parts(qt, rows, cols, rng)
    w = dispatch.Weight(StoredTensor("w", qt, (rows, cols), parts))
    x = rng.standard_normal((t, cols)).astype(np.float32)
    want = ref.matvec(parts, qt, (rows, cols), x)
    got = dispatch.linear(w, x)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
def test_embed_matches_reference(qt):
    rng = np.random.default_rng(qt.id)
    rows, cols = shape_for(qt)
    parts = random_parts(qt, rows, cols, rng)
    w = dispatch.Weight(StoredTensor("w", qt, (rows, cols), parts))
    ids = np.array([0, 5, 12, 5])
    np.testing.assert_allclose(dispatch.embed(w, ids), ref.dequantize(parts, qt, (rows, cols))[ids], rtol=1e-6)


def test_fp16_scale_decoding_covers_subnormals_and_signs():
    qt = REGISTRY["q8_g32"]
    vals = np.array([[1.0, -2.5, 6.1e-5, -3e-7, 0.0, 65504.0, 1e-3, -1e-4]], dtype=np.float16)
    rows = vals.shape[1]
    parts = {"codes": pack_codes(np.full((rows, 32), 200), qt), "scales": vals.reshape(rows, 1)}
    w = dispatch.Weight(StoredTensor("w", qt, (rows, 32), parts))
    x = np.ones((1, 32), dtype=np.float32)
    want = ref.matvec(parts, qt, (rows, 32), x)
    np.testing.assert_allclose(dispatch.linear(w, x), want, rtol=1e-6)


def test_float_weight_with_bias():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((5, 7)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    w = dispatch.Weight(StoredTensor("w", REGISTRY["f32"], (5, 7), {"data": data}), bias=b)
    x = rng.standard_normal((2, 7)).astype(np.float32)
    np.testing.assert_allclose(dispatch.linear(w, x), x @ data.T + b, rtol=1e-5)


def test_bf16_weight_decodes():
    f = np.array([[1.5, -2.0], [0.3, 7.0]], dtype=np.float32)
    bits = (f.view(np.uint32) >> 16).astype(np.uint16)
    w = dispatch.Weight(StoredTensor("w", REGISTRY["bf16"], (2, 2), {"data": bits}))
    np.testing.assert_allclose(w.f32, ref.bf16_to_f32(bits))
    assert abs(w.f32[1, 0] - 0.3) < 0.01


def test_rmsnorm_rope_silu_match_reference():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    np.testing.assert_allclose(dispatch.rmsnorm(x, w, 1e-5), ref.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    q = rng.standard_normal((5, 3, 16)).astype(np.float32)
    inv = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    pos = np.arange(7, 12)
    ang = pos[:, None].astype(np.float32) * inv[None, :]
    want = ref.rope(q, pos, inv)
    dispatch.rope_inplace(q, np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32))
    np.testing.assert_allclose(q, want, rtol=1e-4, atol=1e-5)
    g, u = x[:, :32].copy(), x[:, 32:].copy()
    np.testing.assert_allclose(dispatch.silu_mul(g, u), ref.silu(g) * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t,start", [(1, 0), (1, 9), (6, 0), (4, 5)])
def test_attention_matches_reference(t, start):
    rng = np.random.default_rng(t * 10 + start)
    nh, nkv, hd, ctx = 6, 2, 8, 16
    q = rng.standard_normal((t, nh, hd)).astype(np.float32)
    k = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    v = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    got = dispatch.attention(q, k, v, start, 1 / np.sqrt(hd))
    want = ref.attention(q * np.float32(1.0), k, v, start)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_integer_kernels_cover_every_grouped_type():
    from lowbit.kernels.cpu_quant import specialised

    for qt in QUANT:
        rows, cols = shape_for(qt)
        w = dispatch.Weight(StoredTensor("w", qt, (rows, cols), random_parts(qt, rows, cols, np.random.default_rng(0))))
        assert (w.int_kernels is not None) == (qt.group_size != 0) == specialised(qt.bits, w.g), qt.name


def test_activation_quantization_is_near_lossless():
    from lowbit.kernels.cpu_quant import quantize_activations

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 192)) * np.array([1e-3, 1.0, 50.0])[:, None]).astype(np.float32)
    x[1, 64:128] = 0.0  # an all-zero group
    xq = np.empty(x.shape, dtype=np.int16)
    dx = np.empty((3, 3), dtype=np.float32)
    xs = np.empty((3, 3), dtype=np.float32)
    quantize_activations(xq, dx, xs, x, 64)
    back = xq.reshape(3, 3, 64) * dx[:, :, None]
    np.testing.assert_allclose(back.reshape(3, 192), x, rtol=0, atol=float(np.abs(x).max()) / 32767)
    np.testing.assert_allclose(xs, x.reshape(3, 3, 64).sum(-1), rtol=1e-5, atol=1e-6)
    assert np.abs(xq).max() == 32767 and (xq[1, 64:128] == 0).all()
