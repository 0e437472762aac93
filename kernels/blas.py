"""Prefill kernels built on numpy's BLAS: attention for many query tokens at once.

For a long prompt the scores of all queries against all keys are a matrix product; BLAS does it far faster than a
per-(token, head) loop. The query heads sharing a key/value head are stacked into one product.
"""

from __future__ import annotations

import numpy as np


def attention(out, q, k_cache, v_cache, start: int, scale: float, window: int, cap: float) -> None:
    """out, q: f32[T, n_heads, hd] (positions start..start+T-1); k_cache, v_cache: f32[n_kv, ctx, hd] holding keys
    and values up to start+T-1; window: 0, or each query sees keys in (pos-window, pos]; cap: 0, or soft-capped
    scores cap * tanh(s / cap)."""
    t_n, nh, hd = q.shape
    n_kv = k_cache.shape[0]
    rep = nh // n_kv
    end = start + t_n
    lo = max(0, start - window + 1) if window > 0 else 0  # first key any query can see
    keys = np.arange(lo, end)
    pos = np.arange(start, end)
    masked = keys[None, :] > pos[:, None]  # [T, n]: causal
    if window > 0:
        masked |= keys[None, :] <= (pos - window)[:, None]
    neg = np.float32(-np.inf)
    for kv in range(n_kv):
        qh = q[:, kv * rep : (kv + 1) * rep, :].transpose(1, 0, 2).reshape(rep * t_n, hd)  # [rep*T, hd]
        s = (qh @ k_cache[kv, lo:end, :].T).reshape(rep, t_n, end - lo)
        s *= np.float32(scale)
        if cap > 0:
            np.tanh(s / np.float32(cap), out=s)
            s *= np.float32(cap)
        s[:, masked] = neg
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        o = s.reshape(rep * t_n, end - lo) @ v_cache[kv, lo:end, :]  # [rep*T, hd]
        out[:, kv * rep : (kv + 1) * rep, :] = o.reshape(rep, t_n, hd).transpose(1, 0, 2)
