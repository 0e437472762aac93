"""Quantizers (RTN and the weighted least-squares search) for every registered quant type and awkward shapes."""

import numpy as np
import pytest

from lowbit.convert.quantize import element_weights, quantize, quantize_rtn, quantize_search
from lowbit.errors import FormatError, LowbitError
from lowbit.formats.qtypes import REGISTRY, QType, get_qtype, unpack_codes
from lowbit.kernels.ref import dequantize

QUANT = [q for q in REGISTRY.values() if not q.is_float]
GROUPWISE = [q for q in QUANT if not q.per_tensor]  # per-group promises; per-tensor types have their own tests
PER_TENSOR = [q for q in QUANT if q.per_tensor]
ROWS = (3, 17)


def shape_for(qt: QType, rows: int) -> tuple[int, int]:
    return (rows, 96) if qt.group_size <= 0 else (rows, 2 * qt.group_size)  # per-channel, per-tensor


def make(kind: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        w = rng.standard_normal(shape) * 0.02
    elif kind == "student":
        w = rng.standard_t(3, shape) * 0.02  # heavy tails: a few outliers per group
    elif kind == "shifted":
        w = rng.standard_normal(shape) * 0.02 + 0.05
    else:
        raise ValueError(kind)
    return w.astype(np.float32)


def groups(a: np.ndarray, qt: QType) -> np.ndarray:
    return a.reshape(-1, qt.layout_group(a.shape[1]))


def group_errors(w: np.ndarray, parts: dict, qt: QType, importance: np.ndarray | None = None) -> np.ndarray:
    """Weighted squared error per group, with the weights the search minimises."""
    x = groups(w, qt)
    wt = element_weights(x, None if importance is None else groups(np.broadcast_to(importance, w.shape), qt))
    e = groups(dequantize(parts, qt, w.shape), qt) - x
    return (wt * e * e).sum(axis=1, dtype=np.float64)


def rel_rms(w: np.ndarray, parts: dict, qt: QType) -> float:
    e = dequantize(parts, qt, w.shape) - w
    return float(np.sqrt(np.mean(e.astype(np.float64) ** 2) / np.mean(w.astype(np.float64) ** 2)))


def check_parts(parts: dict, qt: QType, shape: tuple[int, int]) -> None:
    want = qt.part_shapes(shape)
    assert set(parts) == set(want)
    for name, (pshape, dt) in want.items():
        assert parts[name].shape == pshape, name
        assert parts[name].dtype == np.dtype(dt), name
    assert np.isfinite(parts["scales"]).all()
    if qt.asym:
        assert np.isfinite(parts["mins"]).all()
    u = unpack_codes(parts["codes"], qt, shape[1])
    assert u.min() >= 0 and u.max() <= qt.max_code


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", ROWS)
def test_rtn_round_trip_half_step(qt, rows):
    shape = shape_for(qt, rows)
    w = make("student", shape, qt.id + rows)
    parts = quantize_rtn(w, qt)
    check_parts(parts, qt, shape)
    x = groups(w, qt)
    err = np.abs(groups(dequantize(parts, qt, shape), qt) - x)
    d = parts["scales"].astype(np.float32).reshape(-1, 1)
    m = parts["mins"].astype(np.float32).reshape(-1, 1) if qt.asym else d * qt.zero_point
    lo, hi = np.minimum(-m, qt.max_code * d - m), np.maximum(-m, qt.max_code * d - m)  # the grid's ends
    outside = np.maximum(np.maximum(lo - x, x - hi), 0)  # symmetric grids cannot reach -max on the other side
    amax = np.abs(x).max(axis=1, keepdims=True)
    # half a step inside the grid, plus float16 rounding of d (and m) where extreme values meet the end codes
    assert (err <= np.maximum(0.5 * np.abs(d), outside) * (1 + 1e-5) + amax * 2.0**-9).all()
    assert (outside <= np.abs(d) * (1 + 1e-5) + amax * 2.0**-9).all()  # the largest magnitude is on the grid


@pytest.mark.parametrize("qt", GROUPWISE, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kind", ["gauss", "student"])
@pytest.mark.parametrize("use_importance", [False, True], ids=["plain", "importance"])
def test_search_never_worse_than_rtn(qt, rows, kind, use_importance):
    shape = shape_for(qt, rows)
    w = make(kind, shape, 7 * qt.id + rows)
    imp = None
    if use_importance:
        rng = np.random.default_rng(qt.id)
        imp = (rng.gamma(0.5, 1.0, shape[1]) * (rng.random(shape[1]) > 0.1)).astype(np.float32)  # some dead channels
    parts = quantize_search(w, qt, importance=imp)
    check_parts(parts, qt, shape)
    e_search = group_errors(w, parts, qt, imp)
    e_rtn = group_errors(w, quantize_rtn(w, qt), qt, imp)
    # per group, not just in total: the RTN encoding is one of the search's candidates, scored after fp16 rounding
    assert (e_search <= e_rtn * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("name", ["q3_g32", "q4a_g64", "q8a_g32"])
def test_dead_channels_fall_back_to_rtn(name):
    qt = get_qtype(name)
    w = make("gauss", (6, 128), 4)
    g = qt.layout_group(128)
    imp = np.ones(128, np.float32)
    imp[:g] = 0.0  # the first group of every row sees no activation: any encoding is as good, RTN is kept
    got, rtn = quantize_search(w, qt, importance=imp), quantize_rtn(w, qt)
    check_parts(got, qt, w.shape)
    np.testing.assert_array_equal(got["scales"][:, 0], rtn["scales"][:, 0])
    all_zero = quantize_search(w, qt, importance=np.zeros(128, np.float32))  # no information: plain weights
    np.testing.assert_array_equal(all_zero["codes"], quantize_search(w, qt)["codes"])


@pytest.mark.parametrize("name", ["q2_g64", "q2a_g64", "q3_g32", "q3a_g128", "q4_g64", "q4a_g64", "q4a_pc"])
def test_search_improves_on_rtn(name):
    qt = get_qtype(name)
    w = make("gauss", (64, 512), 3)
    e_search = group_errors(w, quantize_search(w, qt), qt).sum()
    e_rtn = group_errors(w, quantize_rtn(w, qt), qt).sum()
    assert e_search < 0.97 * e_rtn
    assert rel_rms(w, quantize_search(w, qt), qt) < rel_rms(w, quantize_rtn(w, qt), qt)


@pytest.mark.parametrize("qt", GROUPWISE, ids=lambda q: q.name)
@pytest.mark.parametrize("method", ["rtn", "search"])
def test_zero_and_constant_rows(qt, method):
    shape = shape_for(qt, 5)
    g = qt.layout_group(shape[1])
    w = make("gauss", shape, qt.id)
    w[0] = 0.0
    w[1] = 0.0375
    w[2] = -1.7
    w[3, :g] = 0.0  # one all-zero group next to a normal one
    parts = quantize(w, qt, method=method)
    check_parts(parts, qt, shape)
    back = dequantize(parts, qt, shape)
    assert np.isfinite(back).all()
    assert (back[0] == 0).all()
    assert (back[3, :g] == 0).all()
    # float16 scales hold a constant to float16 precision; 8-bit coded ones to half a step of their grid
    rtol = 2e-3 + (2.0 ** (float(parts["grid"][1]) / 2) - 1 if qt.coded_scales else 0.0)
    np.testing.assert_allclose(back[1], 0.0375, rtol=rtol)
    np.testing.assert_allclose(back[2], -1.7, rtol=rtol)


@pytest.mark.parametrize("qt", [q for q in QUANT if q.bits == 8], ids=lambda q: q.name)
@pytest.mark.parametrize("method", ["rtn", "search"])
def test_8bit_error_is_tiny(qt, method):
    w = make("gauss", shape_for(qt, 17), 11)
    assert rel_rms(w, quantize(w, qt, method=method), qt) < 0.01


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("method", ["rtn", "search"])
def test_asym_beats_sym_on_shifted_data(bits, method):
    w = make("shifted", (16, 256), bits)
    sym, asym = get_qtype(f"q{bits}_g64"), get_qtype(f"q{bits}a_g64")
    assert rel_rms(w, quantize(w, asym, method=method), asym) < rel_rms(w, quantize(w, sym, method=method), sym)


def test_huge_values_saturate_without_nan():
    qt = get_qtype("q4_g32")
    w = make("gauss", (2, 64), 5) * 1e7
    for parts in (quantize_rtn(w, qt), quantize_search(w, qt)):
        assert np.isfinite(parts["scales"]).all()
        assert np.isfinite(dequantize(parts, qt, w.shape)).all()


def test_scale_invariance_of_search():
    qt = get_qtype("q3a_g32")
    w = make("student", (4, 128), 9)
    a = quantize_search(w, qt)
    b = quantize_search(w * np.float32(4.0), qt)  # a power of two: exact in float16 too
    np.testing.assert_array_equal(a["codes"], b["codes"])
    np.testing.assert_array_equal(a["scales"].astype(np.float32) * 4, b["scales"].astype(np.float32))


def test_dispatcher_and_input_errors():
    qt = get_qtype("q4_g64")
    w = make("gauss", (4, 128), 1)
    np.testing.assert_array_equal(quantize(w, qt, method="rtn")["codes"], quantize_rtn(w, qt)["codes"])
    np.testing.assert_array_equal(quantize(w, qt)["codes"], quantize_search(w, qt)["codes"])
    with pytest.raises(LowbitError, match="unknown quantization method"):
        quantize(w, qt, method="gptq")
    with pytest.raises(FormatError, match="not a multiple"):
        quantize(make("gauss", (4, 96), 1), qt)
    with pytest.raises(FormatError, match="2-D"):
        quantize(np.zeros(128, np.float32), qt)
    with pytest.raises(LowbitError, match="float type"):
        quantize(w, get_qtype("f16"))
    bad = w.copy()
    bad[1, 3] = np.nan
    with pytest.raises(FormatError, match="NaN"):
        quantize(bad, qt)
    with pytest.raises(LowbitError, match="one value per input column"):
        quantize(w, qt, importance=np.ones(64, np.float32))
    with pytest.raises(LowbitError, match="non-negative"):
        quantize(w, qt, importance=-np.ones(128, np.float32))
    with pytest.raises(LowbitError, match="n_candidates"):
        quantize_search(w, qt, n_candidates=0)



@pytest.mark.parametrize("qt", PER_TENSOR, ids=lambda q: q.name)
@pytest.mark.parametrize("use_importance", [False, True], ids=["plain", "importance"])
def test_per_tensor_types_store_one_scale_and_the_search_never_loses(qt, use_importance):
    """One d (and m) for the matrix; every element on that grid's nearest code; the search's grid is kept only when
    its importance-weighted squared error over the whole matrix beats RTN's."""
    w = make("student", (23, 96), qt.id)
    rng = np.random.default_rng(qt.id)
    imp = rng.gamma(0.5, 1.0, 96).astype(np.float32) if use_importance else None
    colw = np.ones(96) if imp is None else imp / imp.max()

    def err(parts):
        return float((((dequantize(parts, qt, w.shape) - w) ** 2) * colw).sum())

    rtn, search = quantize_rtn(w, qt), quantize_search(w, qt, importance=imp)
    for parts in (rtn, search):
        check_parts(parts, qt, w.shape)
        assert parts["scales"].shape == (1, 1)
        d = float(parts["scales"][0, 0])
        m = float(parts["mins"][0, 0]) if qt.asym else d * qt.zero_point
        u = unpack_codes(parts["codes"], qt, 96)
        best = np.clip(np.rint((w + m) / d), 0, qt.max_code)  # the nearest code on the one grid
        assert np.mean(u == best) > 0.999
    assert err(search) <= err(rtn) * (1 + 1e-6)
    if 4 <= qt.bits <= 6:  # a real search beats the range on heavy tails (at 8 bits the range may stay)
        assert err(search) < err(rtn)
    per_channel = quantize_search(w, qt.row_twin, importance=imp)
    assert err(search) >= float((((dequantize(per_channel, qt.row_twin, w.shape) - w) ** 2) * colw).sum())


@pytest.mark.parametrize("name", ["q4_pt", "q4a_pt", "q8_pt"])
@pytest.mark.parametrize("method", ["rtn", "search"])
def test_per_tensor_zero_and_constant_matrices(name, method):
    qt = get_qtype(name)
    for value in (0.0, 0.0375, -1.7):
        w = np.full((5, 64), value, np.float32)
        back = dequantize(quantize(w, qt, method=method), qt, w.shape)
        assert np.isfinite(back).all()
        np.testing.assert_allclose(back, value, rtol=2e-3, atol=1e-12)
