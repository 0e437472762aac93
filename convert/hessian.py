"""The input Hessian of a linear layer for GPTQ: its accumulation over calibration inputs and its factorisation.

``H = X^T X / n`` over the calibration inputs ``X`` (``[n, cols]``) of one linear layer (:class:`HessianAccumulator`);
:func:`prepare_hessian` damps it and computes what the GPTQ sweep needs, the upper Cholesky factor ``U`` of the
(permuted) inverse, once per distinct input (:class:`PreparedHessian`). The O(cols^3) work of a conversion is here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6  # each retry multiplies the damping by 10 when H + damp*I is not numerically positive definite

# ------------------------------------------------------------------------------------------------ Hessian


# rows per float32 product: relative rounding ~ sqrt(2048) * 6e-8, far below sampling noise; calls bring one
# sequence (256 rows) at a time, so rows are buffered: the float64 sum costs O(cols^2) memory traffic per product
CHUNK_ROWS = 2048


class HessianAccumulator:
    """Running ``X^T X`` (float64) and row count over calibration inputs of one linear layer; O(cols^2) memory."""

    def __init__(self, cols: int):
        if not isinstance(cols, (int, np.integer)) or cols < 1:
            raise LowbitError(f"HessianAccumulator needs a positive column count, got {cols!r}")
        self.cols = int(cols)
        self.xtx = np.zeros((self.cols, self.cols), np.float64)
        self.n = 0
        self._buf: np.ndarray | None = None  # rows not yet in xtx (float32 [CHUNK_ROWS, cols])
        self._fill = 0

    def add(self, x: np.ndarray) -> None:
        """Accumulate inputs ``x`` (``[n, cols]``, or ``[..., cols]``: leading axes are flattened)."""
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.cols:
            raise LowbitError(f"calibration input must have {self.cols} columns, got shape {x.shape}")
        x = np.ascontiguousarray(x.reshape(-1, self.cols), dtype=np.float32)
        if not np.isfinite(x).all():
            raise LowbitError("calibration input contains NaN or infinite values")
        # float32 products (BLAS ssyrk, ~2x dgemm) over chunks of CHUNK_ROWS rows, summed in float64
        if self._buf is None:
            self._buf = np.empty((CHUNK_ROWS, self.cols), np.float32)
        r0 = 0
        while r0 < len(x):
            k = min(len(x) - r0, CHUNK_ROWS - self._fill)
            self._buf[self._fill : self._fill + k] = x[r0 : r0 + k]
            self._fill += k
            r0 += k
            if self._fill == CHUNK_ROWS:
                self._flush()
        self.n += len(x)

    def _flush(self) -> None:
        if self._fill:
            xc = self._buf[: self._fill]
            self.xtx += (xc.T @ xc).astype(np.float64)
            self._fill = 0

    def hessian(self) -> np.ndarray:
        """``H = X^T X / n`` (float64 ``[cols, cols]``)."""
        if self.n == 0:
            raise LowbitError("no calibration inputs were accumulated")
        self._flush()
        h = self.xtx / self.n
        return (h + h.T) * 0.5  # exact symmetry whatever the summation order did

    def diag(self) -> np.ndarray:
        """Mean squared input per column (float64 ``[cols]``): the importance vector."""
        if self.n == 0:
            raise LowbitError("no calibration inputs were accumulated")
        self._flush()
        return np.diag(self.xtx) / self.n

# ------------------------------------------------------------------------------------------------ factorisation


def check_hessian(hessian, damp) -> np.ndarray:
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] < 1:
        raise LowbitError(f"GPTQ: the Hessian must be a square [cols, cols] matrix, got shape {h.shape}")
    if not np.isfinite(h).all():
        raise LowbitError("GPTQ: the Hessian contains NaN or infinite values")
    diag = np.diag(h)
    if (diag < 0).any():
        raise LowbitError(f"GPTQ: the Hessian has {int((diag < 0).sum())} negative diagonal entries")
    top = float(np.abs(h).max())
    if top > 0 and float(np.abs(h - h.T).max()) > 1e-6 * top:
        raise LowbitError("GPTQ: the Hessian is not symmetric")
    if not np.isfinite(damp) or damp < 0:
        raise LowbitError(f"GPTQ: damp must be a finite non-negative number, got {damp!r}")
    return (h + h.T) * 0.5

def damped(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(H with dead columns set to 1 and ``damp * mean(diag)`` added, dead-column mask)."""
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    idx = np.arange(len(h))
    h[idx, idx] += damp * float(np.mean(np.diag(h)))
    return h, dead


TRI_BASE = 128  # below this size a triangular block is inverted by LAPACK directly


def lower_inverse(low: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by halves, ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``:
    ~n^3/3 multiply-adds, all in BLAS products (numpy has no triangular inverse)."""
    n = len(low)
    if n <= TRI_BASE:
        return np.tril(np.linalg.inv(low))
    k = n // 2
    a_inv = lower_inverse(low[:k, :k])
    c_inv = lower_inverse(low[k:, k:])
    out = np.zeros_like(low)
    out[:k, :k] = a_inv
    out[k:, k:] = c_inv
    out[k:, :k] = -(c_inv @ (low[k:, :k] @ a_inv))
    return out


def inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper ``U`` with ``U^T U = (H + extra)^-1``; the damping grows tenfold while H is not positive definite.

    With ``P`` the order reversal and ``P H P = L L^T`` (lower Cholesky), ``U = P L^-1 P``: one Cholesky and one
    triangular inverse instead of a general inverse and a second Cholesky (~4x fewer operations).
    """
    mean = float(np.mean(np.diag(h)))
    extra = 0.0
    idx = np.arange(len(h))
    rev = idx[::-1]
    for _ in range(MAX_DAMP_RETRIES + 1):
        try:
            hh = h[np.ix_(rev, rev)]
            hh[idx, idx] += extra
            u = lower_inverse(np.linalg.cholesky(hh))[np.ix_(rev, rev)]
            if np.isfinite(u).all() and (np.diag(u) > 0).all():
                if extra:
                    log.warning("GPTQ: the Hessian needed %.3g extra damping to be positive definite", extra / mean)
                return u
        except np.linalg.LinAlgError:
            pass
        extra = max(extra * 10.0, max(damp, 1e-4) * mean * 10.0)
    raise LowbitError("GPTQ: the Hessian is not positive definite even after heavy damping")


@dataclass(frozen=True)
class PreparedHessian:
    """What GPTQ needs of one input's Hessian, computed once (:func:`prepare_hessian`) and shared by every matrix
    and row block that reads the same input (q/k/v, gate/up, a matrix split by rows): the O(cols^3) work."""

    h: np.ndarray  # float64 [cols, cols], symmetrised, undamped: its diagonal is the default importance
    hd: np.ndarray  # damped (see damped), float64: the objective
    h32: np.ndarray  # hd as float32: the objective's products
    perm: np.ndarray  # column order of the sweep (act-order, dead columns last)
    u32: np.ndarray  # float32 upper Cholesky factor of hd[perm][:, perm]^-1

    @property
    def cols(self) -> int:
        return len(self.h)


def prepare_hessian(hessian: np.ndarray, damp: float = 0.01, act_order: bool = True) -> PreparedHessian:
    """Check, damp and factor ``hessian`` (``[cols, cols]``, e.g. :meth:`HessianAccumulator.hessian`) for GPTQ."""
    return factor(check_hessian(hessian, damp), damp, act_order)


def factor(h: np.ndarray, damp: float, act_order: bool) -> PreparedHessian:
    hd, dead = damped(h, float(damp))
    cols = len(h)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    perm = np.concatenate([perm[~dead[perm]], perm[dead[perm]]])  # dead columns last: they affect nothing
    u_chol = inverse_cholesky(hd[np.ix_(perm, perm)], float(damp))
    return PreparedHessian(h, hd, hd.astype(np.float32), perm, u_chol.astype(np.float32))
