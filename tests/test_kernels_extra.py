"""numba kernels added for the gemma / qwen3 / phi3 / mistral families against the numpy reference: GeGLU (tanh GELU),
logit soft-capping, windowed and soft-capped attention, per-head RMSNorm, partial RoPE."""

import numpy as np
import pytest

from lowbit.kernels import dispatch, ref

NS = np.empty((0, 0, 0), dtype=np.uint16)  # the scales of a float32 KV cache (none)


def test_gelu_tanh_mul_matches_reference():
    rng = np.random.default_rng(0)
    gate = (rng.standard_normal((5, 96)) * 3).astype(np.float32)
    up = rng.standard_normal((5, 96)).astype(np.float32)
    np.testing.assert_allclose(dispatch.gelu_tanh_mul(gate, up), ref.gelu_tanh(gate) * up, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_reference_is_torchs_tanh_gelu():
    import torch

    x = np.linspace(-8, 8, 1001, dtype=np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(ref.gelu_tanh(x), want, rtol=1e-6, atol=1e-6)


def test_softcap_matches_reference():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 200)) * 40).astype(np.float32)
    got = dispatch.softcap(x, 30.0)
    np.testing.assert_allclose(got, ref.softcap(x, 30.0), rtol=1e-6, atol=1e-5)
    assert np.abs(got).max() < 30.0 and np.abs(got).max() > 25.0  # really capped, and not flattened


@pytest.mark.parametrize("t,start", [(1, 0), (1, 3), (1, 12), (6, 0), (5, 9), (16, 0)])
@pytest.mark.parametrize("window", [0, 1, 4])
@pytest.mark.parametrize("cap", [0.0, 2.0])
def test_attention_window_softcap_matches_reference(t, start, window, cap):
    rng = np.random.default_rng(100 * t + 10 * start + window)
    nh, nkv, hd, ctx = 6, 2, 8, 24
    q = (rng.standard_normal((t, nh, hd)) * 2).astype(np.float32)
    k = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    v = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    scale = 0.3
    got = dispatch.attention(q, (k, v), start, scale, window, cap)
    want = ref.attention(q, k, v, start, scale=scale, window=window, softcap=cap)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attention_window_reference_sees_only_the_window():
    """The reference itself: with window w a query's output depends on exactly the last w keys (its own included)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 4)).astype(np.float32)
    k = rng.standard_normal((1, 10, 4)).astype(np.float32)
    v = rng.standard_normal((1, 10, 4)).astype(np.float32)
    base = ref.attention(q, k, v, 9, window=3)
    k2, v2 = k.copy(), v.copy()
    k2[:, :7], v2[:, :7] = 5.0, 5.0  # positions 0..6 are outside (9 - 3, 9]
    np.testing.assert_array_equal(ref.attention(q, k2, v2, 9, window=3), base)
    k2[:, 7] = 5.0  # position 7 is inside
    assert not np.allclose(ref.attention(q, k2, v2, 9, window=3), base)


def test_head_rmsnorm_matches_reference():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 3, 16)).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    want = np.stack([ref.rmsnorm(x[:, h], w, 1e-6) for h in range(3)], axis=1)
    np.testing.assert_allclose(dispatch.head_rmsnorm(x, w, 1e-6), want, rtol=1e-5, atol=1e-6)


def test_partial_rope_on_a_view_matches_reference():
    """Phi-style partial rotary: RoPE on the first ``rot`` dims of each head (a strided view), the rest untouched."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 16)).astype(np.float32)
    rot = 8
    inv = (1.0 / 10000 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)
    pos = np.arange(5, 9)
    ang = pos[:, None].astype(np.float32) * inv[None, :]
    want = x.copy()
    want[..., :rot] = ref.rope(x[..., :rot], pos, inv)
    dispatch.rope_inplace(x[:, :, :rot], np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32))
    np.testing.assert_allclose(x, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hd", [8, 64])
@pytest.mark.parametrize("t,start,window,cap", [(16, 0, 0, 0.0), (20, 7, 0, 0.0), (17, 3, 5, 0.0), (24, 0, 4, 2.0)])
def test_prompt_attention_matches_reference(t, start, window, cap, hd):
    rng = np.random.default_rng(t + start + hd)
    nh, nkv, ctx = 6, 2, 48
    q = (rng.standard_normal((t, nh, hd)) * 2).astype(np.float32)
    k = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    v = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    got = dispatch.attention(q, (k, v), start, 0.3, window, cap)
    want = ref.attention(q, k, v, start, scale=0.3, window=window, softcap=cap)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("start,window,cap,chunk", [(0, 0, 0.0, 4), (37, 0, 0.0, 8), (37, 0, 2.0, 5), (50, 9, 0.0, 4)])
def test_split_decode_attention_matches_reference(start, window, cap, chunk):
    from lowbit.kernels import cpu_attention

    rng = np.random.default_rng(start + chunk)
    nh, nkv, hd, ctx = 6, 2, 8, 64
    q = (rng.standard_normal((1, nh, hd)) * 2).astype(np.float32)
    k = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    v = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    got = np.empty_like(q)
    cpu_attention.attention_decode(got, q, k, NS, v, NS, start, np.float32(0.3), window, np.float32(cap), chunk)
    want = ref.attention(q, k, v, start, scale=0.3, window=window, softcap=cap)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hd", [8, 20, 64])
@pytest.mark.parametrize("t,start,chunk", [(1, 70, 19), (1, 70, 128), (1, 5, 128), (3, 17, 0)])
def test_attention_head_dims_and_key_blocks_match_reference(hd, t, start, chunk):
    """Keys and values go eight at a time through the SIMD intrinsics when the head dim is a multiple of 8 (64),
    one by one otherwise (20); chunk/position counts that are not multiples of 8 leave a tail each way."""
    from lowbit.kernels import cpu_attention

    rng = np.random.default_rng(hd + start + chunk)
    nh, nkv, ctx = 6, 2, 80
    q = (rng.standard_normal((t, nh, hd)) * 2).astype(np.float32)
    k = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    v = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    for cap in (0.0, 3.0):
        want = ref.attention(q, k, v, start, scale=0.3, window=0, softcap=cap)
        got = np.empty_like(q)
        if chunk:
            cpu_attention.attention_decode(got, q, k, NS, v, NS, start, np.float32(0.3), 0, np.float32(cap), chunk)
        else:
            cpu_attention.attention(got, q, k, NS, v, NS, start, np.float32(0.3), 0, np.float32(cap))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # a strided query (a view of a wider buffer) gives the same result through dispatch
    wide = np.zeros((t, nh, hd + 4), dtype=np.float32)
    wide[:, :, :hd] = q
    np.testing.assert_allclose(dispatch.attention(wide[:, :, :hd], (k, v), start, 0.3), ref.attention(q, k, v, start,
                               scale=0.3), rtol=1e-4, atol=1e-5)
