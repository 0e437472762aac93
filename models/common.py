"""Pieces shared by model families: config parsing helpers, RoPE frequencies, the KV cache."""

from __future__ import annotations

import math

import numpy as np

from lowbit.errors import SourceError
from lowbit.kernels import kv_formats
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


RING_TOKENS = 512  # a sliding-window layer's ring holds its window plus this many positions (see KVCache)


def ring_rows(window: int, ctx: int) -> int:
    """Rows of a layer's cache: the whole context, or for a sliding window of w keys a ring of w + RING_TOKENS - 1
    rows where that is smaller."""
    return min(ctx, window + RING_TOKENS - 1) if window > 0 else ctx


class KVCache:
    """Preallocated keys and values per layer in the storage formats of ``spec`` (kernels/kv_formats.py): data
    [n_kv_heads, rows, width] and scales [n_kv_heads, rows, groups] (empty for float formats) for keys and values.

    Position p is row p % rows. A layer has a row per position of the context, or, with a sliding window of w keys
    (``windows``), a ring of w + RING_TOKENS - 1 rows (``ring_rows``): enough that one forward pass of up to
    RING_TOKENS tokens finds every key its queries see after writing its own, and that the last RING_TOKENS
    positions can be taken back (a cached prefix reused from a shorter point, ``can_rewind``)."""

    def __init__(self, n_layers: int, n_kv: int, ctx: int, head_dim: int, spec: KVSpec = kv_formats.DEFAULT,
                 windows: list[int] | None = None):
        spec.check(head_dim)
        self.ctx = ctx
        self.spec = spec
        self.head_dim = head_dim
        self.rows = [ring_rows(w, ctx) for w in (windows or [0] * n_layers)]
        if len(self.rows) != n_layers:
            raise ValueError("one window per layer")
        ring = [r for r in self.rows if r < ctx]
        # tokens one forward pass may write, and positions that may be taken back (ctx: no limit)
        self.max_tokens = RING_TOKENS if ring else ctx
        self.k, self.ks, self.v, self.vs = [], [], [], []
        for rows in self.rows:
            kd, ks = spec.k.shapes((n_kv, rows), head_dim)
            vd, vs = spec.v.shapes((n_kv, rows), head_dim)
            self.k.append(np.zeros(kd, dtype=spec.k.dtype))
            self.ks.append(np.zeros(ks, dtype=np.uint16))
            self.v.append(np.zeros(vd, dtype=spec.v.dtype))
            self.vs.append(np.zeros(vs, dtype=np.uint16))

    def can_rewind(self, held: int, keep: int) -> bool:
        """Whether a cache holding positions 0..held-1 can go on from position ``keep`` (reusing 0..keep-1): always
        without rings; with them only if the positions a window still needs were not overwritten."""
        return held - keep <= self.max_tokens

    def layer(self, li: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(key data, key scales, value data, value scales) of layer li, as the kernels take them."""
        return self.k[li], self.ks[li], self.v[li], self.vs[li]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for arrays in (self.k, self.ks, self.v, self.vs) for a in arrays)

    def shift(self, held: int, keep: int, discard: int, rotate) -> None:
        """Context shift of a cache holding positions 0..held-1: positions keep..keep+discard-1 are dropped and
        keep+discard..held-1 become keep..held-discard-1, their keys passed through ``rotate(layer, keys)`` (float32
        [n_kv, m, head_dim] -> the same, re-rotated to the new positions) and stored again in the cache's format.
        A ring layer moves only the positions it still holds (the older ones lie outside its window anyway)."""
        if not (0 <= keep and discard >= 1 and keep + discard <= held <= self.ctx):
            raise ValueError(f"bad context shift: keep {keep}, discard {discard} of {held}")
        for li, rows in enumerate(self.rows):
            moved = np.arange(max(keep + discard, held - rows), held)
            if moved.size == 0:
                continue
            old, new = moved % rows, (moved - discard) % rows
            keys = kv_formats.dequantize(self.spec.k, self.k[li][:, old], self.ks[li][:, old], self.head_dim)
            kd, ks = kv_formats.quantize(self.spec.k, rotate(li, keys))
            vd, vs = self.v[li][:, old], self.vs[li][:, old]  # fancy indexing: copies, so the moves cannot overlap
            self.k[li][:, new], self.ks[li][:, new] = kd, ks
            self.v[li][:, new], self.vs[li][:, new] = vd, vs

    def copy_prefix(self, src: KVCache, n: int) -> None:
        """Positions 0..n-1 of every layer from ``src`` (a cache of the same formats and rows; with rings, only
        where ``src.can_rewind(its length, n)``)."""
        if src.spec != self.spec or src.rows != self.rows:
            raise ValueError("copy_prefix needs caches of one format and shape")
        for mine, theirs in zip((self.k, self.ks, self.v, self.vs), (src.k, src.ks, src.v, src.vs)):
            for dst, s in zip(mine, theirs):
                m = min(n, dst.shape[1])
                dst[:, :m] = s[:, :m]

    def keys(self, li: int, n: int) -> np.ndarray:
        """Keys of positions 0..n-1 of layer li as float32 [n_kv, n, head_dim] (decoded: for tests and tools; a
        ring layer needs n <= its rows)."""
        return kv_formats.dequantize(self.spec.k, self.k[li][:, :n], self.ks[li][:, :n], self.head_dim)

    def values(self, li: int, n: int) -> np.ndarray:
        return kv_formats.dequantize(self.spec.v, self.v[li][:, :n], self.vs[li][:, :n], self.head_dim)


def cache_for(args, ctx: int, spec: KVSpec = kv_formats.DEFAULT) -> KVCache:
    """An empty cache for a model of ``args`` (a family's ModelArgs) at ``ctx`` positions: sliding-window layers get
    rings (KVCache)."""
    windows = [args.window(i) for i in range(args.num_hidden_layers)]
    return KVCache(args.num_hidden_layers, args.num_key_value_heads, ctx, args.head_dim, spec, windows)


class Segments:
    """Several sequences in one forward pass (continuous batching): rows ``[a, b)`` of the batch are one sequence's
    tokens at positions ``start..`` of its own cache. Passed where a forward pass takes its cache."""

    def __init__(self, caches: list, starts: list[int], lengths: list[int]):
        if not (len(caches) == len(starts) == len(lengths)) or any(n < 1 for n in lengths):
            raise ValueError("segments need one cache, start and positive length each")
        ends = np.cumsum(lengths)
        self.parts = [(c, int(s), int(e - n), int(e)) for c, s, n, e in zip(caches, starts, lengths, ends)]
        self.last_rows = ends - 1  # the row whose logits continue each sequence
