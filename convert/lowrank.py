"""Low-rank correction of the quantization error, stored as two small float16 factors.

For a weight ``W[rows, cols]`` stored as ``Ŵ`` (what the runtime multiplies by: the dequantized codes), the error
``E = W − Ŵ`` is approximated by ``B A`` with ``A[r, cols]`` (container ``<name>.lr_a``) and ``B[rows, r]``
(``<name>.lr_b``); the runtime computes ``y = Ŵ x + B (A x)``. When the weight is stored rotated (``<name>.had``),
everything lives in the rotated basis: ``W`` and ``Ŵ`` are the rotated matrices and ``x`` the rotated activations.

The error that matters is the error of the output, ``E x``; with a per-input-channel activation scale
``a_j = sqrt(mean x_j²)`` (from calibration) the factors come from the truncated SVD of ``E · diag(a)``, unscaled
afterwards — the best rank-r fit in that weighted Frobenius norm (Eckart–Young):
``‖(E − B A) diag(a)‖² = Σ_{i>r} σ_i²`` with ``σ`` the singular values of ``E diag(a)``.

Each rank-1 term costs ``16 · (rows + cols)`` bits. :func:`choose_ranks` spends a total bit budget greedily where one
more rank removes the most squared (scaled) error per bit; :func:`rank_for_budget` is the uniform alternative (the
same bits per weight in every tensor).
"""

from __future__ import annotations

import heapq
import logging

import numpy as np

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

BITS_PER_ELEMENT = 16  # factors are stored as float16
SCALE_FLOOR = 1e-3  # activation scales are floored at this fraction of their mean (A is divided by them)
EXACT_SVD_DIM = 1024  # up to this smaller dimension (or a rank of a quarter of it) the SVD is exact, else randomized
OVERSAMPLE = 16
POWER_ITERS = 4
F16_MAX = float(np.finfo(np.float16).max)


def rank_cost_bits(shape: tuple[int, int]) -> int:
    """Bits one rank-1 term of a ``[rows, cols]`` weight costs (a column of B plus a row of A, float16)."""
    rows, cols = shape
    return BITS_PER_ELEMENT * (rows + cols)


def rank_for_budget(shape: tuple[int, int], bpw: float) -> int:
    """The largest rank whose factors fit in ``bpw`` extra bits per weight of a ``[rows, cols]`` tensor."""
    rows, cols = shape
    if bpw <= 0:
        return 0
    return int(min(rows, cols, (bpw * rows * cols) // rank_cost_bits(shape)))


def _check_scale(act_scale, cols: int) -> np.ndarray | None:
    if act_scale is None:
        return None
    a = np.asarray(act_scale, dtype=np.float64)
    if a.shape != (cols,):
        raise LowbitError(f"act_scale has shape {list(a.shape)}, expected [{cols}]")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise LowbitError("act_scale must be finite and non-negative")
    mean = float(a.mean())
    if mean <= 0:
        return None  # no activation seen: unweighted
    return np.maximum(a, SCALE_FLOOR * mean)


def _scaled_error(w: np.ndarray, w_hat: np.ndarray, act_scale) -> tuple[np.ndarray, np.ndarray | None]:
    w = np.asarray(w)
    w_hat = np.asarray(w_hat)
    if w.ndim != 2 or w.shape != w_hat.shape:
        raise LowbitError(f"w and w_hat must be 2-D of one shape, got {list(w.shape)} and {list(w_hat.shape)}")
    dtype = np.result_type(w.dtype, w_hat.dtype, np.float32)  # float32 weights: float32 SVD (memory of big ones)
    e = w.astype(dtype) - w_hat.astype(dtype)
    if not np.all(np.isfinite(e)):
        raise LowbitError("the quantization error contains NaN or infinite values")
    a = _check_scale(act_scale, w.shape[1])
    return (e if a is None else e * a.astype(dtype)[None, :]), a


def top_svd(m: np.ndarray, k: int, seed: int = 0, exact: bool | None = None):
    """The ``k`` leading singular triplets ``(U[:, :k], s[:k], Vt[:k])`` of ``m``: exact SVD for small matrices,
    else a randomized range finder (``OVERSAMPLE`` extra vectors, ``POWER_ITERS`` power iterations)."""
    small = min(m.shape)
    k = min(k, small)
    if exact is None:
        exact = small <= EXACT_SVD_DIM or 4 * k >= small
    if exact:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        return u[:, :k], s[:k], vt[:k]
    rng = np.random.default_rng(seed)
    p = min(small, k + OVERSAMPLE)
    q, _ = np.linalg.qr(m @ rng.standard_normal((m.shape[1], p)))
    for _ in range(POWER_ITERS):
        z, _ = np.linalg.qr(m.T @ q)
        q, _ = np.linalg.qr(m @ z)
    ub, s, vt = np.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vt[:k]


def error_spectrum(w: np.ndarray, w_hat: np.ndarray, *, act_scale=None, max_rank: int | None = None) -> np.ndarray:
    """Singular values (descending, float64) of the scaled error ``(W − Ŵ) diag(a)``: all of them, or the leading
    ``max_rank`` (what :func:`choose_ranks` needs)."""
    e, _ = _scaled_error(w, w_hat, act_scale)
    if max_rank is None:
        return np.linalg.svd(e, compute_uv=False)
    return top_svd(e, max_rank)[1]


def lowrank_correction(w: np.ndarray, w_hat: np.ndarray, *, rank: int, act_scale=None) -> tuple[np.ndarray, np.ndarray]:
    """float16 factors ``(A[rank, cols], B[rows, rank])`` with ``B @ A ≈ W − Ŵ`` (best in the act_scale-weighted
    Frobenius norm). The singular values are split evenly (``√σ`` into each factor) to keep both in float16 range."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise LowbitError(f"lowrank_correction needs a 2-D weight, got shape {list(w.shape)}")
    rows, cols = w.shape
    if not 1 <= int(rank) <= min(rows, cols):
        raise LowbitError(f"rank must be in 1..{min(rows, cols)} for a {rows}x{cols} weight, got {rank}")
    e, a = _scaled_error(w, w_hat, act_scale)
    u, s, vt = (x.astype(np.float64) for x in top_svd(e, int(rank)))
    root = np.sqrt(s)
    b = u * root[None, :]
    av = vt * root[:, None]
    if a is not None:
        av = av / a[None, :]
    big = max(float(np.abs(av).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    if big > F16_MAX:
        raise LowbitError(f"low-rank factors exceed the float16 range (max |value| {big:.3g})")
    return av.astype(np.float16), b.astype(np.float16)


def choose_ranks(
    spectra: dict[str, np.ndarray],
    budget_bits: float,
    shapes: dict[str, tuple[int, int]],
    max_rank: int | None = None,
) -> dict[str, int]:
    """Ranks per tensor within ``budget_bits`` extra bits in total.

    ``spectra``: name -> singular values of that tensor's scaled error (descending; an error matrix is accepted too
    and decomposed here). Rank ``k`` of tensor ``t`` removes ``σ_k²`` of squared error and costs
    ``16·(rows+cols)`` bits; the next rank of whichever tensor removes the most error per bit is taken while it
    fits (a tensor whose next rank does not fit stops growing, cheaper ones may continue). Returns every name, 0 for
    tensors that get no correction. ``max_rank`` caps every tensor's rank."""
    if budget_bits < 0:
        raise LowbitError(f"budget_bits must be non-negative, got {budget_bits}")
    sq: dict[str, np.ndarray] = {}
    for name, spec in spectra.items():
        if name not in shapes:
            raise LowbitError(f"choose_ranks: no shape for {name!r}")
        v = np.asarray(spec, dtype=np.float64)
        if v.ndim == 2:
            v = np.linalg.svd(v, compute_uv=False)
        elif v.ndim != 1:
            raise LowbitError(f"choose_ranks: {name!r} needs singular values or an error matrix")
        v = np.sort(np.abs(v))[::-1]
        limit = min(len(v), *shapes[name])
        sq[name] = (v**2)[: limit if max_rank is None else min(limit, max_rank)]
    ranks = dict.fromkeys(spectra, 0)
    heap = [(-sq[n][0] / rank_cost_bits(shapes[n]), n) for n in sq if len(sq[n]) and sq[n][0] > 0]
    heapq.heapify(heap)
    left = float(budget_bits)
    while heap:
        _, name = heapq.heappop(heap)
        cost = rank_cost_bits(shapes[name])
        if cost > left:
            continue
        left -= cost
        ranks[name] += 1
        k = ranks[name]
        if k < len(sq[name]) and sq[name][k] > 0:
            heapq.heappush(heap, (-sq[name][k] / cost, name))
    log.debug("low-rank ranks %s (%.0f of %.0f bits left)", ranks, left, budget_bits)
    return ranks
