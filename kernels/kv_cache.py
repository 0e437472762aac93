"""The CPU KV cache: one :class:`LayerCache` per layer, each owning its storage and its policy (the whole context, or
a ring for a sliding window), in the storage formats of kernels/kv_formats.py.

A whole-context layer starts with room for GROW_ROWS positions and doubles its arrays when a write needs more
(:meth:`LayerCache.reserve`, called by kernels/dispatch.py before every write), so a cache holds memory for the
positions it was given, not for the context: the server keeps many more short conversations in its ``--cache-ram``
budget, and a new conversation's keys land in a few compact pages instead of pages scattered over a whole-context
array (one region per key/value head). Every allocation is committed at once (kernels/heap.py commit): on the
VMs these numbers come from, a new 40-token conversation in a 4,096-position Llama-3.2-1B-shaped cache took
60-1,150 ms of scattered page faults."""

from __future__ import annotations

import numpy as np

from lowbit.kernels import kv_formats
from lowbit.kernels.heap import commit
from lowbit.kernels.kv_formats import KVSpec

RING_TOKENS = 512  # a sliding-window layer's ring holds its window plus this many positions (see LayerCache)
GROW_ROWS = 256  # positions a whole-context layer has room for at first; it grows to multiples of this, doubling


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

    A whole-context layer's arrays have room for ``capacity`` <= rows positions (a ring's for all its rows) and
    grow when :meth:`reserve` asks for more; row p % rows is row p while p < capacity.

    The kernels take a layer as its four arrays: ``tuple(layer)`` / ``*layer`` is (key data, key scales, value
    data, value scales)."""

    def __init__(self, spec: KVSpec, n_kv: int, ctx: int, head_dim: int, window: int = 0):
        self.spec = spec
        self.head_dim = head_dim
        self.window = window
        self.n_kv = n_kv
        self.rows = ring_rows(window, ctx)
        self.ring = self.rows < ctx
        self.k = self.ks = self.v = self.vs = None
        self._allocate(self.rows if self.ring else min(self.rows, GROW_ROWS))

    def _allocate(self, cap: int) -> None:
        """Arrays with room for ``cap`` positions, holding the current ones' positions, committed."""
        kd, ks = self.spec.k.shapes((self.n_kv, cap), self.head_dim)
        vd, vs = self.spec.v.shapes((self.n_kv, cap), self.head_dim)
        new = [np.zeros(kd, dtype=self.spec.k.dtype), np.zeros(ks, dtype=np.uint16),
               np.zeros(vd, dtype=self.spec.v.dtype), np.zeros(vs, dtype=np.uint16)]  # fmt: skip
        commit(new)
        if self.k is not None:
            for dst, src in zip(new, self):
                dst[:, : src.shape[1]] = src
        self.k, self.ks, self.v, self.vs = new

    @property
    def capacity(self) -> int:
        """Positions the arrays have room for now."""
        return self.k.shape[1]

    def reserve(self, n: int) -> None:
        """Room for positions 0..n-1 (a ring always has it): the arrays grow to a multiple of GROW_ROWS, at least
        double, at most ``rows``."""
        if self.ring or n <= self.capacity:
            return
        if n > self.rows:
            raise ValueError(f"position {n - 1} is beyond the cache's {self.rows} positions")
        want = max(n, 2 * self.capacity)
        self._allocate(min(self.rows, -(-want // GROW_ROWS) * GROW_ROWS))

    @property
    def full_nbytes(self) -> int:
        """Bytes of the arrays with room for every row."""
        return self.nbytes // self.capacity * self.rows

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
        self.reserve(min(n, self.rows))
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
        """Bytes the cache holds now (it grows with the positions written)."""
        return sum(lc.nbytes for lc in self.layers)

    @property
    def full_nbytes(self) -> int:
        """Bytes the cache holds with the whole context written."""
        return sum(lc.full_nbytes for lc in self.layers)

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
