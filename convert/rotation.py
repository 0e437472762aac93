"""Incoherence processing: a random-sign block Hadamard rotation of a weight's input channels.

The transform R (defined in :mod:`lowbit.kernels.hadamard`; block size derived from the column count) is orthogonal,
so a weight can be stored as ``W' = W Rᵀ`` and applied to ``x' = R x`` at run time: ``W' x' = W x``. The rotation
spreads outlier input channels over a whole block, which makes the rows easier to quantize. In the container the
signs are stored as ``<name>.had`` (float16, ±1) next to ``<name>.weight`` (formats/SPEC.md); the runtime
(``kernels.dispatch.linear``) transforms the activations with a fast Walsh–Hadamard transform.

For calibrated methods the statistics rotate with the weight: with ``H = Σ x xᵀ`` the rotated input has
``H' = Σ x' x'ᵀ = R H Rᵀ`` (:func:`rotate_hessian`), so GPTQ runs on ``(W', H')`` and a per-channel activation scale
for the rotated weight is ``sqrt(diag(H'))``.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError
from lowbit.kernels import hadamard


def random_signs(n: int, seed: int) -> np.ndarray:
    """``n`` random ±1 signs (float32) from a seeded generator."""
    if n < 1:
        raise LowbitError(f"need at least one column to rotate, got {n}")
    rng = np.random.default_rng(seed)
    return np.where(rng.integers(0, 2, size=n) == 1, 1.0, -1.0).astype(np.float32)


def _signs_for(n: int, seed_or_signs) -> np.ndarray:
    if isinstance(seed_or_signs, (int, np.integer)):
        return random_signs(n, int(seed_or_signs))
    s = np.asarray(seed_or_signs)
    if s.ndim != 1 or s.shape[0] != n or not np.all(np.abs(s) == 1):
        raise LowbitError(f"expected a seed or {n} signs of +1/-1, got {s.dtype}{list(s.shape)}")
    return s.astype(np.float32)


def _rows(x: np.ndarray, dtype) -> np.ndarray:
    if x.ndim not in (1, 2):
        raise LowbitError(f"expected a vector or a matrix, got shape {list(x.shape)}")
    return np.array(np.atleast_2d(x), dtype=dtype, order="C", copy=True)


def transform(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``R x`` for every row x of ``x[..., n]`` (1-D or 2-D; float64 stays float64, anything else -> float32)."""
    x = np.asarray(x)
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    out = _rows(x, dtype)
    hadamard.transform_inplace(out, _signs_for(out.shape[1], signs))
    return out.reshape(x.shape)


def inverse_transform(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``Rᵀ x`` for every row x of ``x[..., n]`` (undoes :func:`transform`)."""
    x = np.asarray(x)
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    out = _rows(x, dtype)
    hadamard.transform_inplace(out, _signs_for(out.shape[1], signs), inverse=True)
    return out.reshape(x.shape)


def rotate_weight(w: np.ndarray, seed_or_signs) -> tuple[np.ndarray, np.ndarray]:
    """``(W' = W Rᵀ, signs)`` for ``w[rows, cols]``: every row transformed by R. ``seed_or_signs``: an int seed for
    :func:`random_signs` or the signs themselves. W' is float32 (float64 when ``w`` is)."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise LowbitError(f"rotate_weight needs a 2-D weight, got shape {list(w.shape)}")
    signs = _signs_for(w.shape[1], seed_or_signs)
    return transform(w, signs), signs


def unrotate_weight(w_rot: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``W = W' R`` (e.g. a dequantized rotated weight back in the original basis)."""
    return inverse_transform(w_rot, signs)


def rotate_hessian(h: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``H' = R H Rᵀ`` for ``h[n, n]`` (the statistics of ``x' = R x``); keeps float64."""
    h = np.asarray(h)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise LowbitError(f"rotate_hessian needs a square matrix, got shape {list(h.shape)}")
    dtype = np.float64 if h.dtype == np.float64 else np.float32
    s = _signs_for(h.shape[0], signs)
    out = _rows(h, dtype)  # rows of H -> rows of H Rᵀ
    hadamard.transform_inplace(out, s)
    out = np.ascontiguousarray(out.T)  # (H Rᵀ)ᵀ = R Hᵀ; its rows -> R Hᵀ Rᵀ = (R H Rᵀ)ᵀ
    hadamard.transform_inplace(out, s)
    return np.ascontiguousarray(out.T)


def block_size(cols: int) -> int:
    """The Hadamard block size the runtime uses for ``cols`` input channels (1 means a sign flip only)."""
    return hadamard.block_size(cols)


def extra_tensors(name: str, *, signs: np.ndarray | None = None, lowrank=None) -> dict[str, np.ndarray]:
    """The container tensors stored next to ``<name>.weight`` (``name`` without ``.weight``): ``<name>.had`` for
    rotation signs and ``<name>.lr_a``/``<name>.lr_b`` for a low-rank pair ``(A[r, cols], B[rows, r])``, all float16
    (store them as qtype ``f16`` with one part ``data``)."""
    name = name.removesuffix(".weight")
    out = {}
    if signs is not None:
        out[f"{name}.had"] = np.asarray(signs, dtype=np.float16)
    if lowrank is not None:
        a, b = lowrank
        out[f"{name}.lr_a"] = np.ascontiguousarray(a, dtype=np.float16)
        out[f"{name}.lr_b"] = np.ascontiguousarray(b, dtype=np.float16)
    return out
