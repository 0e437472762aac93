"""8-bit coded group scales (the ``..._g{G}s8`` types): the scales and mins of a group type stored in one byte each.

A group type spends 16 bits on each group's scale ``d`` (and 16 more on its min ``m``): 0.5 of a 4-bit g32 type's
5.0 bits per weight. The ``s8`` types code them in 8 bits against a per-tensor grid, as llama.cpp's k-quants code
their 6-bit scales against a per-super-block float16 (here one grid per matrix, so rows of any width, e.g. 576,
need no super-blocks):

- ``grid`` float32 ``[2]`` = ``(b, t)``: magnitudes ``|d| = 2**(b + t * k)`` for ``k`` in ``0 .. K-1``, a
  logarithmic ladder (every scale keeps the same relative precision, whatever the row's magnitude); ``t`` is at
  least :data:`MIN_STEP` octaves and widens when the matrix's scales span more than ``K - 1`` such steps (then the
  smallest ones are coded as the lowest level);
- ``scales`` uint8: asymmetric types ``c = k + 1`` (``K = 255``), symmetric types bit 7 the sign and bits 0-6
  ``k + 1`` (``K = 127``: the symmetric search's scales are signed); ``c & 0x7F == 0`` is ``d = 0``;
- ``mins`` uint8 (asymmetric types): the zero point ``z = c * max_code / 255`` in code units, ``m = d * z``
  (``z`` in ``[0, max_code]``: the grid always spans zero).

Decoded values are rounded to float16 (``d16 = f16(±2**(b + t k))``, ``m16 = f16(d16 * z)``), so the kernels run
an ``s8`` tensor as its float16 twin with exactly these values, and the quantizers score exactly them.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import FormatError
from lowbit.formats.qtypes import QType

MIN_STEP = 1.0 / 32  # octaves between neighbouring scale levels: 2.2% apart, at most 1.1% off
MAX_STEP = 1.0  # a grid wider than this (a 2**127 range of scales) is not something a converter writes


def levels(qt: QType) -> int:
    """K: the number of non-zero scale magnitudes of ``qt``."""
    return 255 if qt.asym else 127


# the grid reaches down to this quantile of a matrix's scales; smaller ones take the lowest level
FLOOR_QUANTILE = 0.001


def fit_grid(d: np.ndarray, qt: QType, headroom: float = 0.0) -> np.ndarray:
    """The grid ``(b, t)`` for the scales ``d`` of one matrix: the largest magnitude (times ``2**headroom``) on the
    top level, steps of at least :data:`MIN_STEP` octaves, reaching down to the :data:`FLOOR_QUANTILE` of the non-zero
    magnitudes when ``K - 1`` steps of at most :data:`MAX_STEP` can (a few near-empty groups do not coarsen every
    other group's scale)."""
    mag = np.abs(np.asarray(d, dtype=np.float64)).ravel()
    mag = mag[np.isfinite(mag) & (mag > 0)]
    if mag.size == 0:
        return np.array([0.0, MIN_STEP], np.float32)
    logs = np.log2(mag)
    top = float(logs.max()) + headroom
    span = top - float(np.quantile(logs, FLOOR_QUANTILE))
    k = levels(qt)
    t = float(np.clip(span / (k - 1), MIN_STEP, MAX_STEP))
    t = float(np.float32(t))
    return np.array([top - t * (k - 1), t], np.float32)


def check_grid(grid: np.ndarray) -> tuple[float, float]:
    g = np.asarray(grid, dtype=np.float32).ravel()
    if g.shape != (2,) or not np.isfinite(g).all() or not (0 < g[1] <= MAX_STEP) or abs(float(g[0])) > 64:
        raise FormatError(f"corrupt scale grid {g.tolist()[:4]}: expected finite (base, step) with 0 < step <= 1")
    return float(g[0]), float(g[1])


def _magnitudes(grid: np.ndarray, k: np.ndarray) -> np.ndarray:
    """float16 magnitudes as float32 for level indices ``k`` (0-based)."""
    b, t = check_grid(grid)
    with np.errstate(over="ignore"):
        return np.exp2(b + t * k.astype(np.float64)).astype(np.float16).astype(np.float32)


def decode(sc: np.ndarray, mc: np.ndarray | None, grid: np.ndarray, qt: QType):
    """(d16, m16 or None): the float16 scales (and mins) the codes stand for."""
    sc = np.asarray(sc, dtype=np.uint8)
    kk = (sc & 0x7F).astype(np.int64) if not qt.asym else sc.astype(np.int64)
    mag = np.where(kk > 0, _magnitudes(grid, np.maximum(kk - 1, 0)), np.float32(0))
    if not qt.asym:
        mag = np.where(sc & 0x80, -mag, mag)
    d16 = mag.astype(np.float16)
    if not qt.asym:
        return d16, None
    z = np.asarray(mc, dtype=np.uint8).astype(np.float32) * np.float32(qt.max_code / 255.0)
    return d16, (d16.astype(np.float32) * z).astype(np.float16)


def _nearest(target: np.ndarray, lo: np.ndarray, vlo: np.ndarray, vhi: np.ndarray) -> np.ndarray:
    """Of the levels ``lo`` and ``lo + 1`` (values ``vlo``, ``vhi``), the one nearer ``target`` (ties: ``lo``)."""
    return np.where(np.abs(vhi - target) < np.abs(vlo - target), lo + 1, lo)


def encode(d: np.ndarray, m: np.ndarray | None, grid: np.ndarray, qt: QType):
    """(scale codes, min codes or None): each float ``d`` on the nearest level (as float16 values), then ``m`` on the
    nearest zero point for that coded ``d``. Values already on the grid get their own codes back."""
    b, t = check_grid(grid)
    k_top = levels(qt) - 1
    d = np.asarray(d, dtype=np.float32)
    mag = np.abs(d) if not qt.asym else np.maximum(d, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        kf = (np.log2(mag.astype(np.float64)) - b) / t
    lo = np.clip(np.floor(np.nan_to_num(kf, nan=0.0, neginf=0.0, posinf=k_top)), 0, k_top).astype(np.int64)
    hi = np.minimum(lo + 1, k_top)
    k = _nearest(mag, lo, _magnitudes(grid, lo), _magnitudes(grid, hi))
    k = np.minimum(k, k_top)
    sc = np.where(mag > 0, k + 1, 0).astype(np.int64)
    if not qt.asym:
        sc = np.where((d < 0) & (sc > 0), sc | 0x80, sc)
        return sc.astype(np.uint8), None
    dq = np.where(sc > 0, _magnitudes(grid, np.maximum(sc - 1, 0)), np.float32(0)).astype(np.float16)
    df = dq.astype(np.float32)
    unit = np.float32(qt.max_code / 255.0)
    m = np.asarray(m, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zf = np.where(df > 0, m / np.where(df > 0, df, 1) / unit, 0)
    zlo = np.clip(np.floor(np.nan_to_num(zf)), 0, 255).astype(np.int64)
    zhi = np.minimum(zlo + 1, 255)

    def mval(z):
        return (df * (z.astype(np.float32) * unit)).astype(np.float16).astype(np.float32)

    mc = np.minimum(_nearest(m, zlo, mval(zlo), mval(zhi)), 255)
    return sc.astype(np.uint8), mc.astype(np.uint8)


def project(d: np.ndarray, m: np.ndarray | None, grid: np.ndarray, qt: QType):
    """(d16, m16 or None): the float16 values of the codes :func:`encode` gives ``d`` and ``m``."""
    return decode(*encode(d, m, grid, qt), grid, qt)


def decode_parts(parts: dict[str, np.ndarray], qt: QType):
    """(d16, m16 or None) of a coded-scale tensor's stored parts (``scales``, ``mins``, ``grid``)."""
    return decode(parts["scales"], parts.get("mins"), parts["grid"], qt)


def code_parts(parts: dict[str, np.ndarray], qt: QType) -> dict[str, np.ndarray]:
    """The parts of coded-scale type ``qt`` for the float16 twin's ``parts``: the scales (and mins) coded on a grid
    fitted to those scales, the codes as they are."""
    grid = fit_grid(parts["scales"], qt)
    sc, mc = encode(parts["scales"], parts.get("mins"), grid, qt)
    return {"codes": parts["codes"], "scales": sc, **({"mins": mc} if qt.asym else {}), "grid": grid}
