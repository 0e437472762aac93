"""16-bit float weights (float16, bfloat16) kept as stored (kernels/cpu_half.py): every product path and the
embedding against numpy over the widened matrix, a few tokens bit for bit as each alone, and no float32 copy."""

import numpy as np
import pytest

from lowbit.formats.qtypes import REGISTRY
from lowbit.formats.reader import StoredTensor
from lowbit.kernels import dispatch, ref


def _half(kind: str, rows: int, cols: int, seed: int) -> tuple[dispatch.Weight, np.ndarray]:
    """A weight of float16 or bfloat16 bits and its float32 value."""
    f = (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.5).astype(np.float32)
    if kind == "f16":
        f[0, :3] = [6e-8, -3e-6, 65504.0]  # a subnormal, a small normal, the largest float16
        data = f.astype(np.float16)
        dense = data.astype(np.float32)
    else:
        data = (f.view(np.uint32) >> 16).astype(np.uint16)
        dense = ref.bf16_to_f32(data)
    return dispatch.Weight(StoredTensor("w", REGISTRY[kind], (rows, cols), {"data": data})), dense


@pytest.mark.parametrize("kind", ["f16", "bf16"])
@pytest.mark.parametrize("rows,cols", [(37, 75), (64, 128), (5, 2048)])
@pytest.mark.parametrize("t", [1, 3, 8, 12, 40])
def test_products_match_the_widened_matrix(kind, rows, cols, t):
    w, dense = _half(kind, rows, cols, seed=rows + cols + t)
    assert w.h16.dtype == np.uint16 and w.f32 is None and w.h16.nbytes == rows * cols * 2  # never widened at load
    x = np.random.default_rng(t).standard_normal((t, cols)).astype(np.float32)
    want = x.astype(np.float64) @ dense.T.astype(np.float64)
    for prompt in (False, True):
        got = dispatch.linear(w, x, prompt)
        if w.bf16_dot:  # bfloat16 activations where the CPU has the pair dot product: tests/test_bf16_gemm.py
            assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()
            continue
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    dispatch.exact_activations(w)  # float32 activations on every path
    np.testing.assert_allclose(dispatch.linear(w, x, True), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_a_few_tokens_get_each_lone_tokens_numbers(kind):
    """A decode pass of several sequences: each row of the few-token product equals its one-token product."""
    w, _ = _half(kind, 45, 576, seed=3)
    x = np.random.default_rng(4).standard_normal((6, 576)).astype(np.float32)
    few = dispatch.linear(w, x)
    for t in range(6):
        np.testing.assert_array_equal(few[t], dispatch.linear(w, x[t : t + 1])[0])


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_embedding_rows_are_exact(kind):
    w, dense = _half(kind, 50, 24, seed=5)
    ids = np.array([3, 0, 49, 3])
    np.testing.assert_array_equal(dispatch.embed(w, ids), dense[ids])
