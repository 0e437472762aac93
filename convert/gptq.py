"""GPTQ (Frantar et al., 2022): Hessian-aware rounding with error feedback, for the plain group layout.

For a linear layer ``y = x @ W.T`` with calibration inputs ``X`` (``[n, cols]``), the output error of a quantized
``Ŵ`` is ``Σ_r e_r H e_r^T`` with ``e_r = w_r - ŵ_r`` (one row of ``W`` per output) and ``H = X^T X / n``. Rows are
independent; within a row GPTQ quantizes the columns one at a time and spreads each column's rounding error over the
columns not yet quantized, optimally for ``H`` (the OBS update), using the upper Cholesky factor ``U`` of ``H^-1``:

    e = (w_i - q(w_i)) / U_ii;   w_j -= e * U_ij  for j > i

Updates are applied lazily: inside a block of ``block`` columns by a numba kernel (row by row, cache friendly),
to the columns after the block by one BLAS product.

- Damping: ``damp * mean(diag H)`` is added to the diagonal (after "dead" columns, whose input is always zero, get
  ``H_ii = 1``). A dead column couples to no other column, so its rounding error is not propagated and it is simply
  rounded to nearest on its group's grid (it is not zeroed: a channel unseen in calibration may be live later).
- Act-order: columns are processed by decreasing ``diag H``. Groups are *static*: every group's scale (and min) is
  fixed before the sweep from the original weights, by the weighted scale search of :mod:`lowbit.convert.quantize`
  with ``importance = diag H`` (measured better than RTN ranges, see ``init``), so the stored layout is the plain
  group layout whatever order the columns were processed in.
- Refit (``refit=True``): with the codes fixed, every row's scales (and mins) are re-solved by least squares on the
  same ``H``-weighted objective (the ``P x P`` normal equations of a row, ``P`` = parameters of the row, solved by
  a few preconditioned conjugate-gradient steps, each one float32 product of the rows with ``H``), rounded to
  float16 and scored with exactly the stored values. ``passes`` rounds alternate sweep (on the grids the last
  refit chose) and refit; every round's result competes per row. Measured on a 64x256 layer with correlated inputs
  (2/3/4 bits, g64/per-channel, sym/asym): one refit lowers the output error 1-5% below plain GPTQ, three rounds
  4-14%, five 5-17%, held-out inputs alike; at model level far less (see PASSES).
- Safety net: the plain search and RTN encodings are scored on the same objective and the best candidate is kept
  per row, so GPTQ never stores a row that is worse (for the damped calibration Hessian) than what the data-free
  methods would have stored.
- Cost: everything but the O(cols^3) factorisation of ``H`` (:func:`prepare_hessian`, once per distinct input) is
  a product of the rows with ``H``, O(rows * cols^2), about 8 of them with the defaults; rows are independent, so
  a large matrix is quantized in row blocks on a pool of threads (:mod:`lowbit.convert.pipeline`).

The objective everywhere is the damped Hessian ``H + damp * mean(diag H) * I``: GPTQ optimises it, and it keeps the
refit from over-fitting a small calibration set.
"""

from __future__ import annotations

import logging

import numba as nb
import numpy as np

from lowbit.convert.hessian import PreparedHessian, check_hessian, factor
from lowbit.convert.quantize import F16_MAX, _prepare, matrix_grid, quantize_rtn, quantize_search
from lowbit.errors import LowbitError
from lowbit.formats import scale_codes
from lowbit.formats.qtypes import QType, pack_codes, unpack_codes

log = logging.getLogger(__name__)

INITS = ("search", "rtn")  # where the static group grids come from
CHUNK_ELEMS = 1 << 20  # row chunks of the vectorised scoring/refit: temporaries stay O(chunk + cols^2)
# sweep + refit rounds (each later sweep uses the grids the previous refit chose). On SmolLM2-135M, 3-bit g64:
# KL 0.279 / 0.281 / 0.275 with 1 / 2 / 3 passes (0.276 with the exact refit and 3 passes before): later passes
# are worth nothing measurable at model level, and each costs ~5 products of the weight with H (~40% of a 1B
# conversion's GPTQ time)
PASSES = 1
REFIT_ITERS = 3  # conjugate-gradient iterations of a refit (see _refit)



# ------------------------------------------------------------------------------------------------ kernel


@nb.njit(cache=True, nogil=True)
def _quantize_block(w1, err1, codes1, u1, d, m, gidx, max_code, fill):
    """One lazy block of the GPTQ sweep, every row independently.

    w1: f32[rows, nb] working weights of the block (updated in place); err1: f32[rows, nb] out, scaled errors;
    codes1: u8[rows, nb] out; u1: f32[nb, nb] the block's part of the upper Cholesky factor of H^-1;
    d, m: f32[rows, ng] group scale and min (m = d * z for symmetric types); gidx: i64[nb] group of each column.
    """
    rows, nbk = w1.shape
    for r in range(rows):
        for i in range(nbk):
            g = gidx[i]
            dd = d[r, g]
            mm = m[r, g]
            x = w1[r, i]
            if dd == 0:
                q = np.float32(fill)
            else:
                q = np.float32(np.rint((x + mm) / dd))
                q = min(max(q, np.float32(0.0)), np.float32(max_code))
            e = (x - (dd * q - mm)) / u1[i, i]
            err1[r, i] = e
            codes1[r, i] = np.uint8(q)
            for j in range(i + 1, nbk):
                w1[r, j] -= e * u1[i, j]


# ------------------------------------------------------------------------------------------------ helpers


def _check_inputs(w, prep: PreparedHessian, qt, block, importance):
    w, _ = _prepare(w, qt)  # the same checks as every quantizer: a quant type, a fitting shape, finite values
    cols = w.shape[1]
    if prep.cols != cols:
        raise LowbitError(f"GPTQ: the Hessian must be [{cols}, {cols}] for a weight of shape {w.shape}, "
                          f"got [{prep.cols}, {prep.cols}]")
    if not isinstance(block, (int, np.integer)) or block < 1:
        raise LowbitError(f"GPTQ: block must be a positive integer, got {block!r}")
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float64)
        if importance.shape != (cols,):
            raise LowbitError(f"importance must have one value per input column ({cols},), got {importance.shape}")
        if not np.isfinite(importance).all() or (importance < 0).any():
            raise LowbitError("importance values must be finite and non-negative")
    return w, importance


def _dequant(u: np.ndarray, d16: np.ndarray, m16: np.ndarray | None, qt: QType) -> np.ndarray:
    """float32 ``[rows, cols]`` exactly as :func:`lowbit.kernels.ref.dequantize` computes it."""
    rows, cols = u.shape
    g = qt.layout_group(cols)
    d = d16.astype(np.float32)[:, :, None]
    m = m16.astype(np.float32)[:, :, None] if qt.asym else d * np.float32(qt.zero_point)
    return (d * u.reshape(rows, cols // g, g).astype(np.float32) - m).reshape(rows, cols)


def _row_errors(w: np.ndarray, u, d16, m16, h32: np.ndarray, qt: QType) -> np.ndarray:
    """``e_r H e_r^T`` per row, ``e = w - ŵ`` with ``ŵ`` the stored dequantization: the product ``e H`` in float32
    (``h32``; relative rounding ~1e-6, far below the differences between candidates), the dot in float64."""
    rows, cols = w.shape
    out = np.empty(rows, np.float64)
    step = max(1, CHUNK_ELEMS * 4 // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        e = w[r0:r1] - _dequant(u[r0:r1], d16[r0:r1], None if m16 is None else m16[r0:r1], qt)
        out[r0:r1] = np.einsum("ij,ij->i", e @ h32, e, dtype=np.float64)
    return out


def _to_f16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(x), -F16_MAX, F16_MAX).astype(np.float16)


def _group_sums(y: np.ndarray, v: np.ndarray, ng: int, g: int, asym: bool) -> np.ndarray:
    """``B^T y`` for rows ``y`` (``[n, cols]``): per group ``sum(v * y)`` (the scale's column of the basis ``B``)
    and, asymmetric only, ``-sum(y)`` (the min's)."""
    n = y.shape[0]
    yg = y.reshape(n, ng, g)
    sd = np.einsum("rgi,rgi->rg", v.reshape(n, ng, g), yg, dtype=np.float64)
    return np.concatenate([sd, -yg.sum(axis=2, dtype=np.float64)], axis=1) if asym else sd


def _basis_times(theta: np.ndarray, v: np.ndarray, ng: int, g: int, asym: bool) -> np.ndarray:
    """``B theta`` (float32 ``[n, cols]``): the dequantization ``d_g * v - m_g`` of parameters ``theta``."""
    n = v.shape[0]
    x = v.reshape(n, ng, g) * theta[:, :ng, None].astype(np.float32)
    if asym:
        x -= theta[:, ng:, None].astype(np.float32)
    return x.reshape(n, ng * g)


def _block_solve(r: np.ndarray, blocks: tuple) -> np.ndarray:
    """The preconditioner of :func:`_refit`: each group's own normal-equation block solved alone. ``blocks`` is
    ``(a,)`` (symmetric: ``d_g = r_g / a_g``) or ``(a, c, e, det)``, the 2x2 blocks ``[[a, c], [c, e]]`` of
    (scale, min) pairs; ``r`` is ``[n, ng]`` or ``[n, 2 ng]`` (scales, then mins)."""
    if len(blocks) == 1:
        return r / blocks[0]
    a, c, e, det = blocks
    ng = a.shape[1]
    rd, rm = r[:, :ng], r[:, ng:]
    return np.concatenate([(e * rd - c * rm) / det, (a * rm - c * rd) / det], axis=1)


def _refit(w: np.ndarray, u: np.ndarray, prep: PreparedHessian, qt: QType, d16: np.ndarray, m16: np.ndarray | None):
    """Least-squares (d, m) per group given fixed codes ``u``, minimising ``e_r H e_r^T`` row by row.

    Parameters of a row: ``d_g`` for every group (basis ``u - z`` on the group for symmetric types, ``u`` for
    asymmetric ones) and, asymmetric only, ``m_g`` (basis ``-1`` on the group). The normal equations
    ``B^T H B theta = B^T H w`` couple every group through ``H``; they are solved by conjugate gradients started
    from the current grid ``(d16, m16)``, preconditioned by each group's own block (1x1, or 2x2 with a min), all
    rows of a chunk at once: an iteration is one float32 ``[n, cols] @ H`` product, never the ``P x P`` system
    itself. REFIT_ITERS iterations come within ~1e-3 of the exact solution's objective on 2-4 bit layers
    (1024-8192 columns, groups of 32; 4 iterations ~3e-4). Returns float16 (d, m or None).
    """
    rows, cols = w.shape
    g = qt.layout_group(cols)
    ng = cols // g
    asym = qt.asym
    h32 = prep.h32
    hb = prep.hd.reshape(ng, g, ng, g)[np.arange(ng), :, np.arange(ng), :]  # [ng, g, g]: each group's own block
    hb_sum = hb.sum(axis=(1, 2))  # 1^T H_gg 1
    d_out = np.empty((rows, ng), np.float16)
    m_out = np.empty((rows, ng), np.float16) if asym else None
    step = max(1, CHUNK_ELEMS * 4 // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        v = u[r0:r1].astype(np.float32)
        if not asym:
            v -= np.float32(qt.zero_point)
        t = np.einsum("rgi,gij->rgj", v.reshape(n, ng, g), hb)  # v_g^T H_gg, float64
        a = np.einsum("rgj,rgj->rg", t, v.reshape(n, ng, g))  # v_g^T H_gg v_g
        a_r = a * (1 + 1e-9) + 1e-300
        theta = d16[r0:r1].astype(np.float64)
        if asym:
            c = -t.sum(axis=2)  # -v_g^T H_gg 1
            e_r = hb_sum[None, :] * (1 + 1e-9) + 1e-300
            det = a_r * e_r - c * c
            det = np.where(det > 1e-12 * a_r * e_r, det, np.inf)  # a group of one code: the block is singular
            theta = np.concatenate([theta, m16[r0:r1].astype(np.float64)], axis=1)

        blocks = (a_r, c, e_r, det) if asym else (a_r,)
        theta[~np.isfinite(theta)] = 0.0
        res = _group_sums((w[r0:r1] - _basis_times(theta, v, ng, g, asym)) @ h32, v, ng, g, asym)
        z = _block_solve(res, blocks)
        p = z
        rz = np.einsum("ij,ij->i", res, z)
        for _ in range(REFIT_ITERS):
            q = _group_sums(_basis_times(p, v, ng, g, asym) @ h32, v, ng, g, asym)
            pq = np.einsum("ij,ij->i", p, q)
            ok = (pq > 0) & (rz > 0)
            alpha = np.where(ok, rz / np.where(ok, pq, 1.0), 0.0)
            theta += alpha[:, None] * p
            res -= alpha[:, None] * q
            z = _block_solve(res, blocks)
            rz_new = np.einsum("ij,ij->i", res, z)
            beta = np.where(ok, rz_new / np.where(ok, rz, 1.0), 0.0)
            p = z + beta[:, None] * p
            rz = rz_new
        d_out[r0:r1] = _to_f16(theta[:, :ng])
        if asym:
            m_out[r0:r1] = _to_f16(theta[:, ng:])
    return d_out, m_out


class _Best:
    """The best encoding so far of every row on the objective ``e_r H e_r^T``; an offer replaces a row only when it
    is strictly better (so earlier candidates win ties)."""

    def __init__(self, w: np.ndarray, h32: np.ndarray, qt: QType):
        self.w, self.h, self.qt = w, h32, qt
        self.u = self.d = self.m = self.err = self.owner = None
        self.names: list[str] = []

    def offer(self, name: str, u: np.ndarray, d16: np.ndarray, m16: np.ndarray | None) -> None:
        err = _row_errors(self.w, u, d16, m16, self.h, self.qt)
        err = np.where(np.isfinite(err), err, np.inf)
        self.names.append(name)
        if self.err is None:
            self.u, self.d, self.err = u.copy(), d16.copy(), err
            self.m = m16.copy() if self.qt.asym else None
            self.owner = np.zeros(len(err), np.int64)
            return
        sel = err < self.err
        self.u[sel], self.d[sel], self.err[sel] = u[sel], d16[sel], err[sel]
        if self.qt.asym:
            self.m[sel] = m16[sel]
        self.owner[sel] = len(self.names) - 1

    @property
    def kept(self) -> dict[str, int]:
        """Rows stored from each candidate."""
        return dict(zip(self.names, np.bincount(self.owner, minlength=len(self.names)).tolist()))


def _unpacked(parts: dict[str, np.ndarray], qt: QType, cols: int):
    """(codes uint8 [rows, cols], d16, m16 or None): a coded-scale type's scales decoded to their float16 values."""
    u = unpack_codes(parts["codes"], qt, cols).astype(np.uint8)
    if qt.coded_scales:
        return u, *scale_codes.decode_parts(parts, qt)
    return u, parts["scales"], parts.get("mins")


# ------------------------------------------------------------------------------------------------ GPTQ


def _sweep(w, u32, perm, d16, m16, qt, block):
    """The GPTQ sweep over columns in ``perm`` order with static group grids, ``u32`` the float32 upper Cholesky
    factor of the permuted inverse Hessian; codes uint8 ``[rows, cols]``."""
    rows, cols = w.shape
    g = qt.layout_group(cols)
    d = np.ascontiguousarray(d16, dtype=np.float32)
    m = np.ascontiguousarray(m16, dtype=np.float32) if qt.asym else d * np.float32(qt.zero_point)
    fill = 0 if qt.asym else qt.zero_point
    wp = w[:, perm].copy()
    gidx = (perm // g).astype(np.int64)
    codes = np.empty((rows, cols), np.uint8)
    for i1 in range(0, cols, block):
        i2 = min(cols, i1 + block)
        w1 = np.ascontiguousarray(wp[:, i1:i2])
        err1 = np.empty_like(w1)
        c1 = np.empty(w1.shape, np.uint8)
        _quantize_block(w1, err1, c1, np.ascontiguousarray(u32[i1:i2, i1:i2]), d, m, gidx[i1:i2], qt.max_code, fill)
        codes[:, perm[i1:i2]] = c1
        if i2 < cols:
            wp[:, i2:] -= err1 @ u32[i1:i2, i2:]
    return codes


def _gptq_per_tensor(w: np.ndarray, prep: PreparedHessian, qt: QType, block: int, imp: np.ndarray):
    """A per-tensor type: the per-tensor search's one grid, the sweep on it, per row the better of the sweep's and
    the search's codes. No refit (it would give every row its own scale), and no RTN candidate (another grid); so a
    per-tensor matrix is never cut into row blocks."""
    twin = qt.row_twin
    rows, cols = w.shape
    grid = quantize_search(w, qt, importance=imp)
    d16 = np.repeat(grid["scales"], rows, axis=0)
    m16 = np.repeat(grid["mins"], rows, axis=0) if qt.asym else None
    best = _Best(w, prep.h32, twin)
    best.offer("gptq", _sweep(w, prep.u32, prep.perm, d16, m16, twin, block), d16, m16)
    best.offer("search", unpack_codes(grid["codes"], twin, cols).astype(np.uint8), d16, m16)
    log.debug("%s %s gptq: rows kept per candidate %s", qt.name, w.shape, best.kept)
    parts = {"codes": pack_codes(best.u, twin), "scales": grid["scales"]}
    if qt.asym:
        parts["mins"] = grid["mins"]
    return parts


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray | PreparedHessian,
    qt: QType,
    *,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
    importance: np.ndarray | None = None,
    refit: bool = True,
    passes: int = PASSES,
    init: str = "search",
    grid: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Quantize float32 ``w[rows, cols]`` to ``qt`` with GPTQ for the input Hessian ``hessian`` (``[cols, cols]``,
    e.g. :meth:`HessianAccumulator.hessian`, or a :class:`PreparedHessian`, which carries its own ``damp`` and
    ``act_order``). Returns the stored parts (``codes``, ``scales``, and ``mins`` for asymmetric types), a drop-in
    replacement for :func:`lowbit.convert.quantize.quantize`. Rows are independent: a matrix may be quantized in
    row blocks sharing one prepared Hessian, and the blocks' parts concatenated.

    ``importance``: per-column weights for the static group-grid search (default ``diag(hessian)``); ``refit``: the
    least-squares re-solve of scales/mins for the chosen codes; ``passes``: sweep + refit rounds when refitting;
    ``init``: where the static group grids come from,
    "search" (weighted scale search) or "rtn" (plain ranges); ``grid``: a coded-scale type's scale grid (default
    :func:`lowbit.convert.quantize.matrix_grid` of ``w``: row blocks of one matrix must share the whole matrix's).
    Every candidate's scales (the refit's too) are coded on that one grid and scored as decoded. See the module
    docstring.
    """
    if init not in INITS:
        raise LowbitError(f"GPTQ: unknown init {init!r}; choose one of {', '.join(INITS)}")
    if not isinstance(passes, (int, np.integer)) or passes < 1:
        raise LowbitError(f"GPTQ: passes must be a positive integer, got {passes!r}")
    prep = hessian if isinstance(hessian, PreparedHessian) else None
    h = None if prep else check_hessian(hessian, damp)  # its own errors before its shape is compared with w's
    w, _ = _prepare(w, qt)
    if prep is None:
        if h.shape != (w.shape[1], w.shape[1]):
            raise LowbitError(f"GPTQ: the Hessian must be [{w.shape[1]}, {w.shape[1]}] for a weight of shape "
                              f"{w.shape}, got {h.shape}")
        prep = factor(h, damp, act_order)
    w, importance = _check_inputs(w, prep, qt, block, importance)
    cols = w.shape[1]
    imp = np.diag(prep.h) if importance is None else importance
    if qt.per_tensor:
        return _gptq_per_tensor(w, prep, qt, int(block), imp)

    if qt.coded_scales and grid is None:
        grid = matrix_grid(w, qt)
    rtn = quantize_rtn(w, qt, grid=grid)
    search = quantize_search(w, qt, importance=imp, grid=grid)
    _, d16, m16 = _unpacked(search if init == "search" else rtn, qt, cols)
    codes = _sweep(w, prep.u32, prep.perm, d16, m16, qt, int(block))

    best = _Best(w, prep.h32, qt)
    if not refit:
        best.offer("gptq", codes, d16, m16)  # with a refit, the same codes on the least-squares grid beat these
    for k in range(int(passes) if refit else 0):
        if k:  # a further sweep on the grids the last refit chose; not scored: its refit can only be better
            codes = _sweep(w, prep.u32, prep.perm, d16, m16, qt, int(block))
        d16, m16 = _refit(w, codes, prep, qt, d16, m16)
        if qt.coded_scales:
            d16, m16 = scale_codes.project(d16, m16, grid, qt)
        best.offer(f"gptq{k + 1}+refit", codes, d16, m16)
    best.offer("search", *_unpacked(search, qt, cols))
    best.offer("rtn", *_unpacked(rtn, qt, cols))
    log.debug("%s %s gptq: rows kept per candidate %s; objective %.4g", qt.name, w.shape, best.kept, best.err.sum())
    u_out, d_out, m_out = best.u, best.d, best.m
    if qt.coded_scales:  # every candidate's values lie on the grid: their own codes come back
        d_out, m_out = scale_codes.encode(d_out, m_out, grid, qt)
    parts = {"codes": pack_codes(u_out, qt), "scales": d_out}
    if qt.asym:
        parts["mins"] = m_out
    if qt.coded_scales:
        parts["grid"] = np.asarray(grid, np.float32).copy()
    return parts
