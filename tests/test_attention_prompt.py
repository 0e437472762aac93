"""The blocked prompt attention kernel (kernels/cpu_attention_prompt.py) against the numpy reference over the decoded
cache, for every cache format, head dims that fill no whole vector, windows and soft-capping; and a query's numbers
bit for bit the same however its prompt is cut into passes."""

import numpy as np
import pytest

from lowbit.kernels import dispatch, ref
from lowbit.kernels.cpu_attention_prompt import QUERY_BLOCK
from lowbit.kernels.kv_cache import KVCache
from lowbit.kernels.kv_formats import KVSpec

SPECS = ["32", "16", "8", "4", "k8,v4"]


def _cache(spec: str, hd: int, nkv: int, ctx: int, seed: int) -> KVCache:
    rng = np.random.default_rng(seed)
    cache = KVCache(1, nkv, ctx, hd, KVSpec.parse(spec))
    k = (rng.standard_normal((ctx, nkv, hd)) * 1.5).astype(np.float32)
    v = rng.standard_normal((ctx, nkv, hd)).astype(np.float32)
    dispatch.kv_write(cache.layer(0), k, v, 0)
    return cache


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("hd", [20, 64, 96])
@pytest.mark.parametrize(
    "t,start,window,cap",
    [(1, 0, 0, 0.0), (1, 37, 0, 0.0), (QUERY_BLOCK + 3, 0, 0, 0.0), (2 * QUERY_BLOCK + 5, 61, 0, 0.0),
     (40, 90, 17, 0.0), (23, 5, 0, 3.0), (37, 120, 50, 2.0)],
)  # fmt: skip
def test_prompt_attention_matches_reference(spec, hd, t, start, window, cap):
    """One query or several blocks of them (one block's last keys not a whole vector), at the start of the cache or
    after a prefix, with windows that begin inside a block and soft-capped scores: the reference attention over
    the decoded cache, for every cache format."""
    nh, nkv = 6, 2
    cache = _cache(spec, hd, nkv, start + t + 3, seed=hd + t + start)
    q = (np.random.default_rng(t).standard_normal((t, nh, hd)) * 2).astype(np.float32)
    got = dispatch.attention(q, cache.layer(0), start, 0.3, window, cap, prompt=True)
    ctx = cache.k[0].shape[1]
    want = ref.attention(q, cache.keys(0, ctx), cache.values(0, ctx), start, scale=0.3, window=window, softcap=cap)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("spec,hd,window,cap", [("16", 64, 0, 0.0), ("4", 64, 0, 0.0), ("32", 20, 0, 0.0),
                                                ("k8,v4", 64, 21, 2.5), ("16", 96, 0, 0.0)])  # fmt: skip
def test_a_query_gets_the_same_numbers_however_the_prompt_is_cut(spec, hd, window, cap):
    """A prompt in one pass, and the same prompt in passes of 7, 16, 1, 3 and 23 tokens (each after the cached
    earlier ones): every query's output equal bit for bit (the chat cache's guarantee rests on it)."""
    nh, nkv, t = 8, 2, 50
    rng = np.random.default_rng(hd)
    k = rng.standard_normal((t, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((t, nkv, hd)).astype(np.float32)
    q = rng.standard_normal((t, nh, hd)).astype(np.float32)
    whole = KVCache(1, nkv, t, hd, KVSpec.parse(spec))
    dispatch.kv_write(whole.layer(0), k, v, 0)
    want = dispatch.attention(q, whole.layer(0), 0, 0.125, window, cap, prompt=True)
    cut = KVCache(1, nkv, t, hd, KVSpec.parse(spec))
    parts, pos = [], 0
    for n in (7, 16, 1, 3, 23):
        dispatch.kv_write(cut.layer(0), k[pos : pos + n], v[pos : pos + n], pos)
        parts.append(dispatch.attention(q[pos : pos + n], cut.layer(0), pos, 0.125, window, cap, prompt=True))
        pos += n
    np.testing.assert_array_equal(np.concatenate(parts), want)

