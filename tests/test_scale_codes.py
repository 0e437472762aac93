"""8-bit coded group scales (the ``..s8`` types): codes, quantizers, GPTQ, kernels, container and conversion."""

import numpy as np
import pytest

from lowbit.convert.gptq import gptq_quantize
from lowbit.convert.mixed import S8_LADDER, ladder_for
from lowbit.convert.quantize import matrix_grid, quantize_rtn, quantize_search
from lowbit.errors import FormatError
from lowbit.formats import scale_codes
from lowbit.formats.qtypes import REGISTRY, get_qtype, quant_type, unpack_codes
from lowbit.formats.reader import StoredTensor
from lowbit.kernels import dispatch, ref

CODED = [q for q in REGISTRY.values() if q.coded_scales]


def test_registry_has_a_coded_twin_for_every_group_type():
    groups = [q for q in REGISTRY.values() if not q.is_float and q.group_size > 0 and not q.coded_scales]
    assert len(CODED) == 24  # 2-5 bits, sym/asym, groups of 32/64/128
    for q in [q for q in groups if q.bits <= 5]:
        c = REGISTRY[q.name + "s8"]
        assert c.f16_twin is q and c.id == q.id + 5 and (c.bits, c.group_size, c.asym) == (q.bits, q.group_size, q.asym)
        assert quant_type(q.bits, q.group_size, q.asym, 8) is c
    assert len({q.id for q in REGISTRY.values()}) == len(REGISTRY)
    with pytest.raises(FormatError, match="group size"):
        quant_type(4, 0, True, 8)
    with pytest.raises(FormatError, match="up to 5 bits"):
        quant_type(8, 32, False, 8)
    parts = get_qtype("q4a_g32s8").part_shapes((64, 576))
    assert parts == {"codes": ((64, 288), "uint8"), "scales": ((64, 18), "uint8"), "mins": ((64, 18), "uint8"),
                     "grid": ((2,), "float32")}
    # 4 bits + 8 + 8 per 32 weights, plus the grid: 4.5 bits per weight where float16 scales cost 5.0
    assert get_qtype("q4a_g32s8").nbytes((64, 576)) == 64 * 576 * 4.5 / 8 + 8
    assert get_qtype("q4a_g32").nbytes((64, 576)) == 64 * 576 * 5.0 / 8
    assert get_qtype("q3_g64s8").nbytes((64, 576)) == 64 * 576 * 3.125 / 8 + 8


@pytest.mark.parametrize("name", ["q4a_g32s8", "q2a_g64s8", "q5a_g32s8", "q4_g32s8", "q3_g128s8", "q5_g64s8"])
def test_codes_round_trip_and_stay_within_half_a_step(name):
    qt = get_qtype(name)
    rng = np.random.default_rng(qt.id)
    d = np.exp(rng.uniform(-6, -2, 4000)).astype(np.float32)  # about 2.5 octaves of scales
    if not qt.asym:
        d *= rng.choice([-1, 1], d.size)
    d[:3] = 0
    m = (np.abs(d) * rng.uniform(0, qt.max_code, d.size)).astype(np.float32) if qt.asym else None
    grid = scale_codes.fit_grid(d, qt)
    sc, mc = scale_codes.encode(d, m, grid, qt)
    d16, m16 = scale_codes.decode(sc, mc, grid, qt)
    assert d16.dtype == np.float16 and (d16[:3] == 0).all() and (sc[:3] & 0x7F == 0).all()
    live = d != 0
    step = 2.0 ** (grid[1] / 2) - 1 + 1e-3  # half a level apart, plus float16 rounding
    assert np.all(np.abs(d16[live].astype(np.float32) / d[live] - 1) <= step)
    assert np.all(np.sign(d16[live]) == np.sign(d[live]))
    if qt.asym:  # the zero point within half of its step (max_code / 255 codes) of the wanted one, for the coded d
        z = m[live] / d16[live].astype(np.float32)
        zq = m16[live].astype(np.float32) / d16[live].astype(np.float32)
        assert np.all(np.abs(np.clip(z, 0, qt.max_code) - zq) <= qt.max_code / 255 / 2 + 2e-3 * qt.max_code)
    # values on the grid get their own codes back (what the quantizers and GPTQ rely on)
    sc2, mc2 = scale_codes.encode(d16.astype(np.float32), None if m16 is None else m16.astype(np.float32), grid, qt)
    assert np.array_equal(sc2, sc) and (mc is None or np.array_equal(mc2, mc))


def test_grid_clips_rare_tiny_scales_instead_of_coarsening_every_level():
    qt = get_qtype("q4a_g32s8")
    d = np.full(10000, 0.01, np.float32) * np.linspace(0.5, 1.0, 10000, dtype=np.float32)
    d[:5] = 1e-9  # five near-empty groups
    b, t = scale_codes.fit_grid(d, qt)
    assert t == pytest.approx(scale_codes.MIN_STEP)
    assert 2.0 ** b > 1e-6
    with pytest.raises(FormatError, match="corrupt scale grid"):
        scale_codes.decode(np.ones(3, np.uint8), np.ones(3, np.uint8), np.array([0.0, np.nan], np.float32), qt)
    # a hostile file's grid: refused with the tensor's name when the kernels load it, never decoded to garbage
    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    parts = quantize_rtn(w, qt)
    for bad in ([0.0, 0.0], [0.0, 2.0], [1e9, 0.03], [np.inf, 0.03]):
        st = StoredTensor("blk.0.attn_q.weight", qt, w.shape, {**parts, "grid": np.array(bad, np.float32)})
        with pytest.raises(FormatError, match="^tensor blk.0.attn_q.weight: corrupt scale grid"):
            dispatch.Weight(st)


def _rel_err(w, parts, qt):
    return float(((ref.dequantize(parts, qt, w.shape) - w) ** 2).sum() / (w**2).sum())


@pytest.mark.parametrize("name", ["q4a_g32s8", "q3a_g64s8", "q2a_g32s8", "q4_g32s8", "q3_g128s8"])
def test_coded_scales_cost_little_against_float16_scales(name):
    """Same codes layout, scales in a byte: the search's error within a few percent of the float16 twin's, never
    worse than coded RTN on the same grid, and the stored parts decode to what the kernels run."""
    qt = get_qtype(name)
    rng = np.random.default_rng(7)
    w = (rng.standard_t(5, (48, 4 * qt.group_size)) * 0.02 * rng.uniform(0.3, 3, (48, 1))).astype(np.float32)
    grid = matrix_grid(w, qt)
    coded = quantize_search(w, qt, grid=grid)
    assert coded["scales"].dtype == np.uint8 and np.array_equal(coded["grid"], grid)
    e_coded, e_twin = _rel_err(w, coded, qt), _rel_err(w, quantize_search(w, qt.f16_twin), qt.f16_twin)
    assert e_coded <= e_twin * 1.05
    assert e_coded <= _rel_err(w, quantize_rtn(w, qt, grid=grid), qt) * 1.001
    twin = StoredTensor("w", qt, w.shape, coded).per_row()
    assert twin.qtype is qt.f16_twin and twin.parts["scales"].dtype == np.float16
    np.testing.assert_array_equal(ref.dequantize(twin.parts, twin.qtype, w.shape), ref.dequantize(coded, qt, w.shape))


@pytest.mark.parametrize("qt", CODED, ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 9])
def test_kernels_run_coded_types_as_the_reference_computes_them(qt, t):
    rng = np.random.default_rng(qt.id + t)
    rows, cols = 13, 5 * qt.group_size
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    parts = quantize_rtn(w, qt)
    weight = dispatch.Weight(StoredTensor("w", qt, (rows, cols), parts))
    x = rng.standard_normal((t, cols)).astype(np.float32)
    xr = x if weight.act_mode != "int8" else ref.round_activations(x, weight.g, 127.0)
    want = ref.matvec(parts, qt, (rows, cols), xr)
    np.testing.assert_allclose(dispatch.linear(weight, x), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    ids = np.array([0, 4, 12])
    np.testing.assert_allclose(dispatch.embed(weight, ids), ref.dequantize(parts, qt, (rows, cols))[ids], rtol=1e-6)


@pytest.mark.parametrize("name", ["q4a_g32s8", "q3_g64s8"])
def test_gptq_on_coded_scales_keeps_one_grid_across_row_blocks(name):
    qt = get_qtype(name)
    rng = np.random.default_rng(3)
    cols = 4 * qt.group_size
    x = rng.standard_normal((512, cols)) @ (np.eye(cols) + 0.3 * rng.standard_normal((cols, cols)) / np.sqrt(cols))
    h = (x.T @ x / len(x)).astype(np.float64)
    w = (rng.standard_normal((40, cols)) * 0.03).astype(np.float32)
    grid = matrix_grid(w, qt)
    whole = gptq_quantize(w, h, qt, grid=grid)
    assert np.array_equal(whole["grid"], grid) and whole["scales"].dtype == np.uint8
    parts = [gptq_quantize(w[a:b], h, qt, grid=grid) for a, b in ((0, 16), (16, 40))]
    for k in ("codes", "scales", *(("mins",) if qt.asym else ())):
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])

    def objective(p):
        e = ref.dequantize(p, qt, w.shape) - w
        return float(np.einsum("ij,jk,ik->", e, h, e))

    assert objective(whole) < objective(quantize_search(w, qt, importance=np.diag(h).astype(np.float32), grid=grid))
    assert unpack_codes(whole["codes"], qt, cols).max() <= qt.max_code


def test_the_s8_ladder_keeps_coded_scales_where_groups_fit():
    names = [q.name for q in ladder_for((64, 576), S8_LADDER)]
    assert names[0] == "q2a_g64s8" and "q4a_g32s8" in names and names[-2:] == ["q6a_g64", "q8_g64"]
    assert all(n.endswith("s8") for n in names[:-2])
    # 80 columns: no group of 32 fits, per-channel float16 scales are the fallback
    assert {q.name for q in ladder_for((8, 80), S8_LADDER)} <= {f"q{b}{a}_pc" for b in (2, 3, 4, 5, 6, 8)
                                                                 for a in ("", "a")}


def test_convert_cli_writes_coded_scales_and_says_what_they_take_in_memory(tiny_llama, tmp_path):
    from lbtest import run_cli

    from lowbit.formats.reader import Container

    out = tmp_path / "m.lowbit"
    res = run_cli("convert", tiny_llama, "-o", out, "--no-progress", "--scale-bits", "8", "--bits", "3")
    assert res.returncode == 0, res.stderr
    c = Container(out)
    types = {c.tensor(n).qtype.name for n in c.tensor_names if not c.tensor(n).qtype.is_float}
    assert "q3a_g64s8" in types and not any(t.endswith("s8") and int(t[1]) > 5 for t in types)
    assert c.meta["quantization"]["scale_bits"] == 8
    assert "once loaded (8-bit scales run as float16)" in res.stdout
    info = run_cli("inspect", out)
    assert info.returncode == 0 and "in memory:" in info.stdout
    gen = run_cli("generate", out, "-p", "hello", "-n", "4")
    assert gen.returncode == 0, gen.stderr


def test_tuning_learns_decoded_scales_and_stores_codes_on_the_same_grid():
    torch = pytest.importorskip("torch")
    from lowbit.convert.tune_model import QuantLinear

    qt = get_qtype("q3a_g32s8")
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((8, 96)) * 0.05).astype(np.float32)
    parts = quantize_search(w, qt)
    lin = QuantLinear(parts, qt, w.shape)
    with torch.no_grad():  # untuned: the stored tensor exactly, and its own codes back
        np.testing.assert_array_equal(lin.weight().numpy(), ref.dequantize(parts, qt, w.shape))
    same = lin.stored()
    assert np.array_equal(same["scales"], parts["scales"]) and np.array_equal(same["mins"], parts["mins"])
    with torch.no_grad():
        lin.a += 0.1  # scales up by ~10.5%: about 4.6 grid steps of 2.2%
    moved = lin.stored()
    k0, k1 = parts["scales"].astype(int), moved["scales"].astype(int)
    assert moved["scales"].dtype == np.uint8 and np.all((k1 - k0 >= 4) & (k1 - k0 <= 5))
