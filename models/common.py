"""Pieces shared by model families: config parsing helpers, RoPE frequencies, the cache a model makes, several
sequences in one pass."""

from __future__ import annotations

import math

import numpy as np

from lowbit.errors import SourceError
from lowbit.kernels import kv_formats
from lowbit.kernels.kv_cache import KVCache
from lowbit.kernels.kv_formats import KVSpec


def rope_config(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from either the older rope_theta + rope_scaling keys or the newer
    rope_parameters (transformers >= 5). longrope ("su" in older configs) gets its original context length and
    attention factor filled in the way transformers computes them."""
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and params:
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        rest = {k: v for k, v in scaling.items() if k != "type"}
        scaling = None if kind == "default" else {**rest, "rope_type": kind}
    if scaling and scaling["rope_type"] in ("su", "longrope"):
        scaling = longrope_params(scaling, cfg)
    return theta, scaling


def partial_rotary_factor(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0)


def longrope_params(scaling: dict, cfg: dict) -> dict:
    """Normalised longrope parameters: short/long factors, original_max_position_embeddings and attention_factor.

    Like transformers, a top-level original_max_position_embeddings wins; the factor defaults to
    max_position_embeddings / original, and the attention factor to sqrt(1 + ln(factor) / ln(original))."""
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    orig = int(
        cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings") or max_pos
    )
    factor = scaling.get("factor") or max_pos / orig
    att = scaling.get("attention_factor")
    if att is None:
        att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return {
        "rope_type": "longrope",
        "short_factor": [float(f) for f in scaling["short_factor"]],
        "long_factor": [float(f) for f in scaling["long_factor"]],
        "original_max_position_embeddings": orig,
        "attention_factor": float(att),
    }


SUPPORTED_ROPE = ("linear", "llama3", "longrope", "freq_factors")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, ctx: int = 0) -> np.ndarray:
    """Inverse frequencies [head_dim / 2], float32, computed the way transformers does (head_dim here is the rotated
    width). longrope picks its long factors when the context ``ctx`` is beyond the original training length, like
    llama.cpp (transformers switches per forward call on the sequence length, which agrees whenever a whole sequence
    sits on one side of that length)."""
    shape = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    base = np.float32(theta) ** shape
    inv = (1.0 / base).astype(np.float32)
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
    if kind == "freq_factors":  # llama.cpp's rope_freqs tensor (llama3 scaling precomputed): divisors per frequency
        factors = np.asarray(scaling["factors"], dtype=np.float32)
        if factors.shape != inv.shape:
            raise SourceError(f"rope frequency factors have {factors.size} entries, expected {inv.size}")
        return (inv / factors).astype(np.float32)
    if kind == "longrope":
        long = ctx > int(scaling["original_max_position_embeddings"])
        ext = np.asarray(scaling["long_factor" if long else "short_factor"], dtype=np.float32)
        if ext.shape != inv.shape:
            raise SourceError(f"longrope factors have {ext.size} entries, expected {inv.size}")
        return (np.float32(1.0) / (ext * base)).astype(np.float32)
    raise SourceError(f"unsupported rope scaling {kind!r}; supported: {', '.join(SUPPORTED_ROPE)}")


def check_rope(cfg: dict) -> None:
    _, scaling = rope_config(cfg)
    if scaling and scaling["rope_type"] not in SUPPORTED_ROPE:
        raise SourceError(f"unsupported rope scaling {scaling['rope_type']!r}; supported: {', '.join(SUPPORTED_ROPE)}")


def rope_attention_factor(scaling: dict | None) -> float:
    """The factor transformers multiplies cos and sin by (longrope's attention scaling); 1 otherwise."""
    return float(scaling.get("attention_factor", 1.0)) if scaling and scaling["rope_type"] == "longrope" else 1.0


def rope_tables(inv_freq: np.ndarray, n_pos: int, mscale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [n_pos, rotated dims / 2] in float32 (angles computed in float32 like transformers), times
    ``mscale``."""
    ang = np.arange(n_pos, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    if mscale != 1.0:
        cos, sin = cos * np.float32(mscale), sin * np.float32(mscale)
    return cos, sin


def cache_for(args, ctx: int, spec: KVSpec = kv_formats.DEFAULT, new=KVCache):
    """An empty cache for a model of ``args`` (a family's ModelArgs) at ``ctx`` positions, made by ``new`` (a
    backend's ``new_cache``; the CPU's :class:`KVCache` by default): sliding-window layers get rings."""
    windows = [args.window(i) for i in range(args.num_hidden_layers)]
    return new(args.num_hidden_layers, args.num_key_value_heads, ctx, args.head_dim, spec, windows)


class Segments:
    """Several sequences in one forward pass (continuous batching): rows ``[a, b)`` of the batch are one sequence's
    tokens at positions ``start..`` of its own cache. Passed where a forward pass takes its cache."""

    def __init__(self, caches: list, starts: list[int], lengths: list[int]):
        if not (len(caches) == len(starts) == len(lengths)) or any(n < 1 for n in lengths):
            raise ValueError("segments need one cache, start and positive length each")
        ends = np.cumsum(lengths)
        self.parts = [(c, int(s), int(e - n), int(e)) for c, s, n, e in zip(caches, starts, lengths, ends)]
        self.last_rows = ends - 1  # the row whose logits continue each sequence
        # a decode step of each sequence (one row each): the backend takes them in one kernel call per layer
        self.steps = all(n == 1 for n in lengths)
        self.starts = [int(s) for s in starts]
        self.caches = list(caches)

    def layers(self, li: int) -> list:
        """Layer ``li`` of each sequence's cache."""
        return [c.layer(li) for c in self.caches]
