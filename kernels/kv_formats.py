"""Storage formats of the KV cache, and their numpy reference (the numba kernels in kernels/cpu_kv.py write them and
kernels/cpu_attention.py reads them; tests hold both to this file).

One cached row is one head's key or value at one position, ``head_dim`` floats:

- ``f32``: float32 (4 bytes per element).
- ``f16``: float16, stored as its uint16 bits (numba has no float16), rounded to nearest even: the default.
- ``q8``: int8 codes in groups of 32 (or the whole row where the head dim is no multiple of 32), one float16 scale
  per group, symmetric: x ≈ d · q with d = max|x| / 127 — 34 bytes per 32 elements, like llama.cpp's q8_0.
- ``q4``: 4-bit codes in the same groups, one float16 scale each: d = x_m / -8 with x_m the group's element of
  largest magnitude (so it is exactly -8 · d, and the other side keeps up to 7 levels), q = round(x / d) + 8 in
  0..15, x ≈ d · (q - 8) — 18 bytes per 32 elements, like llama.cpp's q4_0. Byte i of a group holds element i in
  its low nibble and element i + G/2 in its high one, so both halves decode with contiguous loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError

GROUP = 32  # elements per scale of the quantized formats (where the head dim allows)


@dataclass(frozen=True)
class KVFormat:
    name: str
    bits: int
    dtype: type

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def group(self, head_dim: int) -> int:
        """Elements per scale: GROUP where it divides the head dim, else the whole row; 0 for float formats."""
        if not self.quantized:
            return 0
        return GROUP if head_dim % GROUP == 0 else head_dim

    def check(self, head_dim: int) -> None:
        if self.bits == 4 and self.group(head_dim) % 2:
            raise LowbitError(f"a 4-bit KV cache needs an even head dim (this model's is {head_dim})")

    def shapes(self, rows: tuple[int, ...], head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(data shape, scales shape) of a cache of ``rows`` (e.g. (n_kv, ctx)) rows; float formats have an empty
        scales array."""
        g = self.group(head_dim)
        width = head_dim // 2 if self.bits == 4 else head_dim
        return (*rows, width), (*rows, head_dim // g if g else 0)

    def row_bytes(self, head_dim: int) -> int:
        data, scales = self.shapes((), head_dim)
        return data[0] * np.dtype(self.dtype).itemsize + scales[0] * 2


FORMATS = {
    "f32": KVFormat("f32", 32, np.float32),
    "f16": KVFormat("f16", 16, np.uint16),
    "q8": KVFormat("q8", 8, np.int8),
    "q4": KVFormat("q4", 4, np.uint8),
}
_BY_BITS = {"32": "f32", "16": "f16", "8": "q8", "4": "q4", "f32": "f32", "f16": "f16", "q8": "q8", "q4": "q4"}
KV_BITS_HELP = ("KV cache: 16 (float16, default), 32 (float32), 8 or 4 (int8/int4 groups of 32 with float16 "
                "scales), or keys and values apart, e.g. k8,v4")


@dataclass(frozen=True)
class KVSpec:
    """The formats of a cache's keys and of its values."""

    k: KVFormat
    v: KVFormat

    @classmethod
    def parse(cls, text: str | int | None) -> KVSpec:
        """'16', '8', '4', '32' (or f16, q8, q4, f32) for both, or 'k8,v4' for keys and values apart."""
        if text is None:
            return DEFAULT
        if isinstance(text, KVSpec):
            return text
        raw = str(text).strip().lower()
        items = raw.split(",")
        parts = dict(p.split("=", 1) if "=" in p else (p[:1], p[1:]) for p in items)
        try:
            if len(items) == 1:
                f = FORMATS[_BY_BITS[raw]]
                return cls(f, f)
            if len(items) != 2 or sorted(parts) != ["k", "v"]:
                raise KeyError(raw)
            return cls(FORMATS[_BY_BITS[parts["k"]]], FORMATS[_BY_BITS[parts["v"]]])
        except KeyError:
            raise LowbitError(f"bad --kv-bits {text!r}: expected 16, 32, 8, 4 or k<bits>,v<bits> (e.g. k8,v4)"
                              ) from None

    @property
    def label(self) -> str:
        return self.k.name if self.k == self.v else f"k{self.k.bits},v{self.v.bits}"

    def check(self, head_dim: int) -> None:
        self.k.check(head_dim)
        self.v.check(head_dim)

    def bytes_per_token(self, n_layers: int, n_kv: int, head_dim: int) -> int:
        """Cache bytes one position takes over all layers (keys and values, scales included)."""
        return n_layers * n_kv * (self.k.row_bytes(head_dim) + self.v.row_bytes(head_dim))


DEFAULT = KVSpec(FORMATS["f16"], FORMATS["f16"])
F32 = KVSpec(FORMATS["f32"], FORMATS["f32"])


def quantize(fmt: KVFormat, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference encoding of rows x[..., head_dim] (float32): (data, scales) as the cache stores them."""
    x = np.asarray(x, dtype=np.float32)
    hd = x.shape[-1]
    data_shape, scale_shape = fmt.shapes(x.shape[:-1], hd)
    if fmt.name == "f32":
        return x.copy(), np.zeros(scale_shape, np.uint16)
    if fmt.name == "f16":
        return x.astype(np.float16).view(np.uint16), np.zeros(scale_shape, np.uint16)
    g = fmt.group(hd)
    xg = x.reshape(*x.shape[:-1], hd // g, g)
    if fmt.bits == 8:
        d = (np.abs(xg).max(axis=-1) / np.float32(127)).astype(np.float16)
        inv = _inverse(d)
        q = np.clip(np.rint(xg * inv[..., None]), -127, 127).astype(np.int8)
        return q.reshape(data_shape), d.view(np.uint16)
    idx = np.abs(xg).argmax(axis=-1)[..., None]
    d = (np.take_along_axis(xg, idx, axis=-1)[..., 0] / np.float32(-8)).astype(np.float16)
    inv = _inverse(d)
    q = np.clip(np.rint(xg * inv[..., None]) + 8, 0, 15).astype(np.uint8)
    half = g // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed.reshape(data_shape), d.view(np.uint16)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1 / d in float32 where d (float16) is not 0, else 0 (an all-zero group: codes 0)."""
    d32 = d.astype(np.float32)
    return np.divide(np.float32(1), d32, out=np.zeros_like(d32), where=d32 != 0)


def dequantize(fmt: KVFormat, data: np.ndarray, scales: np.ndarray, head_dim: int) -> np.ndarray:
    """Reference decoding: float32 rows [..., head_dim]."""
    if fmt.name == "f32":
        return np.asarray(data, dtype=np.float32)
    if fmt.name == "f16":
        return data.view(np.float16).astype(np.float32)
    g = fmt.group(head_dim)
    d = scales.view(np.float16).astype(np.float32)[..., None]
    lead = data.shape[:-1]
    if fmt.bits == 8:
        q = data.reshape(*lead, head_dim // g, g).astype(np.float32)
    else:
        b = data.reshape(*lead, head_dim // g, g // 2)
        q = np.concatenate([b & 15, b >> 4], axis=-1).astype(np.float32) - 8
    return (q * d).reshape(*lead, head_dim)
