"""Random-sign block Hadamard transform of input channels (incoherence processing), numba kernel + numpy reference.

For a row length ``n`` (a weight's ``cols``) the block size is derived from ``n`` alone::

    b = min(largest power of two dividing n, MAX_BLOCK)

so ``n = 1536`` uses ``b = 512``, ``n = 4096`` one block of 4096, ``n = 14336`` blocks of 2048. With ``H_b`` the
Sylvester Hadamard matrix of order ``b`` (``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``; symmetric, entries
±1) and ``s`` the stored signs (±1, length ``n``), the transform of a vector ``x[n]`` is

    R x = blockdiag(H_b, ..., H_b) / sqrt(b) · diag(s) · x

R is orthogonal (``R⁻¹ = Rᵀ = diag(s) · blockdiag(H_b) / sqrt(b)``). A weight stored "rotated" is ``W' = W Rᵀ``,
i.e. every row of ``W`` transformed by R; at run time the activations are transformed the same way, ``x' = R x``,
and ``W' x' = W x``.

The kernel transforms the rows of ``x[T, n]`` in place with an iterative fast Walsh–Hadamard transform:
``n · log2(b)`` additions per row and one multiply by ``s / sqrt(b)`` (before the butterflies for R, after them for
Rᵀ). It works for float32 (run time) and float64 (Hessians at conversion).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from lowbit.errors import FormatError
from lowbit.kernels.cpu import JIT

MAX_BLOCK = 4096  # cap on the Hadamard block size (part of the container format: see formats/SPEC.md)


def block_size(n: int) -> int:
    """The Hadamard block size for rows of ``n`` elements (``n >= 1``)."""
    if n < 1:
        raise FormatError(f"a Hadamard transform needs at least one column, got {n}")
    return min(n & -n, MAX_BLOCK)


@nb.njit(inline="always", **JIT)
def _radix8(row, j0):
    """The first three butterfly stages (h = 1, 2, 4) on row[j0 : j0 + 8], in registers."""
    a0, a1, a2, a3 = row[j0], row[j0 + 1], row[j0 + 2], row[j0 + 3]
    a4, a5, a6, a7 = row[j0 + 4], row[j0 + 5], row[j0 + 6], row[j0 + 7]
    b0, b1, b2, b3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
    b4, b5, b6, b7 = a4 + a5, a4 - a5, a6 + a7, a6 - a7
    c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
    c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
    row[j0], row[j0 + 1], row[j0 + 2], row[j0 + 3] = c0 + c4, c1 + c5, c2 + c6, c3 + c7
    row[j0 + 4], row[j0 + 5], row[j0 + 6], row[j0 + 7] = c0 - c4, c1 - c5, c2 - c6, c3 - c7


@nb.njit(**JIT)
def fwht_rows(x, d, block, inverse):
    """x[T, n] <- R x (inverse=False) or Rᵀ x (inverse=True) row by row, in place. d[n]: signs / sqrt(block) in
    x's dtype (see :func:`scaled_signs`); block: a power of two dividing n.

    Stages h = 1, 2, 4 run as one radix-8 pass in registers; each later stage pairs the contiguous halves of every
    aligned 2h-chunk (a chunk never crosses a block since 2h <= block), an inner loop LLVM vectorises."""
    t, n = x.shape
    for i in range(t):
        row = x[i]
        if not inverse:
            for j in range(n):
                row[j] *= d[j]
        h = 1
        if block >= 8:
            for j0 in range(0, n, 8):
                _radix8(row, j0)
            h = 8
        while h < block:
            for j0 in range(0, n, 2 * h):
                lo = row[j0 : j0 + h]
                hi = row[j0 + h : j0 + 2 * h]
                for j in range(h):
                    a = lo[j]
                    c = hi[j]
                    lo[j] = a + c
                    hi[j] = a - c
            h *= 2
        if inverse:
            for j in range(n):
                row[j] *= d[j]


def scaled_signs(signs: np.ndarray, dtype=np.float32) -> np.ndarray:
    """The kernel's ``d = signs / sqrt(b)`` for rows of ``len(signs)`` elements."""
    s = np.asarray(signs, dtype=np.float64)
    return np.ascontiguousarray(s / math.sqrt(block_size(len(s))), dtype=dtype)


def check_signs(signs: np.ndarray, n: int, what: str = "signs") -> np.ndarray:
    """``signs`` as a contiguous float32 vector of ±1 of length ``n``, or FormatError naming ``what``."""
    s = np.asarray(signs)
    if s.ndim != 1 or s.shape[0] != n:
        raise FormatError(f"{what}: expected {n} Hadamard signs, got shape {tuple(s.shape)}")
    s = np.ascontiguousarray(s, dtype=np.float32)
    if not np.all(np.abs(s) == 1.0):
        raise FormatError(f"{what}: Hadamard signs must all be +1 or -1")
    return s


def transform_inplace(x: np.ndarray, signs: np.ndarray, inverse: bool = False) -> None:
    """Rows of the C-contiguous float32/float64 ``x[T, n]`` <- R row (or Rᵀ row when ``inverse``)."""
    if x.ndim != 2 or not x.flags.c_contiguous or x.dtype not in (np.float32, np.float64):
        raise FormatError(f"Hadamard transform needs a C-contiguous 2-D float array, got {x.dtype}{x.shape}")
    if len(signs) != x.shape[1]:
        raise FormatError(f"Hadamard transform: {len(signs)} signs for rows of {x.shape[1]} elements")
    fwht_rows(x, scaled_signs(signs, x.dtype), block_size(x.shape[1]), inverse)


# ------------------------------------------------------------------------------------------------ reference


def sylvester(b: int) -> np.ndarray:
    """The Sylvester Hadamard matrix of order ``b`` (a power of two), entries ±1, float64."""
    if b < 1 or b & (b - 1):
        raise FormatError(f"Sylvester Hadamard order must be a power of two, got {b}")
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h


def reference_matrix(signs: np.ndarray) -> np.ndarray:
    """R as an explicit float64 ``[n, n]`` matrix (for tests; O(n²) memory)."""
    n = len(signs)
    b = block_size(n)
    hb = sylvester(b) / np.sqrt(b)
    r = np.zeros((n, n))
    for b0 in range(0, n, b):
        r[b0 : b0 + b, b0 : b0 + b] = hb
    return r * np.asarray(signs, dtype=np.float64)[None, :]


def reference_transform(x: np.ndarray, signs: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Obviously-correct numpy: rows of ``x[T, n]`` times Rᵀ (i.e. R·row), or times R for the inverse; float64."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[1]
    b = block_size(n)
    hb = sylvester(b) / np.sqrt(b)
    s = np.asarray(signs, dtype=np.float64)
    if inverse:
        return (x.reshape(-1, n // b, b) @ hb).reshape(x.shape) * s
    return ((x * s).reshape(-1, n // b, b) @ hb).reshape(x.shape)
