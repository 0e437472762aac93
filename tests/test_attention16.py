"""Decode attention on a float16 cache through kernels.ir.attn16 (head dim 64, up to four query heads per key/value
head): the intrinsics against numpy, and the decode kernels against the reference for every grouping of heads
(1-4 take the intrinsics, 6 the generic helpers), key counts that leave a tail, split chunks and soft-capping."""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest

from lowbit.kernels import cpu_attention, ref
from lowbit.kernels import ref_intrinsics as twin
from lowbit.kernels.ir.attn16 import scores16x4, values16x4


@nb.njit
def _scores(sc, soff, m, q4, k, koff, scale):
    scores16x4(sc, soff, m, q4, k, koff, scale)


@nb.njit
def _values(dst4, p, m, v, voff, n):
    values16x4(dst4, p, m, v, voff, n)


def test_intrinsics_match_their_twins():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((20, 64)).astype(np.float16).view(np.uint16).ravel()
    q4 = rng.standard_normal((4, 64)).astype(np.float32)
    m = 12
    sc = np.full((4, m), 7.0, np.float32)
    want = twin.scores16x4(sc, 4, m, q4, k, 3 * 64, 0.5)
    _scores(sc, 4, m, q4, k, 3 * 64, np.float32(0.5))
    np.testing.assert_allclose(sc, want, rtol=1e-5, atol=1e-5)
    assert (sc[:, :4] == 7.0).all() and (sc[:, 8:] == 7.0).all()  # nothing else written
    p = rng.random((4, m)).astype(np.float32)
    dst = rng.standard_normal((4, 64)).astype(np.float32)
    want = twin.values16x4(dst, p, m, k, 2 * 64, 9)
    _values(dst, p, m, k, 2 * 64, 9)
    np.testing.assert_allclose(dst, want, rtol=1e-5, atol=1e-5)


def test_a_score_does_not_depend_on_the_keys_beside_it():
    rng = np.random.default_rng(1)
    k16 = rng.standard_normal((8, 64)).astype(np.float16)
    q4 = rng.standard_normal((4, 64)).astype(np.float32)
    a = np.zeros((4, 4), np.float32)
    b = np.zeros((4, 4), np.float32)
    _scores(a, 0, 4, q4, k16.view(np.uint16).ravel(), 0, np.float32(1.0))
    other = k16.copy()
    other[1:4] = rng.standard_normal((3, 64)).astype(np.float16)
    _scores(b, 0, 4, q4, other.view(np.uint16).ravel(), 0, np.float32(1.0))
    np.testing.assert_array_equal(a[:, 0], b[:, 0])


@pytest.mark.parametrize("nh,nkv", [(4, 4), (8, 4), (6, 2), (8, 2), (12, 2)])
@pytest.mark.parametrize("start,chunk,cap", [(0, 128, 0.0), (6, 128, 0.0), (130, 128, 0.0), (301, 37, 0.0),
                                             (301, 37, 2.5)])  # fmt: skip
def test_float16_decode_matches_reference(nh, nkv, start, chunk, cap):
    rng = np.random.default_rng(nh * 100 + start)
    hd, ctx = 64, 320
    q = (rng.standard_normal((1, nh, hd)) * 2).astype(np.float32)
    k = rng.standard_normal((nkv, ctx, hd)).astype(np.float16)
    v = rng.standard_normal((nkv, ctx, hd)).astype(np.float16)
    ks = np.zeros((nkv, ctx, 0), np.uint16)
    want = ref.attention(q, k.astype(np.float32), v.astype(np.float32), start, scale=0.125, softcap=cap)
    got = np.empty_like(q)
    args = (got, q, k.view(np.uint16), ks, v.view(np.uint16), ks, start, np.float32(0.125), 0, np.float32(cap))
    if start + 1 > chunk:
        cpu_attention.attention_decode(*args, chunk)
    else:
        cpu_attention.attention(*args)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)

