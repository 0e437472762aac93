"""A decode step of several sequences in one kernel call per layer (kernels/cpu_attention_batch.py): RoPE, the cache
write and attention of each sequence equal the one-sequence kernels' bit for bit, in every cache format, with
sliding windows (rings that wrapped), soft-capping, partial RoPE, lengths on both sides of the split-decode chunk;
and a batched decode pass of a model equals its lone decode steps where the weights are not packed."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.kernels import dispatch, ref
from lowbit.kernels.kv_cache import KVCache
from lowbit.kernels.kv_formats import KVSpec
from lowbit.models.common import rope_inv_freq, rope_tables

STARTS = [0, 700, 5, 129, 128, 127, 64, 17]  # the new tokens' positions (beyond DECODE_CHUNK = 128: split; 700: a
# sliding window's ring has wrapped)


def _sequences(spec: str, n: int, hd: int, window: int, ctx: int, rng):
    """n one-layer caches holding random keys/values before their STARTS position."""
    caches = []
    nkv = 2
    for b in range(n):
        c = KVCache(1, nkv, ctx, hd, KVSpec.parse(spec), windows=[window])
        start = STARTS[b]
        # prompt passes of at most a ring's worth of positions, as the model writes them
        for p in range(0, start, 200):
            t = min(200, start - p)
            k = rng.standard_normal((t, nkv, hd)).astype(np.float32)
            v = rng.standard_normal((t, nkv, hd)).astype(np.float32)
            dispatch.kv_write(c.layer(0), k, v, p)
        caches.append(c)
    return caches


def _copy(cache: KVCache, window: int) -> KVCache:
    lay = cache.layer(0)
    out = KVCache(1, lay.k.shape[0], cache.ctx, cache.head_dim, cache.spec, windows=[window])
    out.layer(0).reserve(lay.capacity)
    for dst, src in zip(out.layer(0), lay):
        dst[...] = src
    return out


@pytest.mark.parametrize("spec", ["32", "16", "8", "4", "k8,v4"])
@pytest.mark.parametrize("hd,rot,window,cap", [(64, 64, 0, 0.0), (64, 32, 40, 0.0), (20, 20, 0, 2.0),
                                               (64, 64, 100, 3.0)])  # fmt: skip
@pytest.mark.parametrize("n", [1, 3, 8])
def test_a_step_of_several_sequences_is_each_ones_lone_step(spec, hd, rot, window, cap, n):
    rng = np.random.default_rng(n * 7 + hd + window)
    nh, ctx = 6, 720 if window == 0 else 1200
    caches = _sequences(spec, n, hd, window, ctx, rng)
    lone = [_copy(c, window) for c in caches]
    cos, sin = rope_tables(rope_inv_freq(rot, 10000.0, None), ctx)
    q = (rng.standard_normal((n, nh, hd)) * 2).astype(np.float32)
    k = rng.standard_normal((n, 2, hd)).astype(np.float32)
    v = rng.standard_normal((n, 2, hd)).astype(np.float32)
    starts = STARTS[:n]

    want = []
    for b, c in enumerate(lone):
        qb, kb, vb, s = q[b : b + 1].copy(), k[b : b + 1].copy(), v[b : b + 1].copy(), starts[b]
        dispatch.rope_qk_kv_write(qb[:, :, :rot], kb, vb, cos[s : s + 1], sin[s : s + 1], c.layer(0), s)
        want.append(dispatch.attention(qb, tuple(c.layer(0)), s, 0.3, window, cap))
        if not c.layer(0).ring:  # and the one-sequence kernel is the reference over the decoded cache
            keys, values = c.keys(0, s + 1), c.values(0, s + 1)
            np.testing.assert_allclose(want[-1], ref.attention(qb, keys, values, s, scale=0.3, window=window,
                                                               softcap=cap), rtol=1e-4, atol=2e-5)  # fmt: skip

    layers = [c.layer(0) for c in caches]
    dispatch.rope_qk_kv_write_steps(q[:, :, :rot], k, v, cos, sin, layers, starts)
    got = dispatch.attention_steps(q, layers, starts, 0.3, window, cap)

    for b in range(n):
        for mine, theirs in zip(caches[b].layer(0), lone[b].layer(0)):
            np.testing.assert_array_equal(mine, theirs)
        np.testing.assert_array_equal(got[b : b + 1], want[b])


def test_a_step_takes_at_most_a_small_batch_of_sequences():
    c = KVCache(1, 2, 16, 8, KVSpec.parse("16"))
    layers = [tuple(c.layer(0))] * (dispatch.SMALL_BATCH + 1)
    q = np.zeros((len(layers), 4, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="1..8 sequences"):
        dispatch.attention_steps(q, layers, [0] * len(layers), 0.3)


@pytest.mark.parametrize("kind", ["gemma3", "phi3", "qwen3"])
def test_a_batched_decode_pass_is_each_sequences_lone_step(kind, tmp_path):
    """A model's decode pass of three sequences (Segments, one token each; gemma3: sliding windows, local RoPE and
    soft-capping; phi3: partial RoPE; qwen3: q/k norms) gives each sequence the logits and cache of its lone step,
    bit for bit, with the weights unpacked (the small-batch kernel is the one-token kernel row for row)."""
    from test_families import build

    from lowbit.convert.converter import ConvertOptions, convert
    from lowbit.models.common import Segments
    from lowbit.runtime.engine import Engine

    path = convert(str(build(tmp_path / kind, kind)), tmp_path / "m.lowbit", ConvertOptions(bits=4), progress=False)
    model = Engine(path, ctx=200).model
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(3, 4096, size=n)] for n in (5, 140, 60)]
    nxt = [11, 12, 13]
    caches, lone = [model.new_cache() for _ in prompts], [model.new_cache() for _ in prompts]
    for p, c, d in zip(prompts, caches, lone):
        model.forward(np.array(p), 0, c, prompt=True)
        model.forward(np.array(p), 0, d, prompt=True)
    starts = [len(p) for p in prompts]
    batched = model.forward(np.array(nxt), None, Segments(caches, starts, [1] * 3))
    for b, (t, c, d, s) in enumerate(zip(nxt, caches, lone, starts)):
        np.testing.assert_array_equal(batched[b], model.forward(np.array([t]), s, d)[0])
        np.testing.assert_array_equal(c.keys(0, s + 1), d.keys(0, s + 1))
