"""Low-rank correction of the quantization error: Eckart–Young optimality of the (activation-scaled) truncated SVD,
the randomized SVD for big tensors, and the greedy rank allocation under a bit budget. (The runtime side — dispatch
and a converted model with lr_a/lr_b tensors — is tested in test_hadamard.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.convert import lowrank
from lowbit.convert.quantize import quantize
from lowbit.errors import LowbitError
from lowbit.formats.qtypes import get_qtype
from lowbit.kernels import ref


def quantized_pair(rows, cols, seed=0, qname="q3a_g32"):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    qt = get_qtype(qname)
    return w, ref.dequantize(quantize(w, qt, "rtn"), qt, (rows, cols))


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_correction_is_the_truncated_svd(scaled, rank):
    """‖(E − BA)·diag(a)‖² equals the tail Σ_{i>r} σ_i² of E·diag(a)'s spectrum (Eckart–Young), up to float16."""
    w, w_hat = quantized_pair(48, 96, seed=rank)
    rng = np.random.default_rng(1)
    act = np.exp(rng.standard_normal(96) * 1.5).astype(np.float32) if scaled else None
    a, b = lowrank.lowrank_correction(w, w_hat, rank=rank, act_scale=act)
    assert a.dtype == b.dtype == np.float16 and a.shape == (rank, 96) and b.shape == (48, rank)
    d = np.ones(96) if act is None else act.astype(np.float64)
    e = (w.astype(np.float64) - w_hat) * d
    sv = np.linalg.svd(e, compute_uv=False)
    np.testing.assert_allclose(lowrank.error_spectrum(w, w_hat, act_scale=act), sv, rtol=1e-5)
    before = np.linalg.norm(e)
    after = np.linalg.norm((w - w_hat - b.astype(np.float64) @ a.astype(np.float64)) * d)
    tail = np.sqrt((sv[rank:] ** 2).sum())
    assert after < before
    assert abs(after - tail) <= 2e-3 * before  # float16 factors: ~1e-3 relative rounding of the removed part
    # the activation-weighted fit beats the unweighted one in the weighted norm
    if scaled:
        a0, b0 = lowrank.lowrank_correction(w, w_hat, rank=rank)
        plain = np.linalg.norm((w - w_hat - b0.astype(np.float64) @ a0.astype(np.float64)) * d)
        assert after < plain


def test_full_rank_correction_is_exact():
    w, w_hat = quantized_pair(20, 32)
    a, b = lowrank.lowrank_correction(w, w_hat, rank=20, act_scale=np.linspace(0.5, 2, 32))
    err = w - w_hat
    np.testing.assert_allclose(b.astype(np.float32) @ a.astype(np.float32), err, atol=2e-3 * np.abs(err).max())


def test_randomized_svd_matches_exact_on_decaying_spectrum():
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    v, _ = np.linalg.qr(rng.standard_normal((400, 300)))
    s = 0.8 ** np.arange(300)
    m = (u * s) @ v.T
    uk, sk, vtk = lowrank.top_svd(m, 12, exact=False)
    np.testing.assert_allclose(sk, s[:12], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(m - (uk * sk) @ vtk), np.sqrt((s[12:] ** 2).sum()), rtol=1e-4)


def test_tiny_activation_scales_are_floored():
    w, w_hat = quantized_pair(16, 64, seed=2)
    act = np.ones(64, dtype=np.float32)
    act[5] = 0.0  # a dead channel must not blow up A (divided by the scale) beyond float16
    a, b = lowrank.lowrank_correction(w, w_hat, rank=4, act_scale=act)
    assert np.isfinite(a).all() and np.isfinite(b).all()


def test_bad_inputs_raise():
    w, w_hat = quantized_pair(16, 64)
    with pytest.raises(LowbitError, match="rank must be in 1..16"):
        lowrank.lowrank_correction(w, w_hat, rank=0)
    with pytest.raises(LowbitError, match="rank must be in"):
        lowrank.lowrank_correction(w, w_hat, rank=17)
    with pytest.raises(LowbitError, match="one shape"):
        lowrank.lowrank_correction(w, w_hat[:, :32], rank=2)
    with pytest.raises(LowbitError, match="act_scale has shape"):
        lowrank.lowrank_correction(w, w_hat, rank=2, act_scale=np.ones(32))
    with pytest.raises(LowbitError, match="non-negative"):
        lowrank.lowrank_correction(w, w_hat, rank=2, act_scale=-np.ones(64))
    with pytest.raises(LowbitError, match="no shape"):
        lowrank.choose_ranks({"a": np.ones(3)}, 1e6, {})


def test_rank_for_budget():
    assert lowrank.rank_cost_bits((64, 96)) == 16 * 160
    assert lowrank.rank_for_budget((64, 96), 0.0) == 0
    assert lowrank.rank_for_budget((64, 96), 1.0) == (64 * 96) // (16 * 160)  # 2
    assert lowrank.rank_for_budget((64, 96), 1000.0) == 64


def test_choose_ranks_is_greedy_per_bit_and_respects_the_budget():
    shapes = {"a": (10, 10), "b": (30, 30), "c": (10, 10)}  # rank-1 costs 320, 960, 320 bits
    spectra = {"a": [4.0, 1.0, 0.5], "b": [10.0, 9.0, 1.0], "c": [0.0, 0.0]}
    # error removed per bit: a1 16/320=.05, b1 100/960=.104, b2 81/960=.084, a2 1/320=.0031, b3 .00104, a3 .00078
    assert lowrank.choose_ranks(spectra, 960, shapes) == {"a": 0, "b": 1, "c": 0}
    assert lowrank.choose_ranks(spectra, 960 + 319, shapes) == {"a": 0, "b": 1, "c": 0}
    assert lowrank.choose_ranks(spectra, 960 + 320, shapes) == {"a": 1, "b": 1, "c": 0}
    assert lowrank.choose_ranks(spectra, 2 * 960 + 320, shapes) == {"a": 1, "b": 2, "c": 0}
    # with 500 bits left, b's third rank (960) does not fit but a's third (320, worth less per bit) still does
    assert lowrank.choose_ranks(spectra, 2 * 960 + 2 * 320 + 500, shapes) == {"a": 3, "b": 2, "c": 0}
    assert lowrank.choose_ranks(spectra, 2 * 960 + 2 * 320 + 100, shapes) == {"a": 2, "b": 2, "c": 0}
    assert lowrank.choose_ranks(spectra, 1e9, shapes) == {"a": 3, "b": 3, "c": 0}
    assert lowrank.choose_ranks(spectra, 1e9, shapes, max_rank=1) == {"a": 1, "b": 1, "c": 0}
    assert lowrank.choose_ranks(spectra, 0, shapes) == {"a": 0, "b": 0, "c": 0}


def test_choose_ranks_on_real_errors_within_budget():
    rng = np.random.default_rng(4)
    spectra, shapes, pairs = {}, {}, {}
    for i, (r, c) in enumerate([(32, 64), (64, 96), (96, 32)]):
        w, w_hat = quantized_pair(r, c, seed=i, qname=("q2a_g32", "q3a_g32", "q4a_g32")[i])
        act = np.exp(rng.standard_normal(c)).astype(np.float32)
        name = f"t{i}"
        spectra[name] = lowrank.error_spectrum(w, w_hat, act_scale=act, max_rank=16)
        shapes[name] = (r, c)
        pairs[name] = (w, w_hat, act)
    budget = 0.5 * sum(r * c for r, c in shapes.values())  # half a bit per weight
    ranks = lowrank.choose_ranks(spectra, budget, shapes)
    spent = sum(k * lowrank.rank_cost_bits(shapes[n]) for n, k in ranks.items())
    assert 0 < spent <= budget
    assert budget - spent < max(lowrank.rank_cost_bits(s) for s in shapes.values())  # nothing else would fit
    assert ranks["t0"] >= ranks["t2"]  # the 2-bit tensor's error is larger than the 4-bit one's
    # the chosen ranks' removed error matches the spectra
    for n, k in ranks.items():
        if k:
            w, w_hat, act = pairs[n]
            a, b = lowrank.lowrank_correction(w, w_hat, rank=k, act_scale=act)
            after = np.linalg.norm((w - w_hat - b.astype(np.float32) @ a.astype(np.float32)) * act)
            before = np.linalg.norm((w - w_hat) * act)
            removed = np.sqrt((spectra[n][:k] ** 2).sum())
            np.testing.assert_allclose(before**2 - after**2, removed**2, rtol=1e-2)
