"""Every CUDA kernel against the numpy reference (lowbit.kernels.ref), in the simulator, for every quant type."""

import numpy as np
import pytest
from numba import cuda
from simhelp import random_parts

from lowbit.errors import LowbitError
from lowbit.formats.qtypes import REGISTRY, QType
from lowbit.formats.reader import StoredTensor
from lowbit.kernels import ref
from lowbit.kernels.cuda import dispatch as cd
from lowbit.kernels.cuda.quant import PER_BLOCK, THREADS, TILE

# f32, f16, bf16 and every quantized type; coded-scale types run as their float16 twins (StoredTensor.per_row), so
# two of them stand for the rest (test_coded_scale_types_run_as_their_twins)
ALL_TYPES = [q for q in REGISTRY.values() if not q.coded_scales]


def shape_for(qt: QType) -> tuple[int, int]:
    # two groups per row (group indexing), per-channel rows of 48 (not a power of two)
    return (3, 48) if qt.is_float or qt.group_size <= 0 else (3, 2 * qt.group_size)  # pc, pt: a row is a group


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a, dtype=np.float32))


def close(got, want, tol=2e-5):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


def check_quant_kernels(qt: QType, rows: int, cols: int) -> None:
    """Fused dequantize-matvec (1 token), tiled matmul (3 tokens: one partial tile; TILE+1: two tiles), row gather."""
    rng = np.random.default_rng(qt.id + rows)
    parts = random_parts(qt, rows, cols, rng)
    bias = rng.standard_normal(rows).astype(np.float32)
    w = cd.Weight(StoredTensor("w", qt, (rows, cols), parts), bias)
    full = ref.dequantize(parts, qt, (rows, cols))
    for t in (1, 3, TILE + 1):
        x = rng.standard_normal((t, cols)).astype(np.float32)
        close(cd.linear(w, dev(x)).copy_to_host(), ref.matvec(parts, qt, (rows, cols), x) + bias)
    ids = np.array([2, 0, rows - 1, 2])
    got = cd.embed(w, cuda.to_device(ids)).copy_to_host()
    np.testing.assert_array_equal(got, full[ids])


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda q: q.name)
def test_quant_kernels_match_reference(qt):
    check_quant_kernels(qt, *shape_for(qt))


@pytest.mark.parametrize("name", ["q4a_g32s8", "q3_g64s8"])
def test_coded_scale_types_run_as_their_twins(name):
    check_quant_kernels(REGISTRY[name], *shape_for(REGISTRY[name]))


@pytest.mark.parametrize("name", ["q4_g32", "q3a_pc", "q6a_g64"])
def test_quant_kernels_over_several_blocks(name):
    """More rows than one block handles (PER_BLOCK rows per block), the last block partly filled."""
    qt = REGISTRY[name]
    check_quant_kernels(qt, 2 * PER_BLOCK + 1, shape_for(qt)[1])


def test_more_threads_than_columns_and_fp16_scale_edge_values():
    qt = REGISTRY["q8_g32"]
    assert THREADS <= 32  # 32 columns: some threads of a block may have nothing to do on a GPU (128 threads)
    vals = np.array([1.0, -2.5, 6.1e-5, -3e-7, 0.0, 65504.0], dtype=np.float16)
    from lowbit.formats.qtypes import pack_codes

    parts = {"codes": pack_codes(np.full((6, 32), 200), qt), "scales": vals.reshape(6, 1)}
    w = cd.Weight(StoredTensor("w", qt, (6, 32), parts))
    x = np.ones((1, 32), dtype=np.float32)
    close(cd.linear(w, dev(x)).copy_to_host(), ref.matvec(parts, qt, (6, 32), x), 1e-6)


def test_rmsnorm_and_head_rmsnorm():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    close(cd.rmsnorm(dev(x), dev(w), 1e-5).copy_to_host(), ref.rmsnorm(x, w, 1e-5))
    xh = rng.standard_normal((2, 3, 16)).astype(np.float32)
    wh = rng.standard_normal(16).astype(np.float32)
    close(cd.head_rmsnorm(dev(xh), dev(wh), 1e-6).copy_to_host(), ref.rmsnorm(xh, wh, 1e-6))


@pytest.mark.parametrize("rot", [16, 8])
def test_rope_full_and_partial(rot):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 16)).astype(np.float32)
    inv = (1.0 / 10000 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)
    ang = np.arange(20, dtype=np.float32)[:, None] * inv[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    start = 5
    d = dev(x)
    cd.rope_inplace(d, dev(cos), dev(sin), start, rot)
    want = x.copy()
    want[..., :rot] = ref.rope(x[..., :rot], np.arange(start, start + 3), inv)
    close(d.copy_to_host(), want, 1e-5)


@pytest.mark.parametrize(
    "t,start,window,softcap,slice_elems",
    [(1, 0, 0, 0.0, None), (1, 9, 0, 0.0, None), (4, 0, 0, 0.0, None), (3, 5, 3, 0.0, None), (2, 6, 0, 5.0, None),
     (5, 2, 0, 0.0, 4 * 7)],  # last: the score scratch holds one query at a time, so the launch is sliced
    ids=["decode-first", "decode", "prefill", "window", "softcap", "sliced"],
)
def test_kv_write_and_attention(t, start, window, softcap, slice_elems, monkeypatch):
    """GQA (4 heads over 2 kv heads): keys/values written into the device cache, then causal attention."""
    rng = np.random.default_rng(t * 100 + start)
    nh, nkv, hd, ctx = 4, 2, 8, 16
    kc = np.zeros((nkv, ctx, hd), np.float32)
    vc = np.zeros((nkv, ctx, hd), np.float32)
    kc[:, :start] = rng.standard_normal((nkv, start, hd))
    vc[:, :start] = rng.standard_normal((nkv, start, hd))
    k_new = rng.standard_normal((t, nkv, hd)).astype(np.float32)
    v_new = rng.standard_normal((t, nkv, hd)).astype(np.float32)
    q = rng.standard_normal((t, nh, hd)).astype(np.float32)
    dk, dv = dev(kc), dev(vc)
    cd.kv_write(dk, dev(k_new), start)
    cd.kv_write(dv, dev(v_new), start)
    kc[:, start : start + t] = k_new.transpose(1, 0, 2)
    vc[:, start : start + t] = v_new.transpose(1, 0, 2)
    np.testing.assert_array_equal(dk.copy_to_host()[:, : start + t], kc[:, : start + t])
    if slice_elems:
        monkeypatch.setattr(cd, "SCORES_ELEMS", slice_elems)
    scale = 0.3
    got = cd.attention(dev(q), dk, dv, start, scale, window, softcap).copy_to_host()
    close(got, ref.attention(q, kc, vc, start, scale, window, softcap), 1e-5)


def test_elementwise():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 20)).astype(np.float32)
    b = rng.standard_normal((3, 20)).astype(np.float32)
    close(cd.silu_mul(dev(a), dev(b)).copy_to_host(), ref.silu(a) * b, 1e-5)
    close(cd.gelu_tanh_mul(dev(a), dev(b)).copy_to_host(), ref.gelu_tanh(a) * b, 1e-5)
    close(cd.add(dev(a), dev(b)).copy_to_host(), a + b, 1e-6)
    close(cd.softcap(dev(a * 10), 3.0).copy_to_host(), ref.softcap(a * 10, 3.0), 1e-5)
    d = dev(a)
    cd.scale_inplace(d, 2.5)
    close(d.copy_to_host(), a * 2.5, 1e-6)


def test_columns_of_a_fused_projection():
    a = np.random.default_rng(4).standard_normal((3, 20)).astype(np.float32)
    d = dev(a)
    for lo, hi in ((0, 8), (8, 12), (12, 20), (5, 5)):
        got = cd.columns(d, lo, hi)
        assert got.shape == (3, hi - lo) and got.is_c_contiguous()
        np.testing.assert_array_equal(got.copy_to_host(), a[:, lo:hi])
    with pytest.raises(LowbitError, match="columns 12:21 out of range for 20 columns"):
        cd.columns(d, 12, 21)


@pytest.mark.parametrize("n", [1, 5, 1000, 4099])
def test_device_sum_for_the_bandwidth_measurement(n):
    from lowbit.kernels.cuda.bandwidth import device_sum

    a = np.random.default_rng(n).random(n).astype(np.float32)
    assert device_sum(dev(a)) == pytest.approx(float(a.astype(np.float64).sum()), rel=1e-5)
