"""The CPU KV cache: one :class:`LayerCache` per layer, each owning its storage and its policy (the whole context, or
a ring for a sliding window), in the storage formats of kernels/kv_formats.py."""

from __future__ import annotations

import numpy as np

from lowbit.kernels import kv_formats
from lowbit.kernels.kv_formats import KVSpec

RING_TOKENS = 512  # a sliding-window layer's ring holds its window plus this many positions (see LayerCache)


def ring_rows(window: int, ctx: int) -> int:
    """Rows of a layer's cache: the whole context, or for a sliding window of w keys a ring of w + RING_TOKENS - 1
    rows where that is smaller."""
    return min(ctx, window + RING_TOKENS - 1) if window > 0 else ctx


class LayerCache:
    """Keys and values of one layer: data [n_kv_heads, rows, width] and scales [n_kv_heads, rows, groups] (empty for
    float formats) in the formats of ``spec``. Position p is row p % rows: ``rows`` is the whole context, or with a
    sliding window of w keys a ring of w + RING_TOKENS - 1 rows (``ring_rows``), enough that one forward pass of up
    to RING_TOKENS tokens finds every key its queries see after writing its own, and that the last RING_TOKENS
    positions can be taken back.

    The kernels take a layer as its four arrays: ``tuple(layer)`` / ``*layer`` is (key data, key scales, value
    data, value scales)."""

    def __init__(self, spec: KVSpec, n_kv: int, ctx: int, head_dim: int, window: int = 0):
        self.spec = spec
        self.head_dim = head_dim
        self.window = window
        self.rows = ring_rows(window, ctx)
        self.ring = self.rows < ctx
        kd, ks = spec.k.shapes((n_kv, self.rows), head_dim)
        vd, vs = spec.v.shapes((n_kv, self.rows), head_dim)
        self.k = np.zeros(kd, dtype=spec.k.dtype)
        self.ks = np.zeros(ks, dtype=np.uint16)
        self.v = np.zeros(vd, dtype=spec.v.dtype)
        self.vs = np.zeros(vs, dtype=np.uint16)

    def __iter__(self):
        return iter((self.k, self.ks, self.v, self.vs))

    def __len__(self) -> int:
        return 4

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.ks.nbytes + self.v.nbytes + self.vs.nbytes

    def shift(self, held: int, keep: int, discard: int, rotate) -> None:
        """Positions keep+discard..held-1 move to keep.. (see KVCache.shift); a ring moves only the positions it
        still holds (the older ones lie outside its window anyway). ``rotate(keys)`` re-rotates float32 keys."""
        moved = np.arange(max(keep + discard, held - self.rows), held)
        if moved.size == 0:
            return
        old, new = moved % self.rows, (moved - discard) % self.rows
        keys = kv_formats.dequantize(self.spec.k, self.k[:, old], self.ks[:, old], self.head_dim)
        kd, ks = kv_formats.quantize(self.spec.k, rotate(keys))
        vd, vs = self.v[:, old], self.vs[:, old]  # fancy indexing: copies, so the moves cannot overlap
        self.k[:, new], self.ks[:, new] = kd, ks
        self.v[:, new], self.vs[:, new] = vd, vs

    def copy_prefix(self, src: LayerCache, n: int) -> None:
        """Positions 0..n-1 from ``src``, a layer of the same format and rows."""
        for dst, s in zip(self, src):
            m = min(n, dst.shape[1])
            dst[:, :m] = s[:, :m]

    def keys(self, n: int) -> np.ndarray:
        """Keys of positions 0..n-1 as float32 [n_kv, n, head_dim] (decoded: for tests and tools; a ring needs
        n <= rows)."""
        return kv_formats.dequantize(self.spec.k, self.k[:, :n], self.ks[:, :n], self.head_dim)

    def values(self, n: int) -> np.ndarray:
        return kv_formats.dequantize(self.spec.v, self.v[:, :n], self.vs[:, :n], self.head_dim)


class KVCache:
    """A model's cache: one :class:`LayerCache` per layer (``windows[i]`` > 0 gives layer i a ring)."""

    def __init__(self, n_layers: int, n_kv: int, ctx: int, head_dim: int, spec: KVSpec = kv_formats.DEFAULT,
                 windows: list[int] | None = None):
        spec.check(head_dim)
        windows = windows or [0] * n_layers
        if len(windows) != n_layers:
            raise ValueError("one window per layer")
        self.ctx = ctx
        self.spec = spec
        self.head_dim = head_dim
        self.layers = [LayerCache(spec, n_kv, ctx, head_dim, w) for w in windows]
        # tokens one forward pass may write, and positions that may be taken back (ctx: no limit)
        self.max_tokens = RING_TOKENS if any(lc.ring for lc in self.layers) else ctx

    @property
    def rows(self) -> list[int]:
        return [lc.rows for lc in self.layers]

    # per-layer arrays, for tests and tools
    k = property(lambda self: [lc.k for lc in self.layers])
    ks = property(lambda self: [lc.ks for lc in self.layers])
    v = property(lambda self: [lc.v for lc in self.layers])
    vs = property(lambda self: [lc.vs for lc in self.layers])

    def can_rewind(self, held: int, keep: int) -> bool:
        """Whether a cache holding positions 0..held-1 can go on from position ``keep`` (reusing 0..keep-1): always
        without rings; with them only if the positions a window still needs were not overwritten."""
        return held - keep <= self.max_tokens

    def layer(self, li: int) -> LayerCache:
        return self.layers[li]

    @property
    def nbytes(self) -> int:
        return sum(lc.nbytes for lc in self.layers)

    def shift(self, held: int, keep: int, discard: int, rotate) -> None:
        """Context shift of a cache holding positions 0..held-1: positions keep..keep+discard-1 are dropped and
        keep+discard..held-1 become keep..held-discard-1, their keys passed through ``rotate(layer, keys)`` (float32
        [n_kv, m, head_dim] -> the same, re-rotated to the new positions) and stored again in the cache's format."""
        if not (0 <= keep and discard >= 1 and keep + discard <= held <= self.ctx):
            raise ValueError(f"bad context shift: keep {keep}, discard {discard} of {held}")
        for li, lc in enumerate(self.layers):
            lc.shift(held, keep, discard, lambda keys, li=li: rotate(li, keys))

    def copy_prefix(self, src: KVCache, n: int) -> None:
        """Positions 0..n-1 of every layer from ``src`` (a cache of the same formats and rows; with rings, only
        where ``src.can_rewind(its length, n)``)."""
        if src.spec != self.spec or src.rows != self.rows:
            raise ValueError("copy_prefix needs caches of one format and shape")
        for mine, theirs in zip(self.layers, src.layers):
            mine.copy_prefix(theirs, n)

    def keys(self, li: int, n: int) -> np.ndarray:
        return self.layers[li].keys(n)

    def values(self, li: int, n: int) -> np.ndarray:
        return self.layers[li].values(n)
