"""numba kernels against the numpy reference, for every registered quant type and awkward shapes."""

import numpy as np
import pytest
from lbtest import byte_dot_case

from lowbit.formats.qtypes import REGISTRY, QType, pack_codes
from lowbit.formats.reader import StoredTensor
from lowbit.kernels import cpu_quant, dispatch, packed, ref
from lowbit.kernels.act8 import quantize_activations8
from lowbit.kernels.ir import amx

# coded-scale types (..s8) never reach a kernel: they run as their float16 twins with decoded scales
# (StoredTensor.per_row); tests/test_scale_codes.py runs every one of them through the dispatcher
QUANT = [q for q in REGISTRY.values() if not q.is_float and not q.coded_scales]


def random_parts(qt: QType, rows: int, cols: int, rng) -> dict[str, np.ndarray]:
    u = rng.integers(0, qt.max_code + 1, size=(rows, cols))
    sshape = qt.part_shapes((rows, cols))["scales"][0]  # [rows, groups], or [1, 1] for a per-tensor type
    parts = {
        "codes": pack_codes(u, qt),
        "scales": (rng.standard_normal(sshape) * 0.05).astype(np.float16),
    }
    if qt.asym:
        parts["mins"] = (rng.standard_normal(sshape) * 0.1).astype(np.float16)
    return parts


def shape_for(qt: QType) -> tuple[int, int]:
    # 13 groups: the byte kernels' block of eight plus five one by one; the int16 kernels' three blocks of four
    # plus one
    return (13, 96) if qt.group_size <= 0 else (13, 13 * qt.group_size)  # per-channel, per-tensor: one group a row


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 3, 8, 9, 40])
def test_linear_matches_reference(qt, t):
    rng = np.random.default_rng(qt.id + t)
    rows, cols = shape_for(qt)
    parts = random_parts(qt, rows, cols, rng)
    w = dispatch.Weight(StoredTensor("w", qt, (rows, cols), parts))
    x = rng.standard_normal((t, cols)).astype(np.float32)
    xr = x
    if w.act_mode == "int8":  # what the integer kernels multiply by (see the mode tests)
        xr = ref.round_activations(x, w.g, cpu_quant.XQ_MAX_INT8)
    want = ref.matvec(parts, qt, (rows, cols), xr)
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
    dense = dispatch.embed(w, np.arange(2))
    np.testing.assert_array_equal(dense, ref.bf16_to_f32(bits))
    assert abs(dense[1, 0] - 0.3) < 0.01


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


@pytest.mark.parametrize("rot", [16, 8])
def test_rope_and_cache_write_in_one_call(rot):
    """The fused RoPE + cache write: q and k rotated (only the first ``rot`` dims of each head when RoPE is
    partial), k and v written to positions start.. of the caches, the rest of the caches untouched."""
    rng = np.random.default_rng(rot)
    t, nh, nkv, hd, ctx, start = 3, 4, 2, 16, 12, 5
    q = rng.standard_normal((t, nh, hd)).astype(np.float32)
    k = rng.standard_normal((t, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((t, nkv, hd)).astype(np.float32)
    inv = (1.0 / 10000 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)
    pos = np.arange(start, start + t)
    ang = pos[:, None].astype(np.float32) * inv[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    kc, vc = (rng.standard_normal((nkv, ctx, hd)).astype(np.float32) for _ in range(2))
    kc0, vc0 = kc.copy(), vc.copy()
    want_q, want_k = q.copy(), k.copy()
    want_q[..., :rot] = ref.rope(q[..., :rot], pos, inv)
    want_k[..., :rot] = ref.rope(k[..., :rot], pos, inv)
    ns = np.empty((nkv, ctx, 0), dtype=np.uint16)  # a float32 cache has no scales
    dispatch.rope_qk_kv_write(q[:, :, :rot], k, v, cos, sin, (kc, ns, vc, ns), start)
    np.testing.assert_allclose(q, want_q, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(kc[:, start : start + t], want_k.transpose(1, 0, 2), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(vc[:, start : start + t], v.transpose(1, 0, 2))
    for new, old in ((kc, kc0), (vc, vc0)):
        np.testing.assert_array_equal(new[:, :start], old[:, :start])
        np.testing.assert_array_equal(new[:, start + t :], old[:, start + t :])


@pytest.mark.parametrize("t,start", [(1, 0), (1, 9), (6, 0), (4, 5)])
def test_attention_matches_reference(t, start):
    rng = np.random.default_rng(t * 10 + start)
    nh, nkv, hd, ctx = 6, 2, 8, 16
    q = rng.standard_normal((t, nh, hd)).astype(np.float32)
    k = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    v = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    got = dispatch.attention(q, (k, v), start, 1 / np.sqrt(hd))
    want = ref.attention(q * np.float32(1.0), k, v, start)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_integer_kernels_cover_every_grouped_type():
    from lowbit.kernels.cpu_quant import specialised

    for qt in QUANT:
        rows, cols = shape_for(qt)
        w = dispatch.Weight(StoredTensor("w", qt, (rows, cols), random_parts(qt, rows, cols, np.random.default_rng(0))))
        grouped = qt.group_size > 0  # per-channel and per-tensor (run as per-channel) rows are one group
        assert (w.int_kernels is not None) == grouped == specialised(qt.bits, w.g), qt.name


MODES = ["int16", "split", "int8"] if cpu_quant.HAS_BYTE_DOT else ["int16"]
QMAX = {"int16": cpu_quant.XQ_MAX, "split": cpu_quant.XQ_MAX_SPLIT, "int8": cpu_quant.XQ_MAX_INT8}
GROUPED = [q for q in QUANT if q.group_size > 0]  # the integer kernels of real groups (not pc/pt)


# (mode, tokens): one token (matvec), a few (small-batch matmul), a prompt (the GEMM, which int16 does not have)
MODE_CASES = [(m, t) for m in MODES for t in (1, 3, 19) if not (m == "int16" and t == 19)]
# every grouped type in every mode this host runs it in (the byte modes take 8-bit codes with VNNI only)
TYPE_MODE_CASES = [pytest.param(qt, m, t, id=f"{qt.name}-{m}-{t}") for qt in GROUPED for m, t in MODE_CASES
                   if m == "int16" or cpu_quant.byte_dot_serves(qt.bits)]
HAS_AMX = cpu_quant.HAS_VNNI and amx.host_has_amx()
AMX_CASES = [("q2a_g32", "int8"), ("q3_g64", "int8"), ("q4_g128", "int8"), ("q4a_g64", "split"), ("q5a_g128", "int8"),
             ("q6_g32", "int8"), ("q8_g64", "split"), ("q8a_g32", "split"), ("q8_g128", "int8")]


@pytest.mark.parametrize("qt,mode,t", TYPE_MODE_CASES)
def test_integer_kernels_match_reference_in_every_activation_mode(qt, mode, t):
    """Each activation mode against the reference product with activations rounded as that mode rounds them
    (int16 and split: to 1e-5, i.e. the float product; int8: the product llama.cpp's Q8 activations give).
    t = 19 is the prompt GEMM: 37 rows by 19 tokens are two row blocks of 16 (four of 8 without AVX-512) and leave
    edge rows and tokens outside the tiles."""
    rng = np.random.default_rng(qt.id * 7 + t)
    rows, cols = 37, 5 * qt.group_size  # 5 groups: one block of four and one more
    parts = random_parts(qt, rows, cols, rng)
    x = rng.standard_normal((t, cols)).astype(np.float32)
    x[:, : qt.group_size] *= 40.0  # groups of very different scales
    want = ref.matvec(parts, qt, (rows, cols), ref.round_activations(x, qt.group_size, QMAX[mode]))
    matvec, matmul, gemm, _ = cpu_quant.make_kernels(qt.bits, qt.group_size, mode)
    mins = parts["mins"].view(np.uint16) if qt.asym else np.zeros((1, 1), dtype=np.uint16)
    y = np.full((t, rows), np.nan, dtype=np.float32)
    args = (parts["codes"], parts["scales"].view(np.uint16), mins, x, qt.asym)
    if t == 1:
        matvec(y[0], *args)
    elif t <= dispatch.SMALL_BATCH:
        matmul(y, *args)
    else:
        gemm(y, *args)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if mode == "int8":  # and it is a real rounding: far from the float product's 1e-5
        exact = ref.matvec(parts, qt, (rows, cols), x)
        assert np.abs(y - exact).max() > 1e-4 * np.abs(exact).max()


@pytest.mark.skipif(not HAS_AMX, reason="needs AMX-INT8 and the kernel's permission for the tile state")
@pytest.mark.parametrize("rows,t", [(37, 33), (16, 16), (5, 9)])
@pytest.mark.parametrize("name,mode", AMX_CASES)
def test_amx_gemm_matches_the_vnni_gemm(name, mode, rows, t):
    """The AMX prompt GEMM against the AVX-512 one (the same integer sums, so to float rounding) and the reference,
    on partial row and token blocks (37 rows = 2 blocks + 5, 33 tokens = 2 blocks + 1) and exact tiles. (Every type
    and mode runs the default GEMM, AMX where the CPU has it, in the test above; this compares the two kernels on
    every bit-width, group size and min layout, not on all 72 combinations, to keep compile time down.)"""
    qt = REGISTRY[name]
    rng = np.random.default_rng(qt.id * 13 + rows + t)
    cols = 3 * qt.group_size
    parts = random_parts(qt, rows, cols, rng)
    x = rng.standard_normal((t, cols)).astype(np.float32)
    x[: t // 2] *= 30.0  # tokens of very different scales
    mins = parts["mins"].view(np.uint16) if qt.asym else np.zeros((1, 1), dtype=np.uint16)
    args = (parts["codes"], parts["scales"].view(np.uint16), mins, x, qt.asym)
    got, base = (np.full((t, rows), np.nan, dtype=np.float32) for _ in range(2))
    cpu_quant.make_kernels(qt.bits, qt.group_size, mode, amx=True).gemm(got, *args)
    cpu_quant.make_kernels(qt.bits, qt.group_size, mode, amx=False).gemm(base, *args)
    scale = np.abs(base).max()
    np.testing.assert_allclose(got, base, rtol=1e-5, atol=1e-6 * scale)
    want = ref.matvec(parts, qt, (rows, cols), ref.round_activations(x, qt.group_size, QMAX[mode]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_amx_is_refused_where_it_cannot_run(monkeypatch):
    """make_kernels(amx=True) fails with a message where the process may not use AMX, instead of running an
    instruction that would kill it."""
    monkeypatch.setattr(cpu_quant, "host_has_amx", lambda: False)
    with pytest.raises(ValueError, match="may not use AMX"):
        cpu_quant.make_kernels(4, 64, "int8", amx=True)
    if cpu_quant.HAS_BYTE_DOT:
        assert cpu_quant.make_kernels(4, 64, "int8").gemm is cpu_quant.make_kernels(4, 64, "int8", amx=False).gemm


def test_default_activation_mode():
    for bits in (2, 3, 4, 5, 6, 8):
        mode = cpu_quant.activation_mode(bits)
        if cpu_quant.HAS_VNNI:
            assert mode == ("split" if bits == 8 else "int8")
        elif cpu_quant.HAS_BYTE_DOT:  # AVX2: the byte pair saturates on 8-bit codes, which keep int16
            assert mode == ("int16" if bits == 8 else "int8")
        else:
            assert mode == "int16"
        assert cpu_quant.activation_mode(bits, exact=True) == ("split" if cpu_quant.HAS_VNNI else "int16")
    if cpu_quant.HAS_BYTE_DOT and not cpu_quant.HAS_VNNI:
        with pytest.raises(ValueError, match="needs a CPU with AVX-512 VNNI"):
            cpu_quant.make_kernels(8, 64, "int8")
    with pytest.raises(ValueError, match="unknown activation mode"):
        cpu_quant.make_kernels(4, 64, "fp8")
    assert cpu_quant.make_kernels(4, 64, "int16").gemm is None  # int16: prompts take dequantized tiles + BLAS


def test_split_activations_carry_int16_exactly():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 128)) * 5).astype(np.float32)
    xh = np.empty(x.shape, dtype=np.int8)
    xl = np.empty(x.shape, dtype=np.int8)
    dx = np.empty((2, 2), dtype=np.float32)
    xs = np.empty((2, 2), dtype=np.float32)
    quantize_activations8(xh, xl, dx, xs, x, 64, True)
    q = xh.astype(np.int32) * 256 + xl
    assert np.abs(q).max() == cpu_quant.XQ_MAX_SPLIT
    back = (q.reshape(2, 2, 64) * dx[:, :, None]).reshape(2, 128)
    # the same levels (a rare tie may round the other way under fastmath: at most one step)
    want = ref.round_activations(x, 64, cpu_quant.XQ_MAX_SPLIT)
    np.testing.assert_allclose(back, want, rtol=0, atol=1.01 * float(dx.max()))
    assert np.mean(np.abs(back - want) < 0.05 * float(dx.min())) > 0.99


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
    np.testing.assert_allclose(xs, back.sum(-1), rtol=1e-5, atol=1e-9)  # the sums of the rounded values
    assert np.abs(xq).max() == 32767 and (xq[1, 64:128] == 0).all()


def test_fast_exp_matches_numpy_over_the_float32_range():
    import numba as nb

    from lowbit.kernels.cpu import fast_exp

    @nb.njit
    def run(out, x):
        for i in range(x.shape[0]):
            out[i] = fast_exp(x[i])

    x = np.concatenate([np.linspace(-87, 88, 400_001), [0.0, -1e-30, 1e-30, -0.3465, 0.3466]]).astype(np.float32)
    got = np.empty_like(x)
    run(got, x)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 4e-7
    out = np.empty(2, dtype=np.float32)
    run(out, np.array([-1e4, 1e4], dtype=np.float32))  # clamped: tiny and huge, never 0/inf/nan surprises
    assert 0 < out[0] < 1e-37 and np.isfinite(out[1]) and out[1] > 1e38


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", ["q4a_g64", "q8_g32", "q3_g128"])
def test_linear_many_fuses_same_type_products_and_matches_linear(name, n):
    qt = REGISTRY[name]
    rng = np.random.default_rng(n)
    cols = 4 * qt.group_size
    ws = []
    for i, rows in enumerate((24, 8, 8)[:n]):
        b = rng.standard_normal(rows).astype(np.float32) if i == 1 else None
        ws.append(dispatch.Weight(StoredTensor(f"w{i}", qt, (rows, cols), random_parts(qt, rows, cols, rng)), b))
    for t in (1, 3):
        x = rng.standard_normal((t, cols)).astype(np.float32)
        got = dispatch.linear_many(ws, x)
        want = [dispatch.linear(w, x) for w in ws]
        assert [g.shape for g in got] == [(t, w.rows) for w in ws]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * np.abs(w).max())
    if cpu_quant.byte_dot_serves(qt.bits):  # one token really takes the fused kernel: one call for all n products
        from lowbit.kernels.timing import KernelTimer

        with KernelTimer() as timer:
            dispatch.linear_many(ws, rng.standard_normal((1, cols)).astype(np.float32))
        assert timer.calls == 1


def _byte_mode_cases(names, modes):
    """(name, mode) pairs; the byte modes skipped where the host cannot run them for that type."""
    return [byte_dot_case(REGISTRY[n].bits, n, m, id=f"{n}-{m}") if m != "int16" else pytest.param(n, m, id=f"{n}-{m}")
            for n in names for m in modes]


@pytest.mark.parametrize("name,mode", _byte_mode_cases(
    ["q4a_g32", "q4_g64", "q3_g128", "q8_g32", "q6a_g64", "q2a_g64", "q5_g32"], ["int16", "int8", "split"]))
def test_small_batches_are_the_one_token_kernel_row_for_row(name, mode):
    """Several sequences decoded in one pass (continuous batching) get, row for row, exactly what each would get
    alone: the 2..8-token kernel does each token's arithmetic as the one-token kernel does (t = 3, 5, 7 padded)."""
    qt = next(q for q in QUANT if q.name == name)
    rng = np.random.default_rng(qt.id)
    rows, cols = 37, 11 * qt.group_size  # one block of eight groups and three more
    parts = random_parts(qt, rows, cols, rng)
    matvec, matmul, _, _ = cpu_quant.make_kernels(qt.bits, qt.group_size, mode)
    mins = parts["mins"].view(np.uint16) if qt.asym else np.zeros((1, 1), dtype=np.uint16)
    for t in range(2, dispatch.SMALL_BATCH + 1):
        x = rng.standard_normal((t, cols)).astype(np.float32)
        y = np.full((t, rows), np.nan, dtype=np.float32)
        matmul(y, parts["codes"], parts["scales"].view(np.uint16), mins, x, qt.asym)
        for i in range(t):
            one = np.full(rows, np.nan, dtype=np.float32)
            matvec(one, parts["codes"], parts["scales"].view(np.uint16), mins, x[i : i + 1], qt.asym)
            assert np.array_equal(y[i], one), (t, i)


@pytest.mark.parametrize("name,mode", _byte_mode_cases(["q4a_g32", "q6_g64"], ["int8", "split"]))
def test_kept_weights_sharing_an_input_take_one_call(name, mode):
    """q/k/v (three) and gate/up (two) kept for batches: dispatch.linear_many gives each weight's own numbers bit
    for bit (one packed.matmul3 call); a weight with a partial block of rows, or another type, goes one by one."""
    qt = REGISTRY[name]
    rng = np.random.default_rng(qt.id + 5)
    br = cpu_quant.GEMM_ROWS
    cols = 5 * qt.group_size
    ws = []
    for rows in (3 * br, br, 2 * br):
        w = dispatch.Weight(StoredTensor("w", qt, (rows, cols), random_parts(qt, rows, cols, rng)))
        w.set_activation_mode(mode)
        assert dispatch.pack_for_batches(w) > 0
        ws.append(w)
    assert packed.kept_together(ws) and packed.kept_together(ws[:2])
    for t in (2, 5, dispatch.SMALL_BATCH):
        x = rng.standard_normal((t, cols)).astype(np.float32)
        for group in (ws, ws[1:]):
            got = dispatch.linear_many(group, x)
            for w, y in zip(group, got, strict=True):
                assert np.array_equal(y, dispatch.linear(w, x))
    odd = dispatch.Weight(StoredTensor("w", qt, (br + 3, cols), random_parts(qt, br + 3, cols, rng)))
    odd.set_activation_mode(mode)
    dispatch.pack_for_batches(odd)
    assert not packed.kept_together([ws[0], odd])


@pytest.mark.parametrize("name,mode", _byte_mode_cases(["q4a_g32", "q3_g128", "q8_g64"], ["int8", "split"]))
def test_packed_weights_for_batched_decode(name, mode):
    """Pre-packed blocks (kernels/packed.py) give the reference product for 2..8 tokens, rows past the last whole
    block included, and exactly the prompt GEMM's numbers."""
    qt = REGISTRY[name]
    rng = np.random.default_rng(qt.id + 3)
    rows, cols = 3 * cpu_quant.GEMM_ROWS + 5, 11 * qt.group_size  # AVX-512: a 32-row block, a 16-row one, 5 rows
    parts = random_parts(qt, rows, cols, rng)
    w = dispatch.Weight(StoredTensor("w", qt, (rows, cols), parts))
    w.set_activation_mode(mode)
    _, _, gemm, _ = cpu_quant.make_kernels(qt.bits, qt.group_size, mode, amx=False)
    assert dispatch.pack_for_batches(w) > 0
    for t in range(2, dispatch.SMALL_BATCH + 1):
        x = rng.standard_normal((t, cols)).astype(np.float32)
        got = dispatch.linear(w, x)
        want = ref.matvec(parts, qt, (rows, cols), ref.round_activations(x, qt.group_size, QMAX[mode]))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        y = np.full((t, rows), np.nan, dtype=np.float32)
        gemm(y, *w._qargs(), x, qt.asym)
        assert np.array_equal(got, y)
