"""AWQ (convert/awq.py): scale search, clipping search, and the exactness of every fold in float arithmetic."""

from functools import partial

import numpy as np
import pytest

from lowbit.convert.awq import (
    awq_clip,
    awq_scales,
    fold_into_norm,
    fold_into_rows,
    fold_v_into_o,
    scale_columns,
    tie_gqa,
)
from lowbit.convert.quantize import quantize
from lowbit.errors import LowbitError
from lowbit.formats.qtypes import get_qtype
from lowbit.kernels.ref import attention, dequantize, rmsnorm, silu

ROWS, COLS, N = 256, 512, 1024


def activations(rng: np.random.Generator, n: int, ch: np.ndarray) -> np.ndarray:
    return (rng.standard_normal((n, len(ch))) * ch).astype(np.float32)


def outlier_layer(seed: int):
    """A random layer whose inputs have LLM-like channel magnitudes: log-normal spread plus 8 channels 30x larger.
    Returns (w, calibration x, held-out x from the same distribution)."""
    rng = np.random.default_rng(seed)
    ch = np.exp(rng.normal(0.0, 0.5, COLS))
    ch[rng.choice(COLS, 8, replace=False)] *= 30.0
    w = (rng.standard_normal((ROWS, COLS)) * 0.02).astype(np.float32)
    return w, activations(rng, N, ch), activations(rng, N, ch)


def out_err(w: np.ndarray, x: np.ndarray, w_hat: np.ndarray) -> float:
    """||x W^T - x W_hat^T||^2 in float64."""
    y = x.astype(np.float64) @ (w.astype(np.float64) - w_hat.astype(np.float64)).T
    return float(np.sum(y * y))


def roundtrip(w: np.ndarray, qt, method: str = "search") -> np.ndarray:
    return dequantize(quantize(w, qt, method), qt, w.shape)


def awq_roundtrip(w: np.ndarray, x: np.ndarray, qt) -> tuple[np.ndarray, float]:
    """The full AWQ path: scales, scaled weight, clipping on the scaled input, search quantization; returns the
    effective float weight Q(clip(W s)) / s and alpha."""
    s, alpha, _ = awq_scales([w], x, qt)
    ws = scale_columns(w, s)
    wc = awq_clip(ws, x / s, qt)
    return roundtrip(wc, qt) / s, alpha


# ------------------------------------------------------------------------------------------------ quality


# measured (seed 0): AWQ+clip / RTN = 0.12 (q4a_g128), 0.20 (q4_g128), 0.17 (q3_g64); / search = 0.13, 0.22, 0.19;
# held-out inputs within 1-2% of those. Asserted margins leave >2x headroom.
@pytest.mark.parametrize("name", ["q4a_g128", "q4_g128", "q3_g64"])
def test_awq_beats_rtn_and_search_with_outlier_channels(name):
    qt = get_qtype(name)
    w, x, x_held = outlier_layer(0)
    w_awq, alpha = awq_roundtrip(w, x, qt)
    w_rtn, w_search = roundtrip(w, qt, "rtn"), roundtrip(w, qt, "search")
    awq, rtn, search = out_err(w, x, w_awq), out_err(w, x, w_rtn), out_err(w, x, w_search)
    assert 0 < alpha < 1
    assert awq < 0.5 * rtn, (awq / rtn, alpha)
    assert awq < 0.5 * search, (awq / search, alpha)
    # not overfitted to the calibration rows
    assert out_err(w, x_held, w_awq) < 0.5 * out_err(w, x_held, w_search)


def test_awq_no_worse_than_unscaled_on_isotropic_inputs():
    rng = np.random.default_rng(1)
    qt = get_qtype("q4a_g64")
    w = (rng.standard_normal((128, 256)) * 0.02).astype(np.float32)
    x = rng.standard_normal((512, 256)).astype(np.float32)
    for quantizer in (None, partial(quantize, method="rtn")):
        s, alpha, info = awq_scales([w, 2 * w[:64]], x, qt, quantizer=quantizer)
        q = quantizer or partial(quantize, method="search")
        unscaled = sum(out_err(m, x, dequantize(q(m, qt), qt, m.shape)) for m in (w, 2 * w[:64]))
        scaled = sum(out_err(m, x, dequantize(q(m * s, qt), qt, m.shape) / s) for m in (w, 2 * w[:64]))
        assert scaled <= unscaled * (1 + 1e-6)
        assert info["error"] == min(info["errors"]) and info["errors"][0] == info["error_unscaled"]
        assert info["alphas"][0] == 0.0 and len(info["alphas"]) == 20 and s.dtype == np.float32
        assert np.isclose(info["error_unscaled"], unscaled, rtol=1e-4)


def test_alpha_zero_kept_when_any_scaling_hurts():
    """Weights exactly on the 4-bit grid quantize with zero error at s = 1; every other scale loses that."""
    rng = np.random.default_rng(2)
    qt = get_qtype("q4_g32")
    codes = rng.integers(-8, 8, size=(16, 64))
    codes[:, ::32] = -8  # each group's extreme is -8 * d, so RTN's scale is exactly d
    w = (codes * 2.0**-6).astype(np.float32)
    x = activations(rng, 256, np.geomspace(0.1, 10.0, 64))
    s, alpha, info = awq_scales([w], x, qt)
    assert alpha == 0.0 and np.all(s == 1.0)
    assert info["error"] == 0.0 and min(info["errors"][1:]) > 0.0


def test_clip_never_increases_error():
    rng = np.random.default_rng(3)
    w = (rng.standard_t(4, (96, 256)) * 0.02).astype(np.float32)
    x = rng.standard_normal((300, 256)).astype(np.float32)
    for name in ("q4a_g128", "q3_g64", "q2a_g32"):
        qt = get_qtype(name)
        for quantizer in (None, partial(quantize, method="rtn")):
            wc = awq_clip(w, x, qt, quantizer=quantizer)
            q = quantizer or partial(quantize, method="search")
            assert wc.shape == w.shape and wc.dtype == np.float32
            before = out_err(w, x, dequantize(q(w, qt), qt, w.shape))
            after = out_err(w, x, dequantize(q(wc, qt), qt, w.shape))
            assert after <= before * (1 + 1e-6), (name, after / before)
            # clipping only moves values toward the group's centre: its midpoint (asym) or zero (sym)
            g = qt.group_size
            wg, cg = w.reshape(-1, g), wc.reshape(-1, g)
            c = (wg.max(axis=1, keepdims=True) + wg.min(axis=1, keepdims=True)) / 2 if qt.asym else 0.0
            assert np.all(np.abs(cg - c) <= np.abs(wg - c) + 1e-7)
            assert not np.array_equal(wc, w)  # and here it does clip something


def test_subsampling_and_gqa_tie():
    rng = np.random.default_rng(4)
    qt = get_qtype("q4a_g32")
    w = (rng.standard_normal((32, 64)) * 0.02).astype(np.float32)
    x = activations(rng, 5000, np.geomspace(0.1, 10.0, 64))
    tie = partial(tie_gqa, n_heads=4, n_kv_heads=2, head_dim=16)
    s, alpha, info = awq_scales([w], x, qt, max_rows=700, grid=5, tie=tie)
    assert info["rows"] == 700 and len(info["errors"]) == 5
    per_head = s.reshape(2, 2, 16)
    np.testing.assert_array_equal(per_head[:, 0], per_head[:, 1])  # one scale per kv channel
    fold = fold_v_into_o(rng.standard_normal((32, 8)).astype(np.float32), s, 4, 2, 16)
    np.testing.assert_allclose(fold.o_scale, s, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ folding


def rel_close(a: np.ndarray, b: np.ndarray, tol: float = 1e-5) -> None:
    assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(b)), np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fold_into_norm_is_exact(offset):
    rng = np.random.default_rng(5)
    d, rows = 64, 48
    x = rng.standard_normal((10, d)).astype(np.float32) * 3
    norm_w = (rng.standard_normal(d) * 0.3 + (0.0 if offset else 1.0)).astype(np.float32)
    wq, wk = (rng.standard_normal((rows, d)).astype(np.float32) for _ in range(2))
    s = np.exp(rng.normal(0, 1, d)).astype(np.float32)
    h = rmsnorm(x, np.float32(offset) + norm_w, 1e-6)
    h2 = rmsnorm(x, np.float32(offset) + fold_into_norm(norm_w, s, offset=offset), 1e-6)
    for w in (wq, wk):
        rel_close(h2 @ scale_columns(w, s).T, h @ w.T)


def test_fold_up_into_down_is_exact():
    rng = np.random.default_rng(6)
    d, inter = 32, 96
    h = rng.standard_normal((7, d)).astype(np.float32)
    gate, up = (rng.standard_normal((inter, d)).astype(np.float32) * 0.3 for _ in range(2))
    down = rng.standard_normal((d, inter)).astype(np.float32) * 0.1
    up_b = rng.standard_normal(inter).astype(np.float32)
    s = np.exp(rng.normal(0, 1, inter)).astype(np.float32)

    def mlp(up, up_b, down):
        return (silu(h @ gate.T) * (h @ up.T + up_b)) @ down.T

    up2, up_b2 = fold_into_rows(up, s, up_b)
    rel_close(mlp(up2, up_b2, scale_columns(down, s)), mlp(up, up_b, down))
    assert fold_into_rows(up, s)[1] is None


@pytest.mark.parametrize("tied", [False, True])
def test_fold_v_into_o_through_gqa_attention(tied):
    rng = np.random.default_rng(7)
    t, d, nh, nkv, hd = 9, 48, 4, 2, 16
    h = rng.standard_normal((t, d)).astype(np.float32)
    wq = rng.standard_normal((nh * hd, d)).astype(np.float32) * 0.3
    wk = rng.standard_normal((nkv * hd, d)).astype(np.float32) * 0.3
    wv = rng.standard_normal((nkv * hd, d)).astype(np.float32) * 0.3
    bv = rng.standard_normal(nkv * hd).astype(np.float32)
    wo = rng.standard_normal((d, nh * hd)).astype(np.float32) * 0.2
    s = np.exp(rng.normal(0, 1, nh * hd)).astype(np.float32)
    if tied:
        s = tie_gqa(s, nh, nkv, hd)

    def attn_block(wv, bv, wo):
        q = (h @ wq.T).reshape(t, nh, hd)
        k = (h @ wk.T).reshape(t, nkv, hd).transpose(1, 0, 2)
        v = (h @ wv.T + bv).reshape(t, nkv, hd).transpose(1, 0, 2)
        return attention(q, k, v, 0).reshape(t, nh * hd) @ wo.T

    fold = fold_v_into_o(wv, s, nh, nkv, hd, v_bias=bv)
    assert fold.kv_scale.shape == (nkv * hd,) and fold.o_scale.shape == (nh * hd,)
    rel_close(attn_block(fold.v_weight, fold.v_bias, scale_columns(wo, fold.o_scale)), attn_block(wv, bv, wo))
    if tied:
        np.testing.assert_allclose(fold.o_scale, s, rtol=1e-6)
    # the kv scale is the geometric mean over the query heads of each group
    np.testing.assert_allclose(fold.kv_scale, np.exp(np.log(s).reshape(nkv, 2, hd).mean(axis=1)).ravel(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_raise_with_messages():
    rng = np.random.default_rng(8)
    qt = get_qtype("q4a_g32")
    w = rng.standard_normal((8, 64)).astype(np.float32)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    nan_x = x.copy()
    nan_x[3, 5] = np.nan
    cases = [
        (lambda: awq_scales([w], x[:, :32], qt), "columns but the activations have 32"),
        (lambda: awq_scales([w], nan_x, qt), "NaN or infinite"),
        (lambda: awq_scales([w], x[:0], qt), "empty"),
        (lambda: awq_scales([], x, qt), "non-empty list"),
        (lambda: awq_scales(w, x, qt), "non-empty list"),
        (lambda: awq_scales([w], x, get_qtype("f16")), "float type"),
        (lambda: awq_scales([w], x, qt, grid=0), "grid must be a positive integer"),
        (lambda: awq_scales([w[:, :48]], x[:, :48], qt), "not a multiple of the group size"),
        (lambda: awq_clip(w, x[:, :32], qt), "columns but the activations have 32"),
        (lambda: awq_clip(w, np.full_like(x, np.inf), qt), "NaN or infinite"),
        (lambda: awq_clip(w, x, qt, max_shrink=1.5), "max_shrink"),
        (lambda: scale_columns(w, np.ones(63)), "vector of 64 scales"),
        (lambda: scale_columns(w, -np.ones(64)), "finite and positive"),
        (lambda: fold_into_norm(np.ones((2, 64)), np.ones(64)), "must be a vector"),
        (lambda: fold_into_rows(w, np.ones(8), np.ones(3)), "bias must have shape"),
        (lambda: fold_v_into_o(w, np.ones(64), 4, 3, 16), "not a multiple of n_kv_heads"),
        (lambda: fold_v_into_o(w, np.ones(64), 4, 2, 16), "v_proj has 8 rows"),
        (lambda: fold_v_into_o(w, np.ones(60), 4, 2, 16), "o_proj has 60 input channels"),
    ]
    for call, needle in cases:
        with pytest.raises(LowbitError, match=needle):
            call()
