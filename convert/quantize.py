"""Group-wise weight quantization: a round-to-nearest baseline and a weighted least-squares scale search.

Every quantizer returns the stored parts of :mod:`lowbit.formats.qtypes` (``codes``, ``scales`` and, for
asymmetric types, ``mins``) for the dequantization ``x = d * u - m``; symmetric types use ``m = d * z`` with
``z = 2**(bits-1)``, i.e. signed levels ``u - z`` in ``[-z, z-1]``.

The search (the default) picks each group's scale the way llama.cpp's k-quants do:

- symmetric (``make_qx_quants``): the signed value of largest magnitude ``max`` is sent to the extreme level
  ``-z`` by the inverse scale ``-z / max``; a fan of inverse scales around it is tried, each one's codes are
  obtained by rounding and the weighted least-squares ``d`` for those codes is solved in closed form;
- asymmetric (``make_qkx2_quants``): inverse scales around ``max_code / (max - min)`` measured from the group
  minimum, rounding, then the 2x2 weighted least-squares solve for ``(d, min)``.

Asymmetric groups then get a couple of alternating refinement steps (nearest codes, refit). The candidate with
the lowest weighted squared error wins (per-element weights: :func:`element_weights`). Its ``d`` (and ``m``) are
then rounded to float16 and the codes recomputed with the rounded values, so what is stored is exactly what was
scored; that result is compared, group by group, with the RTN encoding scored the same way, so the search can
never lose to RTN.

Coded-scale types (``..s8``, :mod:`lowbit.formats.scale_codes`) take the same candidates, but a candidate's ``d``
and ``m`` are put on the matrix's 8-bit grid (:func:`matrix_grid`, fitted to the RTN scales so that every method and
every row block of a matrix shares it) instead of rounded to float16, and the codes are recomputed for the coded
values.

Everything is vectorised over all groups of a chunk of rows; the per-group loop of llama.cpp becomes a short
Python loop over candidates.
"""

from __future__ import annotations

import logging

import numpy as np

from lowbit.errors import FormatError, LowbitError
from lowbit.formats import scale_codes
from lowbit.formats.qtypes import QType, pack_codes

log = logging.getLogger(__name__)

METHODS = ("search", "rtn")
F16_MAX = float(np.finfo(np.float16).max)
REFINE_STEPS = 2  # alternating refinement steps after the asymmetric candidate fan
CHUNK_ELEMS = 1 << 17  # elements per vectorised chunk: temporaries stay in cache, memory stays O(chunk)


# ------------------------------------------------------------------------------------------------ helpers


def _prepare(w: np.ndarray, qt: QType) -> tuple[np.ndarray, int]:
    """Validate ``w`` against ``qt``; return it as contiguous float32 and the group size."""
    if not isinstance(qt, QType):
        raise LowbitError(f"expected a QType, got {type(qt).__name__}")
    if qt.is_float:
        raise LowbitError(f"{qt.name} is a float type; there is nothing to quantize")
    w = np.ascontiguousarray(w, dtype=np.float32)
    qt.part_shapes(w.shape)  # raises FormatError when the shape does not fit the type
    if not np.isfinite(w).all():
        raise FormatError(f"cannot quantize to {qt.name}: the tensor contains NaN or infinite values")
    return w, qt.layout_group(w.shape[1])


def element_weights(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """Per-element weights of the squared error for groups ``x`` (``[n, g]``): ``sqrt(sigma2 + x**2)``, times
    ``importance`` (tiled to ``[n, g]``) when given, with ``sigma2`` the group's mean square.

    This is llama.cpp's weighting (``qw * sqrt(sigma2 + x**2)`` on its imatrix paths; ``rms + |x|``, nearly the
    same curve, for q4_K/q5_K without one). ``importance`` (mean squared activation per input channel) alone
    would be the exact output-error weight if channels were uncorrelated, and uniform weights without it; the
    extra magnitude factor protects the large weights, which a least-squares scale otherwise likes to clip. Measured
    on refsmall (KL to the float model on dev-eval, g64, 2/3/4 bits, sym and asym): with importance it beat
    importance alone in 4 of 6 settings (importance alone was worse than RTN at 2-bit symmetric); without, it was
    best of ``sqrt(sigma2 + x**2)``, ``x**2 + sigma2``, ``x**2`` and uniform in 4 of 6 and within 4% in the others,
    and beat RTN in all. The floor ``sigma2`` keeps small values in the fit, which pure ``x**2`` lets collapse to 0.
    """
    x2 = x * x
    wt = np.sqrt(x2 + np.mean(x2, axis=1, keepdims=True))
    return wt if importance is None else wt * importance


def _check_importance(importance: np.ndarray | None, cols: int) -> np.ndarray | None:
    if importance is None:
        return None
    imp = np.asarray(importance, dtype=np.float32)
    if imp.shape != (cols,):
        raise LowbitError(f"importance must have one value per input column ({cols},), got shape {imp.shape}")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise LowbitError("importance values must be finite and non-negative")
    top = float(imp.max())
    return imp / top if top > 0 else np.ones_like(imp)  # a global scale never changes the argmin


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per row of ``x``: the signed value of largest magnitude."""
    idx = np.argmax(np.abs(x), axis=1)
    return np.take_along_axis(x, idx[:, None], axis=1)[:, 0]


def _rtn_params(x: np.ndarray, qt: QType) -> tuple[np.ndarray, np.ndarray | None]:
    """Round-to-nearest (d, m) per group of ``x`` (``[n, g]``); m is None for symmetric types. A coded-scale
    type's range always spans zero (its zero point lies in ``[0, max_code]``)."""
    if qt.asym:
        lo, hi = x.min(axis=1), x.max(axis=1)
        if qt.coded_scales:
            lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        return (hi - lo) / np.float32(qt.max_code), -lo
    return -_signed_absmax(x) / np.float32(qt.zero_point), None


def _encode(x: np.ndarray, d: np.ndarray, m: np.ndarray | None, qt: QType, grid: np.ndarray | None = None):
    """Round (d, m) to float16 (a coded-scale type: to the nearest codes on ``grid``) and pick the nearest code
    for every element with the rounded values.

    Returns (d16, m16 or None, u uint8 [n, g], xhat float32 [n, g]) where ``xhat`` is computed exactly as
    :func:`lowbit.kernels.ref.dequantize` does; for a coded-scale type d16/m16 are the uint8 scale/min codes.
    """
    if qt.coded_scales:
        sc, mc = scale_codes.encode(d, m, grid, qt)
        d16, m16 = scale_codes.decode(sc, mc, grid, qt)
    else:
        d16 = np.clip(d, -F16_MAX, F16_MAX).astype(np.float16)
        m16 = np.clip(m, -F16_MAX, F16_MAX).astype(np.float16) if qt.asym else None
    df = d16.astype(np.float32)[:, None]
    if qt.asym:
        mf = m16.astype(np.float32)[:, None]
        fill = 0.0
    else:
        m16 = None
        mf = df * np.float32(qt.zero_point)
        fill = float(qt.zero_point)
    safe = np.where(df == 0, np.float32(1), df)
    with np.errstate(over="ignore", invalid="ignore"):
        u = np.rint((x + mf) / safe)
    u = np.where(df == 0, np.float32(fill), u)
    np.clip(u, 0, qt.max_code, out=u)
    with np.errstate(over="ignore", invalid="ignore"):
        xhat = df * u - mf
    if qt.coded_scales:
        return sc, mc, u.astype(np.uint8), xhat
    return d16, m16, u.astype(np.uint8), xhat


def _wsse(x: np.ndarray, xhat: np.ndarray, wt: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        e = xhat - x
        return np.einsum("ij,ij->i", wt * e, e)


def _chunks(rows: int, cols: int, g: int):
    """(r0, r1, slice of the groups) for chunks of whole rows of about CHUNK_ELEMS elements."""
    ng = cols // g
    step = max(1, CHUNK_ELEMS // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        yield r0, r1, slice(r0 * ng, r1 * ng)


def _run(w: np.ndarray, qt: QType, g: int, encode_chunk, grid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Apply ``encode_chunk(x_groups, r0, r1) -> (d16, m16, u)`` to chunks of whole rows; pack the parts (a
    coded-scale type's ``grid`` with them)."""
    rows, cols = w.shape
    ng = cols // g
    x_all = w.reshape(-1, g)
    sdt = np.uint8 if qt.coded_scales else np.float16
    d_out = np.empty(len(x_all), sdt)
    m_out = np.empty(len(x_all), sdt) if qt.asym else None
    u_out = np.empty(x_all.shape, np.uint8)
    for r0, r1, sl in _chunks(rows, cols, g):
        d_out[sl], m16, u_out[sl] = encode_chunk(x_all[sl], r0, r1)
        if qt.asym:
            m_out[sl] = m16
    parts = {"codes": pack_codes(u_out.reshape(rows, cols), qt), "scales": d_out.reshape(rows, ng)}
    if qt.asym:
        parts["mins"] = m_out.reshape(rows, ng)
    if qt.coded_scales:
        parts["grid"] = np.asarray(grid, np.float32).copy()
    else:
        _warn_saturated(d_out, m_out, qt)
    return parts


def _warn_saturated(d16: np.ndarray, m16: np.ndarray | None, qt: QType) -> None:
    big = np.abs(d16.astype(np.float32)) >= F16_MAX
    if m16 is not None:
        big |= np.abs(m16.astype(np.float32)) >= F16_MAX
    if big.any():
        log.warning("%s: %d groups exceed the float16 scale range and were saturated", qt.name, int(big.sum()))


# ------------------------------------------------------------------------------------------------ RTN


PT_SAMPLE = 1 << 20  # elements (whole rows) the per-tensor scale search looks at


def _per_tensor(w: np.ndarray, qt: QType, method: str, importance: np.ndarray | None) -> dict[str, np.ndarray]:
    """One ``d`` (and ``m``) for the whole matrix: RTN from the matrix's range; the search runs on an even spread of
    whole rows (at most PT_SAMPLE elements, the rows holding the extremes included) as one group of the per-channel
    twin, and keeps its grid only when it beats RTN's on the whole matrix (importance-weighted squared error).
    Every element then takes its nearest code on the chosen grid."""
    w, _ = _prepare(w, qt)
    rows, cols = w.shape
    twin = qt.row_twin
    imp = _check_importance(importance, cols)
    flat = w.reshape(1, -1)
    grids = [_rtn_params(flat, qt)]
    if method == "search":
        picks = np.linspace(0, rows - 1, min(rows, max(1, PT_SAMPLE // cols))).astype(np.int64)
        picks = np.unique(np.concatenate([picks, [int(np.argmax(w)) // cols, int(np.argmin(w)) // cols]]))
        sample = w[picks].reshape(1, -1)
        sub = quantize_search(sample, twin, importance=None if imp is None else np.tile(imp, len(picks)))
        d = sub["scales"].astype(np.float32).reshape(1)
        grids.append((d, sub["mins"].astype(np.float32).reshape(1) if qt.asym else None))
    best = None
    colw = np.ones(cols, np.float32) if imp is None else imp.astype(np.float32)
    for d, m in grids:
        d16, m16, u, xhat = _encode(w, np.repeat(d, rows), None if m is None else np.repeat(m, rows), qt)
        err = float(np.einsum("rc,c->", (xhat - w) ** 2, colw, dtype=np.float64))
        if best is None or err < best[0]:
            best = (err, d16, m16, u)
    _, d16, m16, u = best
    parts = {"codes": pack_codes(u, twin), "scales": d16[:1].reshape(1, 1).copy()}
    if qt.asym:
        parts["mins"] = m16[:1].reshape(1, 1).copy()
    _warn_saturated(parts["scales"], parts.get("mins"), qt)
    return parts


GRID_HEADROOM = 1.0 / 16  # octaves above the largest RTN scale: searched and refitted scales may stretch a little


def matrix_grid(w: np.ndarray, qt: QType) -> np.ndarray:
    """The scale grid of a coded-scale type for the matrix ``w``, from its groups' round-to-nearest scales (one
    grid for the whole matrix, whichever method and however many row blocks quantize it)."""
    w, g = _prepare(w, qt)
    x_all = w.reshape(-1, g)
    d = np.concatenate([_rtn_params(x_all[sl], qt)[0] for _, _, sl in _chunks(*w.shape, g)])
    return scale_codes.fit_grid(d, qt, headroom=GRID_HEADROOM)


def quantize_rtn(w: np.ndarray, qt: QType, grid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Plain round-to-nearest: symmetric ``d = -max / z`` (the largest magnitude lands on level ``-z``),
    asymmetric ``d = (max - min) / max_code, m = -min``; ``grid`` as in :func:`quantize_search`."""
    w, g = _prepare(w, qt)
    if qt.per_tensor:
        return _per_tensor(w, qt, "rtn", None)
    if qt.coded_scales and grid is None:
        grid = matrix_grid(w, qt)
    return _run(w, qt, g, lambda x, r0, r1: _encode(x, *_rtn_params(x, qt), qt, grid)[:3], grid)


# ------------------------------------------------------------------------------------------------ search


def _fan(center: float, n: int) -> np.ndarray:
    """``n`` inverse-scale multipliers evenly spread over ``[center - 1, center + 1]`` (llama.cpp uses steps of
    0.1 over about that range), always including ``center`` itself."""
    n = max(1, int(n))
    fan = np.linspace(center - 1.0, center + 1.0, n) if n > 1 else np.array([center])
    return np.unique(np.append(fan, center))


def _search_sym(x: np.ndarray, wt: np.ndarray, qt: QType, n_candidates: int):
    """Best d per group for normalised groups ``x``; levels ``l = u - z`` in ``[-z, z-1]``."""
    z = qt.zero_point
    top = _signed_absmax(x)
    top = np.where(top == 0, np.float32(1), top)
    inv_top = (np.float32(-1) / top)[:, None]
    best_d = np.zeros(len(x), np.float32)
    best_err = np.einsum("ij,ij->i", wt * x, x)  # d = 0: everything rounds to zero
    for t in _fan(float(z), n_candidates):
        lv = np.rint(x * (inv_top * np.float32(t)))
        np.clip(lv, -z, z - 1, out=lv)
        wl = wt * lv
        sumlx = np.einsum("ij,ij->i", wl, x)
        suml2 = np.einsum("ij,ij->i", wl, lv)
        ok = suml2 > 0
        d = np.where(ok, sumlx / np.where(ok, suml2, 1), 0).astype(np.float32)
        err = _wsse(x, d[:, None] * lv, wt)
        better = ok & (err < best_err)
        best_d = np.where(better, d, best_d)
        best_err = np.where(better, err, best_err)
    return best_d


def _affine_fit(x, wt, lv, sw, swx):
    """Weighted least-squares ``(d, lo)`` of ``x ~ d * lv + lo`` per group (the 2x2 normal equations)."""
    wl = wt * lv
    sl = wl.sum(axis=1)
    sl2 = np.einsum("ij,ij->i", wl, lv)
    sxl = np.einsum("ij,ij->i", wl, x)
    det = sw * sl2 - sl * sl
    ok = det > 0
    safe = np.where(ok, det, 1)
    d = np.where(ok, (sw * sxl - swx * sl) / safe, 0).astype(np.float32)
    lo = np.where(ok, (sl2 * swx - sl * sxl) / safe, 0).astype(np.float32)
    return d, lo, ok


def _search_asym(x: np.ndarray, wt: np.ndarray, qt: QType, n_candidates: int, refine: int = REFINE_STEPS):
    """Best (d, m) per group for normalised groups ``x``; ``xhat = d * l + lo`` with ``m = -lo``."""
    nmax = qt.max_code
    lo, hi = x.min(axis=1), x.max(axis=1)
    span = hi - lo
    flat = span == 0
    inv_span = (1.0 / np.where(flat, 1, span)).astype(np.float32)[:, None]
    xs = x - lo[:, None]
    sw = wt.sum(axis=1)
    swx = np.einsum("ij,ij->i", wt, x)
    # start from RTN in this space (d = span / nmax, min = lo), scored like every candidate
    best_d = (span / np.float32(nmax)).astype(np.float32)
    best_lo = lo.astype(np.float32)
    lv = np.clip(np.rint(xs * (inv_span * np.float32(nmax))), 0, nmax)
    best_err = _wsse(x, best_d[:, None] * lv + best_lo[:, None], wt)

    def consider(lv):
        nonlocal best_d, best_lo, best_err
        d, mn, ok = _affine_fit(x, wt, lv, sw, swx)
        err = _wsse(x, d[:, None] * lv + mn[:, None], wt)
        better = ok & ~flat & (err < best_err)
        best_d = np.where(better, d, best_d)
        best_lo = np.where(better, mn, best_lo)
        best_err = np.where(better, err, best_err)

    for t in _fan(float(nmax), n_candidates):
        lv = np.rint(xs * (inv_span * np.float32(t)))
        consider(np.clip(lv, 0, nmax, out=lv))
    # beyond make_qkx2_quants: a few Lloyd steps (nearest codes for the best (d, lo), then refit). Each step can only
    # lower the error; it gains 0.5-2% at 2-4 bits for asymmetric grids (none measurable for symmetric ones).
    for _ in range(refine):
        inv_d = (1.0 / np.where(best_d == 0, 1, best_d)).astype(np.float32)[:, None]
        lv = np.rint((x - best_lo[:, None]) * inv_d)
        consider(np.clip(lv, 0, nmax, out=lv))
    return best_d, -best_lo


def quantize_search(
    w: np.ndarray, qt: QType, importance: np.ndarray | None = None, n_candidates: int = 20,
    grid: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Weighted least-squares scale (and min) search per group; see the module docstring.

    ``importance``: optional per-input-channel weights (shape ``[cols]``, e.g. mean squared activations);
    ``grid``: a coded-scale type's scale grid (default :func:`matrix_grid` of ``w``).
    """
    w, g = _prepare(w, qt)
    rows, cols = w.shape
    if not isinstance(n_candidates, (int, np.integer)) or n_candidates < 1:
        raise LowbitError(f"n_candidates must be a positive integer, got {n_candidates!r}")
    if qt.per_tensor:
        return _per_tensor(w, qt, "search", importance)
    imp = _check_importance(importance, cols)
    ng = cols // g
    n_search = 0

    if qt.coded_scales and grid is None:
        grid = matrix_grid(w, qt)

    def encode_chunk(x, r0, r1):
        nonlocal n_search
        amax = np.abs(x).max(axis=1)
        s = np.where(amax > 0, amax, np.float32(1))
        xn = x / s[:, None]  # scale-free search: no overflow/underflow, same argmin per group
        tile = None if imp is None else np.broadcast_to(imp.reshape(1, ng, g), (r1 - r0, ng, g)).reshape(-1, g)
        wt = element_weights(xn, tile)
        if qt.asym:
            d, m = _search_asym(xn, wt, qt, n_candidates)
            d, m = d * s, m * s
        else:
            d, m = _search_sym(xn, wt, qt, n_candidates) * s, None
        cand = _encode(x, d, m, qt, grid)
        base = _encode(x, *_rtn_params(x, qt), qt, grid)
        pick = _wsse(x, cand[3], wt) < _wsse(x, base[3], wt)  # strict: ties keep RTN
        n_search += int(pick.sum())
        m16 = np.where(pick, cand[1], base[1]) if qt.asym else None
        return np.where(pick, cand[0], base[0]), m16, np.where(pick[:, None], cand[2], base[2])

    parts = _run(w, qt, g, encode_chunk, grid)
    log.debug("%s %s: search beat RTN in %d of %d groups", qt.name, w.shape, n_search, rows * ng)
    return parts


# ------------------------------------------------------------------------------------------------ dispatcher


def quantize(
    w: np.ndarray, qt: QType, method: str = "search", importance: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Quantize float32 ``w[rows, cols]`` to ``qt`` with ``method`` ("search", the default, or "rtn")."""
    if method == "search":
        return quantize_search(w, qt, importance=importance)
    if method == "rtn":
        if importance is not None:
            log.debug("rtn ignores the importance vector")
        return quantize_rtn(w, qt)
    raise LowbitError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
