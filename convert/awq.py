"""AWQ: activation-aware weight quantization (Lin et al., 2023), as pure functions on arrays.

A linear layer ``y = x W^T`` is unchanged when its input channels are rescaled, ``y = (x / s) (W diag(s))^T``, for
any positive ``s[cols]``. Quantizing ``W diag(s)`` instead of ``W`` and dividing the input by ``s`` gives the salient
input channels (those with large activations) a finer effective grid: a channel multiplied by ``s_j > 1`` has
its relative rounding error shrunk by ``s_j`` while sharing its group's scale with the others. The division by
``s`` is folded into the op that produces ``x`` (an RMSNorm weight, the rows of ``up_proj`` before ``down_proj``,
the rows of ``v_proj`` before ``o_proj``), so inference costs nothing extra.

- :func:`awq_scales`: ``s = mean|x|^alpha``, normalised by ``sqrt(max * min)`` so the scales are centred at 1 (as in
  the reference implementation), ``alpha`` searched on a grid in ``[0, 1)`` by the measured output error
  ``sum_i ||x W_i^T - (x / s) Q(W_i diag(s))^T||^2`` with the real quantizer and dequantizer. ``alpha = 0`` (s = 1) is
  a candidate, so the result is never worse than no scaling on the calibration data.
- :func:`awq_clip`: after scaling, a per-(row, group) shrink of the weight range by ratios ``1 .. 1 - max_shrink``,
  each chosen by the group's own output error on the (scaled) input; rows whose full output error got worse are
  reverted, so clipping never increases the measured error either.
- Folding: :func:`scale_columns` (the consumer, ``W diag(s)``), :func:`fold_into_norm`, :func:`fold_into_rows` and
  :func:`fold_v_into_o` (the producer, divided by ``s``); :func:`tie_gqa` constrains ``o_proj`` scales to what
  ``v_proj`` can absorb under grouped-query attention.

Typical use for one layer (the calibration pipeline does this with captured activations ``x``)::

    s, alpha, info = awq_scales([wq, wk, wv], x_attn, qt)
    norm_w = fold_into_norm(norm_w, s, offset=model.NORM_OFFSET)
    wq, wk, wv = (scale_columns(w, s) for w in (wq, wk, wv))
    wq = awq_clip(wq, x_attn / s, qt)         # clipping sees the input of the *scaled* weight
    parts = quantize(wq, qt, "search")

Error measurement: with ``E = W - Q(W diag(s)) diag(1/s)`` the output error is ``||x E^T||^2 = sum_rows e H e^T``
with the Gram matrix ``H = x^T x``; whichever of the two forms is cheaper is used (the Gram form when
``cols <= n``). Matrix products run in float32, sums in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from lowbit.convert.quantize import quantize
from lowbit.errors import LowbitError
from lowbit.formats.qtypes import QType
from lowbit.kernels.ref import dequantize

log = logging.getLogger(__name__)

Quantizer = Callable[[np.ndarray, QType], dict]
SCALE_FLOOR = 1e-5  # mean|x| below this fraction of the largest channel's is raised to it: bounds s to 1e5**alpha


# ------------------------------------------------------------------------------------------------ checks


def _check_qtype(qt: QType) -> None:
    if not isinstance(qt, QType):
        raise LowbitError(f"AWQ needs a QType, got {type(qt).__name__}")
    if qt.is_float:
        raise LowbitError(f"{qt.name} is a float type; AWQ needs a quantized type")


def _check_matrix(a, name: str, cols: int | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise LowbitError(f"{name} must be a 2-D matrix, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise LowbitError(f"{name} is empty (shape {a.shape})")
    if cols is not None and a.shape[1] != cols:
        raise LowbitError(f"{name} has {a.shape[1]} columns but the activations have {cols} channels")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise LowbitError(f"{name} contains NaN or infinite values")
    return a


def _check_scale(s, n: int, name: str = "s") -> np.ndarray:
    s = np.asarray(s)
    if s.ndim != 1 or s.shape[0] != n:
        raise LowbitError(f"{name} must be a vector of {n} scales, got shape {s.shape}")
    s = s.astype(np.float32)
    if not np.isfinite(s).all() or (s <= 0).any():
        raise LowbitError(f"{name} must be finite and positive")
    return s


def _check_grid(grid, name: str = "grid") -> int:
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise LowbitError(f"{name} must be a positive integer, got {grid!r}")
    return int(grid)


def _check_activations(x, max_rows: int | None) -> np.ndarray:
    x = _check_matrix(x, "the calibration activations x")
    if max_rows is not None:
        max_rows = _check_grid(max_rows, "max_rows")
        if x.shape[0] > max_rows:  # evenly spaced rows: deterministic, covers the whole calibration set
            x = np.ascontiguousarray(x[np.linspace(0, x.shape[0] - 1, max_rows).round().astype(np.int64)])
    return x


def _check_weight_for(w: np.ndarray, qt: QType, name: str) -> None:
    why = qt.check_shape(w.shape)
    if why:
        raise LowbitError(f"{name}: {why}")


def _default_quantizer(w: np.ndarray, qt: QType) -> dict:
    return quantize(w, qt, method="search")


def _roundtrip(quantizer: Quantizer, w: np.ndarray, qt: QType) -> np.ndarray:
    """Quantize then dequantize ``w`` exactly as the runtime will see it. A quantizer may return the stored parts
    or, to skip packing, the dequantized weight itself."""
    out = quantizer(w, qt)
    return out if isinstance(out, np.ndarray) else dequantize(out, qt, w.shape)


# ------------------------------------------------------------------------------------------------ error


class _OutputError:
    """Squared output error ``||x e^T||^2`` per row of an error matrix ``e`` on fixed activations ``x``."""

    def __init__(self, x: np.ndarray):
        n, cols = x.shape
        self.x = x
        # Gram form costs rows * cols^2 per evaluation, the direct one rows * cols * n
        self.gram = (x.T.astype(np.float64) @ x.astype(np.float64)).astype(np.float32) if cols <= n else None

    def rows(self, e: np.ndarray) -> np.ndarray:
        e = np.ascontiguousarray(e, dtype=np.float32)
        if self.gram is not None:
            return np.einsum("ij,ij->i", (e @ self.gram).astype(np.float64), e.astype(np.float64))
        y = (self.x @ e.T).astype(np.float64)
        return np.einsum("ij,ij->j", y, y)

    def total(self, e: np.ndarray) -> float:
        return float(self.rows(e).sum())


def block_gram(x: np.ndarray, g: int) -> np.ndarray:
    """The diagonal blocks ``x_k^T x_k`` (``[n_groups, g, g]``, float32) of the Gram matrix for groups of ``g``
    consecutive input channels: ``e_k H_k e_k^T`` is the output error of one group's weight error ``e_k``."""
    n, cols = x.shape
    xg = x.reshape(n, cols // g, g).transpose(1, 0, 2).astype(np.float64)  # [ng, n, g]
    return np.matmul(xg.transpose(0, 2, 1), xg).astype(np.float32)


# ------------------------------------------------------------------------------------------------ scales


def awq_scales(
    weights: list[np.ndarray],
    x: np.ndarray,
    qt: QType,
    *,
    quantizer: Quantizer | None = None,
    grid: int = 20,
    max_rows: int | None = None,
    tie: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, float, dict]:
    """Search AWQ input-channel scales for the linears ``weights`` that all consume ``x``.

    weights: float32 ``[rows_i, cols]`` matrices (e.g. q, k, v; or gate, up); x: ``[n, cols]`` calibration inputs
    (subsampled to ``max_rows`` evenly spaced rows when given). Candidates ``s = a^alpha / sqrt(max * min)`` with
    ``a = mean|x|`` per channel (floored at ``SCALE_FLOOR * max(a)``) and ``alpha = i / grid`` for
    ``i = 0 .. grid - 1``; each is scored by ``sum_i ||x W_i^T - (x / s) Q(W_i diag(s))^T||^2`` with
    ``Q = dequantize . quantizer`` (default: the ``search`` method). ``tie`` (e.g. ``functools.partial(tie_gqa,
    ...)``) maps every candidate to an admissible one before scoring. ``alpha = 0`` gives ``s = 1`` exactly, so
    the chosen ``s`` never scores worse than no scaling; ties go to the smaller ``alpha``.

    Returns ``(s float32 [cols], alpha, info)`` with ``info``: ``alphas``, ``errors`` (per alpha), ``error_unscaled``,
    ``error``, ``rows`` (activation rows used).
    """
    _check_qtype(qt)
    grid = _check_grid(grid)
    x = _check_activations(x, max_rows)
    cols = x.shape[1]
    if isinstance(weights, np.ndarray) or not isinstance(weights, (list, tuple)) or not weights:
        raise LowbitError("weights must be a non-empty list of 2-D matrices sharing the input x")
    ws = [_check_matrix(w, f"weight {i}", cols) for i, w in enumerate(weights)]
    for i, w in enumerate(ws):
        _check_weight_for(w, qt, f"weight {i}")
    quantizer = quantizer or _default_quantizer
    err = _OutputError(x)

    a = np.abs(x).mean(axis=0, dtype=np.float64)
    alphas = [i / grid for i in range(grid)]
    errors: list[float] = []
    best_s, best_alpha, best_err = np.ones(cols, np.float32), 0.0, np.inf
    if a.max() <= 0:
        log.debug("AWQ: all-zero activations; keeping s = 1")
        alphas = [0.0]
    a = np.maximum(a, SCALE_FLOOR * a.max()) if a.max() > 0 else np.ones_like(a)
    for alpha in alphas:
        s = _candidate(a, alpha, tie)
        total = 0.0
        for w in ws:
            total += err.total(w - _roundtrip(quantizer, w * s, qt) / s)
        errors.append(total)
        if total < best_err:
            best_s, best_alpha, best_err = s, alpha, total
    info = {
        "alphas": alphas,
        "errors": errors,
        "error_unscaled": errors[0],
        "error": best_err,
        "rows": x.shape[0],
    }
    log.debug(
        "AWQ %s %s: alpha %.2f, output error %.4g -> %.4g (%.1f%%)",
        qt.name,
        [w.shape for w in ws],
        best_alpha,
        errors[0],
        best_err,
        100.0 * (best_err / errors[0] - 1.0) if errors[0] > 0 else 0.0,
    )
    return best_s, best_alpha, info


def _candidate(a: np.ndarray, alpha: float, tie) -> np.ndarray:
    if alpha == 0:
        s = np.ones(a.shape, np.float32)
    else:
        p = a**alpha
        s = (p / np.sqrt(p.max() * p.min())).astype(np.float32)
    if tie is not None:
        s = _check_scale(tie(s), a.shape[0], "the tied scale")
    return s


# ------------------------------------------------------------------------------------------------ clipping


def awq_clip(
    w: np.ndarray,
    x: np.ndarray,
    qt: QType,
    *,
    grid: int = 10,
    max_shrink: float = 0.5,
    quantizer: Quantizer | None = None,
    max_rows: int | None = None,
) -> np.ndarray:
    """AWQ's clipping search; returns the clipped float32 copy of ``w`` (``[rows, cols]``) to quantize afterwards.

    ``x`` (``[n, cols]``) is the input ``w`` actually sees: after :func:`awq_scales` that is ``x / s`` for the scaled
    ``w * s``. Ratios ``r = 1 - max_shrink * i / grid`` (``i = 0 .. grid - 1``; by default 1.0 down to 0.55, as the
    reference) shrink every group's range: ``[-r * absmax, r * absmax]`` for symmetric types (the grid is anchored at
    zero) and ``[c - r * h, c + r * h]`` around the group's midpoint ``c`` for asymmetric ones. For each ratio the
    whole clipped matrix is quantized with ``quantizer`` (default: ``search``) and each (row, group) keeps the
    ratio with the smallest group output error ``e_k H_k e_k^T`` (``H_k`` the group's block of ``x^T x``; error
    against the *unclipped* weight). Cross-group terms are then accounted for: rows whose full output error is
    larger than without clipping keep their original values, and if the quantizer is not group-local and the
    total still got worse, ``w`` is returned unchanged. So clipping never increases the measured output error.
    """
    _check_qtype(qt)
    grid = _check_grid(grid)
    if not 0.0 < float(max_shrink) < 1.0:
        raise LowbitError(f"max_shrink must be in (0, 1), got {max_shrink!r}")
    x = _check_activations(x, max_rows)
    w = _check_matrix(w, "the weight", x.shape[1])
    _check_weight_for(w, qt, "the weight")
    quantizer = quantizer or _default_quantizer
    rows, cols = w.shape
    g = qt.layout_group(cols)
    ng = cols // g

    wg = w.reshape(rows, ng, g)
    if qt.asym:
        lo, hi = wg.min(axis=2, keepdims=True), wg.max(axis=2, keepdims=True)
        mid, half = (hi + lo) * np.float32(0.5), (hi - lo) * np.float32(0.5)
    else:
        mid, half = np.zeros((rows, ng, 1), np.float32), np.abs(wg).max(axis=2, keepdims=True)
    hb = block_gram(x, g)  # [ng, g, g]

    def group_errors(deq: np.ndarray) -> np.ndarray:
        e = (wg - deq.reshape(rows, ng, g)).transpose(1, 0, 2)  # [ng, rows, g]
        return np.einsum("krg,krg->rk", np.matmul(e, hb).astype(np.float64), e.astype(np.float64))

    ratios = 1.0 - float(max_shrink) * np.arange(grid) / grid
    best = wg.copy()
    best_err = None
    deq0 = None
    for r in ratios:
        rr = np.float32(r)
        cand = np.clip(wg, mid - rr * half, mid + rr * half) if r < 1.0 else wg
        deq = _roundtrip(quantizer, cand.reshape(rows, cols), qt)
        ge = group_errors(deq)
        if best_err is None:
            best_err, deq0 = ge, deq
            continue
        better = ge < best_err
        best = np.where(better[:, :, None], cand, best)
        best_err = np.where(better, ge, best_err)

    out = best.reshape(rows, cols)
    err = _OutputError(x)
    base_rows = err.rows(w - deq0)
    deq = _roundtrip(quantizer, out, qt)
    worse = err.rows(w - deq) > base_rows
    if worse.any():
        out = np.where(worse[:, None], w, out)
        deq = _roundtrip(quantizer, out, qt)
    final = err.total(w - deq)
    base = float(base_rows.sum())
    if final > base:
        log.debug("AWQ clip %s: no gain once quantized as a whole; keeping the weight unclipped", w.shape)
        return w.copy()
    n_clipped = int((out.reshape(rows, ng, g) != wg).any(axis=2).sum())
    log.debug(
        "AWQ clip %s %s: %d of %d groups clipped, %d rows reverted, output error %.4g -> %.4g",
        qt.name,
        w.shape,
        n_clipped,
        rows * ng,
        int(worse.sum()),
        base,
        final,
    )
    return np.ascontiguousarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------------------------ folding


def scale_columns(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``W diag(s)``: input column ``j`` of the consuming linear multiplied by ``s[j]`` (float32 copy)."""
    w = _check_matrix(w, "the weight")
    return w * _check_scale(s, w.shape[1])[None, :]


def fold_into_norm(norm_w: np.ndarray, s: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """The new stored weight of a norm whose output must be divided by ``s``.

    The norm computes ``n(x) * (offset + w)`` (``offset`` = 1 for gemma-style norms, the model's ``NORM_OFFSET``),
    so ``n(x) * (offset + w) / s = n(x) * (offset + w')`` with ``w' = (offset + w) / s - offset``.
    """
    norm_w = np.asarray(norm_w)
    if norm_w.ndim != 1:
        raise LowbitError(f"a norm weight must be a vector, got shape {norm_w.shape}")
    s = _check_scale(s, norm_w.shape[0])
    nw = norm_w.astype(np.float32)
    if not np.isfinite(nw).all() or not np.isfinite(offset):
        raise LowbitError("the norm weight and offset must be finite")
    off = np.float32(offset)
    return ((off + nw) / s - off).astype(np.float32)


def fold_into_rows(
    prev_w: np.ndarray, s: np.ndarray, prev_bias: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Divide output row ``j`` of the producing linear (and its bias) by ``s[j]``: ``(W, b) -> (W / s, b / s)``.

    Valid when the consumer's input depends linearly on each output channel of ``prev`` separately: ``up_proj``
    before ``down_proj`` (``down`` sees ``act(gate) * up``, so dividing ``up``'s row ``j`` divides input ``j`` of
    ``down``), ``v_proj`` before ``o_proj`` (see :func:`fold_v_into_o`). Returns ``(weight, bias or None)``.
    """
    prev_w = _check_matrix(prev_w, "the producing weight")
    s = _check_scale(s, prev_w.shape[0], "s (one per output row of the producing weight)")
    bias = None
    if prev_bias is not None:
        bias = np.asarray(prev_bias, dtype=np.float32)
        if bias.shape != s.shape:
            raise LowbitError(f"the bias must have shape {s.shape}, got {bias.shape}")
        if not np.isfinite(bias).all():
            raise LowbitError("the bias contains NaN or infinite values")
        bias = bias / s
    return prev_w / s[:, None], bias


def _check_heads(n: int, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    for name, v in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise LowbitError(f"{name} must be a positive integer, got {v!r}")
    if n_heads % n_kv_heads:
        raise LowbitError(f"n_heads ({n_heads}) is not a multiple of n_kv_heads ({n_kv_heads})")
    if n != n_heads * head_dim:
        raise LowbitError(f"o_proj has {n} input channels, expected n_heads * head_dim = {n_heads * head_dim}")
    return n_heads // n_kv_heads


def _reduce_gqa(s: np.ndarray, n_heads: int, n_kv_heads: int, head_dim: int) -> np.ndarray:
    """Geometric mean of ``s`` (``[n_heads * head_dim]``) over the query heads sharing a kv head:
    ``[n_kv_heads * head_dim]``."""
    rep = _check_heads(s.shape[0], n_heads, n_kv_heads, head_dim)
    logs = np.log(s.astype(np.float64)).reshape(n_kv_heads, rep, head_dim)
    return np.exp(logs.mean(axis=1)).reshape(-1).astype(np.float32)


def tie_gqa(s: np.ndarray, n_heads: int, n_kv_heads: int, head_dim: int) -> np.ndarray:
    """Project an ``o_proj`` input scale onto those ``v_proj`` can absorb: the geometric mean over the query heads
    sharing each kv head, repeated back to ``[n_heads * head_dim]``. Use as ``awq_scales(..., tie=partial(tie_gqa,
    n_heads=..., n_kv_heads=..., head_dim=...))`` so the searched scale is already admissible."""
    s = _check_scale(s, np.asarray(s).reshape(-1).shape[0])
    rep = _check_heads(s.shape[0], n_heads, n_kv_heads, head_dim)
    s_kv = _reduce_gqa(s, n_heads, n_kv_heads, head_dim).reshape(n_kv_heads, 1, head_dim)
    return np.repeat(s_kv, rep, axis=1).reshape(-1)


class VOFold(NamedTuple):
    v_weight: np.ndarray  # v_proj with row (kv head k, dim d) divided by kv_scale[k * head_dim + d]
    v_bias: np.ndarray | None  # likewise, or None
    kv_scale: np.ndarray  # [n_kv_heads * head_dim]
    o_scale: np.ndarray  # [n_heads * head_dim]: multiply o_proj's columns by it (scale_columns)


def fold_v_into_o(
    v_w: np.ndarray,
    s: np.ndarray,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    v_bias: np.ndarray | None = None,
) -> VOFold:
    """Fold an ``o_proj`` input scale ``s`` (``[n_heads * head_dim]``) into ``v_proj`` under grouped-query attention.

    Per query head ``h`` the attention output is ``o_h = softmax(q_h k^T) v_{h // rep}`` (``rep = n_heads /
    n_kv_heads``): linear in ``v`` with weights that do not depend on ``v``. Dividing ``v``'s channel ``(k, d)`` by
    ``t[k, d]`` therefore divides ``o_h[d]`` by ``t[h // rep, d]`` for every head sharing kv head ``k``; ``o_proj``
    column ``(h, d)`` must be multiplied by the same ``t[h // rep, d]``. So only scales constant over the query
    heads of a group are exact: ``t`` is the geometric mean of ``s`` over those heads (the identity when ``s``
    came from :func:`awq_scales` with ``tie=tie_gqa``), and ``o_scale`` is ``t`` repeated to every query head.

    Returns ``VOFold(v_weight, v_bias, kv_scale=t, o_scale)``; apply ``scale_columns(o_w, o_scale)`` to ``o_proj``.
    """
    s = np.asarray(s)
    if s.ndim != 1:
        raise LowbitError(f"s must be a vector, got shape {s.shape}")
    s = _check_scale(s, s.shape[0])
    rep = _check_heads(s.shape[0], n_heads, n_kv_heads, head_dim)
    v_w = _check_matrix(v_w, "v_proj")
    if v_w.shape[0] != n_kv_heads * head_dim:
        raise LowbitError(f"v_proj has {v_w.shape[0]} rows, expected n_kv_heads * head_dim = {n_kv_heads * head_dim}")
    t = _reduce_gqa(s, n_heads, n_kv_heads, head_dim)
    v_new, b_new = fold_into_rows(v_w, t, v_bias)
    o_scale = np.repeat(t.reshape(n_kv_heads, 1, head_dim), rep, axis=1).reshape(-1)
    return VOFold(v_new, b_new, t, o_scale)
