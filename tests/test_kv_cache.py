"""KV cache storage formats (kernels/kv_formats.py): the numba writers against the numpy reference bit for bit, the
attention kernels over every format (and key/value mix) against the reference attention over the decoded cache,
bytes per token, the --kv-bits syntax, and a model's cache end to end."""

import numba as nb
import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.kernels import dispatch, kv_formats, ref
from lowbit.kernels.cpu_kv import soft_float_to_half
from lowbit.kernels.kv_cache import KVCache
from lowbit.kernels.kv_formats import FORMATS, KVSpec

SPECS = ["32", "16", "8", "4", "k8,v4", "k16,v8", "k4,v16"]
ATTENTION_SPECS = ["32", "16", "8", "4", "k8,v4"]  # each pair of formats compiles its own kernels


@nb.njit(cache=False)
def _soft_halves(x, out):
    for i in range(x.size):
        out[i] = soft_float_to_half(x[i])


def test_software_float16_rounding_matches_numpy():
    """The integer-arithmetic float32 -> float16 conversion (CPUs without F16C) rounds like numpy: normals, ties,
    subnormals, overflow to inf, nan."""
    rng = np.random.default_rng(0)
    scaled = [rng.standard_normal(20000).astype(np.float32) * s for s in (1e-9, 1e-6, 3e-5, 1e-2, 1, 300, 6e4)]
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 1e6, 6.1035e-5, 5.96e-8,
                        2.98e-8, 2.99e-8, 1 + 2**-11, 1 + 3 * 2**-11], dtype=np.float32)
    ties = (np.arange(1, 4000, dtype=np.float32) * np.float32(2**-11) + 1).astype(np.float32)
    x = np.concatenate([*scaled, special, ties, -ties])
    got = np.empty(x.size, dtype=np.uint16)
    _soft_halves(x, got)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("hd", [8, 20, 48, 64, 128])
def test_cache_writer_matches_reference_encoding(name, hd):
    """kv_write stores exactly the reference encoding (data and scales), at positions start.. only."""
    fmt = FORMATS[name]
    spec = KVSpec(fmt, fmt)
    rng = np.random.default_rng(hd)
    nkv, ctx, t, start = 2, 16, 5, 7
    cache = KVCache(1, nkv, ctx, hd, spec)
    k = (rng.standard_normal((t, nkv, hd)) * 3).astype(np.float32)
    k[0, 0, :] = 0.0  # an all-zero group: scale 0, codes 0 (no division by zero)
    v = rng.standard_normal((t, nkv, hd)).astype(np.float32)
    dispatch.kv_write(cache.layer(0), k, v, start)
    for x, data, scales in ((k, cache.k[0], cache.ks[0]), (v, cache.v[0], cache.vs[0])):
        want_d, want_s = kv_formats.quantize(fmt, x.transpose(1, 0, 2))
        np.testing.assert_array_equal(data[:, start : start + t], want_d)
        np.testing.assert_array_equal(scales[:, start : start + t], want_s)
        assert not data[:, :start].any() and not data[:, start + t :].any()
    # decoding is within the format's resolution of the input
    got = cache.keys(0, ctx)[:, start : start + t]
    err = np.abs(got - k.transpose(1, 0, 2)).max() / np.abs(k).max()
    assert err <= {32: 0, 16: 1e-3, 8: 1e-2, 4: 0.1}[fmt.bits]


@pytest.mark.parametrize("spec", ATTENTION_SPECS)
@pytest.mark.parametrize("hd", [20, 64])
@pytest.mark.parametrize("t,start,window,cap", [(1, 0, 0, 0.0), (1, 150, 0, 0.0), (1, 150, 40, 2.0), (13, 0, 0, 0.0),
                                                (9, 30, 5, 0.0), (1, 9, 0, 0.0)])
def test_attention_reads_every_format(spec, hd, t, start, window, cap):
    """Prompt, short decode and split decode (> 128 cached positions) attention over a cache in each format equals the
    reference attention over the decoded cache (so the only error a format adds is its rounding)."""
    s = KVSpec.parse(spec)
    rng = np.random.default_rng(t + start + hd)
    nh, nkv, ctx = 6, 2, 170
    cache = KVCache(1, nkv, ctx, hd, s)
    k = rng.standard_normal((ctx, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((ctx, nkv, hd)).astype(np.float32)
    dispatch.kv_write(cache.layer(0), k, v, 0)
    q = (rng.standard_normal((t, nh, hd)) * 2).astype(np.float32)
    got = dispatch.attention(q, cache.layer(0), start, 0.3, window, cap)
    want = ref.attention(q, cache.keys(0, ctx), cache.values(0, ctx), start, scale=0.3, window=window, softcap=cap)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("hd", [64, 128])
def test_bytes_per_token(hd):
    f32 = KVSpec.parse("32").bytes_per_token(30, 3, hd)
    assert KVSpec.parse("16").bytes_per_token(30, 3, hd) * 2 == f32
    assert KVSpec.parse("8").bytes_per_token(30, 3, hd) <= 0.27 * f32
    assert KVSpec.parse("4").bytes_per_token(30, 3, hd) <= 0.15 * f32
    # the arrays a cache allocates are what bytes_per_token says
    for spec in SPECS:
        s = KVSpec.parse(spec)
        assert KVCache(2, 3, 10, hd, s).nbytes == 10 * s.bytes_per_token(2, 3, hd)


def test_kv_bits_syntax():
    assert KVSpec.parse(None) == kv_formats.DEFAULT == KVSpec.parse("16") == KVSpec.parse("f16")
    assert KVSpec.parse("k8,v4") == KVSpec(FORMATS["q8"], FORMATS["q4"]) == KVSpec.parse("v4,k8")
    assert KVSpec.parse("k=8,v=4").label == "k8,v4" and KVSpec.parse("q8").label == "q8"
    for bad in ["", "7", "k8", "k8,v4,k4", "k8,x4", "16,16", "abc"]:
        with pytest.raises(LowbitError, match="--kv-bits"):
            KVSpec.parse(bad)
    with pytest.raises(LowbitError, match="even head dim"):
        KVCache(1, 1, 4, 9, KVSpec.parse("4"))


def test_copy_prefix_copies_every_array():
    rng = np.random.default_rng(1)
    s = KVSpec.parse("k8,v4")
    a, b = KVCache(2, 2, 12, 32, s), KVCache(2, 2, 12, 32, s)
    for li in range(2):
        x = rng.standard_normal((12, 2, 32)).astype(np.float32)
        dispatch.kv_write(a.layer(li), x, -x, 0)
    b.copy_prefix(a, 7)
    for li in range(2):
        np.testing.assert_array_equal(b.keys(li, 7), a.keys(li, 7))
        np.testing.assert_array_equal(b.values(li, 7), a.values(li, 7))
        assert not b.k[li][:, 7:].any() and not b.vs[li][:, 7:].any()
    with pytest.raises(ValueError):
        b.copy_prefix(KVCache(2, 2, 12, 32), 3)


@pytest.mark.parametrize("spec", ["16", "k8,v4"])
def test_whole_context_cache_grows_with_its_positions(spec):
    """A whole-context layer starts with room for GROW_ROWS positions and grows (to multiples of it, doubling) as the
    writers reach past it, keeping what it holds: prompt chunks, single steps and a batched step across the
    boundaries read back and attend exactly as a cache made with room for every position; it never grows past the
    context; copy_prefix makes room for what it copies; bytes held follow the room."""
    from lowbit.kernels.kv_cache import GROW_ROWS

    s = KVSpec.parse(spec)
    rng = np.random.default_rng(8)
    nh, nkv, hd, ctx = 4, 2, 32, 1100
    grown = KVCache(1, nkv, ctx, hd, s)
    whole = KVCache(1, nkv, ctx, hd, s)
    whole.layer(0).reserve(ctx)
    lay = grown.layer(0)
    assert lay.capacity == GROW_ROWS and whole.layer(0).capacity == ctx
    assert grown.nbytes * ctx == whole.nbytes * GROW_ROWS == grown.full_nbytes * GROW_ROWS
    k = rng.standard_normal((ctx, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((ctx, nkv, hd)).astype(np.float32)
    pos, caps = 0, []
    for t in [200, 55, 1, 1, 300]:  # to the room's last row, the first past it, then past double the room
        q = rng.standard_normal((t, nh, hd)).astype(np.float32)
        outs = []
        for c in (grown, whole):
            dispatch.kv_write(c.layer(0), k[pos : pos + t], v[pos : pos + t], pos)
            outs.append(dispatch.attention(q, c.layer(0), pos, 0.3))
        assert np.array_equal(outs[0], outs[1])
        pos += t
        caps.append(lay.capacity)
    assert caps == [256, 256, 256, 512, 1024]
    # a batched decode step whose sequences cross the room's end
    other = KVCache(1, nkv, ctx, hd, s)
    dispatch.kv_write(other.layer(0), k[:256], v[:256], 0)
    q = rng.standard_normal((2, nh, hd)).astype(np.float32)
    layers = [grown.layer(0), other.layer(0)]
    dispatch.rope_qk_kv_write_steps(q[:, :, :0], k[pos : pos + 2], v[pos : pos + 2], np.zeros((ctx, 0), np.float32),
                                    np.zeros((ctx, 0), np.float32), layers, [pos, 256])  # fmt: skip
    assert other.layer(0).capacity == 512 and grown.layer(0).capacity == 1024
    dispatch.kv_write(whole.layer(0), k[pos : pos + 1], v[pos : pos + 1], pos)  # what the step wrote (no RoPE)
    np.testing.assert_array_equal(grown.keys(0, pos + 1), whole.keys(0, pos + 1))
    np.testing.assert_array_equal(grown.values(0, pos + 1), whole.values(0, pos + 1))
    dispatch.kv_write(whole.layer(0), k[pos + 1 : pos + 2], v[pos + 1 : pos + 2], 256)
    np.testing.assert_array_equal(other.keys(0, 257)[:, 256], whole.keys(0, 257)[:, 256])
    lay.reserve(ctx)
    assert lay.capacity == ctx  # (not a multiple of GROW_ROWS: the context's end)
    with pytest.raises(ValueError, match="beyond"):
        lay.reserve(ctx + 1)
    copy = KVCache(1, nkv, ctx, hd, s)
    copy.copy_prefix(grown, 600)
    assert copy.layer(0).capacity == 768  # 600 rounded up to a multiple of GROW_ROWS (more than double 256)
    np.testing.assert_array_equal(copy.keys(0, 600), grown.keys(0, 600))


@pytest.mark.parametrize("spec", ["32", "16", "8", "k8,v4"])
def test_sliding_window_ring_matches_full_cache(spec):
    """A sliding-window layer keeps its window plus RING_TOKENS positions in a ring (position p in row p % rows);
    attention over the ring, decoding and prompt passes, long after it wrapped, equals attention over a cache of the
    whole context."""
    from lowbit.kernels.kv_cache import RING_TOKENS

    s = KVSpec.parse(spec)
    rng = np.random.default_rng(5)
    nh, nkv, hd, ctx, w = 4, 2, 32, 1600, 40
    ring = KVCache(1, nkv, ctx, hd, s, windows=[w])
    full = KVCache(1, nkv, ctx, hd, s)
    assert ring.rows == [w + RING_TOKENS - 1] and ring.nbytes * ctx == full.full_nbytes * ring.rows[0]
    k = rng.standard_normal((ctx, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((ctx, nkv, hd)).astype(np.float32)
    pos = 0
    for t in [300, 512, 1, 1, 200, 512, 7]:  # prompt chunks and single steps, past two wraps of the ring
        q = rng.standard_normal((t, nh, hd)).astype(np.float32)
        outs = []
        for c in (ring, full):
            dispatch.kv_write(c.layer(0), k[pos : pos + t], v[pos : pos + t], pos)
            outs.append(dispatch.attention(q, c.layer(0), pos, 0.3, w))
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        pos += t
    assert pos > 2 * ring.rows[0] and full.layer(0).capacity >= pos and ring.layer(0).capacity == ring.rows[0]
    assert ring.can_rewind(pos, pos - RING_TOKENS) and not ring.can_rewind(pos, pos - RING_TOKENS - 1)
    assert full.can_rewind(pos, 0)


def test_cli_kv_bits(tmp_path):
    """--kv-bits on generate and eval: a quantized cache runs; eval against the same model with a float32 cache
    measures what the cache alone costs (exactly 0 for a float32 cache); bad values are one-line errors."""
    import json

    from lbtest import DEV_EVAL, TOY_MODEL, assert_clean_error, run_cli

    res = run_cli("generate", TOY_MODEL, "--raw", "-p", "Once upon a time", "-n", "8", "--kv-bits", "k8,v4")
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    kl = {}
    for bits in ("32", "16", "4"):
        res = run_cli("eval", TOY_MODEL, "--text", DEV_EVAL, "--eval-ctx", "128", "--max-tokens", "254", "--kv-bits",
                      bits, "--reference", TOY_MODEL, "--json")
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["kv_cache"] == KVSpec.parse(bits).label
        kl[bits] = out["kl_mean"]
    assert kl["32"] == 0.0 and 0.0 < kl["16"] < 1e-4 < kl["4"]
    for cmd in (["generate", TOY_MODEL, "-p", "hi"], ["eval", TOY_MODEL, "--text", DEV_EVAL], ["bench", "--shape",
                "smollm2-135m"]):
        assert_clean_error(run_cli(*cmd, "--kv-bits", "7"), "--kv-bits")


def test_compare_kv_option():
    from lowbit.runtime.measure.configs import parse_configs

    rows = parse_configs("f16,f16:kv=8,rtn:4:g64:kv=k8v4,mixed:3bpw:kv=4,rtn:4:g64")
    assert [(c.label, c.kv) for c in rows] == [
        ("f16", "f16"), ("f16:kv=8", "q8"), ("rtn:4:g64:kv=k8v4", "k8,v4"), ("mixed:3bpw:kv=4", "q4"),
        ("rtn:4:g64", "f16")]
    assert rows[1].opts == rows[0].opts and rows[2].opts == rows[4].opts  # one conversion each
    for bad in ("rtn:4:kv=7", "f16:kv=2", "rtn:4:kv=8:kv=4"):
        with pytest.raises(LowbitError):
            parse_configs(bad)
