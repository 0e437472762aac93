"""Pieces shared by model families: config parsing helpers, RoPE frequencies, the KV cache."""

from __future__ import annotations

import math

import numpy as np

from lowbit.errors import SourceError


def rope_config(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from either the older rope_theta + rope_scaling keys or the newer
    rope_parameters (transformers >= 5)."""
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        scaling = None if kind == "default" else {**scaling, "rope_type": kind}
    return theta, scaling


SUPPORTED_ROPE = ("linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies [head_dim / 2], float32, computed the way transformers does."""
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)))
    inv = inv.astype(np.float32)
    if not scaling:
        return inv
    kind = scaling["rope_type"]
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv / np.float32(factor)).astype(np.float32)
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old_len / low, old_len / high
        wavelen = (2 * math.pi / inv).astype(np.float32)
        out = np.where(wavelen > low_wl, inv / factor, inv).astype(np.float32)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, out).astype(np.float32)
    raise SourceError(f"unsupported rope scaling {kind!r}; supported: {', '.join(SUPPORTED_ROPE)}")


def check_rope(cfg: dict) -> None:
    _, scaling = rope_config(cfg)
    if scaling and scaling["rope_type"] not in SUPPORTED_ROPE:
        raise SourceError(
            f"unsupported rope scaling {scaling['rope_type']!r}; supported: {', '.join(SUPPORTED_ROPE)}"
        )


def rope_tables(inv_freq: np.ndarray, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [n_pos, head_dim / 2] in float32 (angles computed in float32 like transformers)."""
    ang = np.arange(n_pos, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


class KVCache:
    """Preallocated keys/values per layer: [n_kv_heads, ctx, head_dim] float32."""

    def __init__(self, n_layers: int, n_kv: int, ctx: int, head_dim: int):
        self.ctx = ctx
        self.k = [np.zeros((n_kv, ctx, head_dim), dtype=np.float32) for _ in range(n_layers)]
        self.v = [np.zeros((n_kv, ctx, head_dim), dtype=np.float32) for _ in range(n_layers)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)
