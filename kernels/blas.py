"""Prefill kernels built on numpy's BLAS: attention for many query tokens at once.

For a long prompt the scores of all queries against all keys are a matrix product; BLAS does it far faster than a
per-(token, head) loop. The query heads sharing a key/value head are stacked into one product; the masked softmax
between the two products is one parallel numba pass (kernels.cpu.causal_softmax).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from lowbit.kernels import cpu


@lru_cache(maxsize=1)
def _blas_pools():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def one_thread():
    """Context manager: the BLAS libraries numpy loaded run on one thread inside it (threadpoolctl)."""
    return _blas_pools().limit(limits=1)


def attention(out, q, k_cache, v_cache, start: int, scale: float, window: int, cap: float) -> None:
    """out, q: f32[T, n_heads, hd] (positions start..start+T-1); k_cache, v_cache: f32[n_kv, ctx, hd] holding keys
    and values up to start+T-1; window: 0, or each query sees keys in (pos-window, pos]; cap: 0, or soft-capped
    scores cap * tanh(s / cap)."""
    t_n, nh, hd = q.shape
    n_kv = k_cache.shape[0]
    rep = nh // n_kv
    end = start + t_n
    lo = max(0, start - window + 1) if window > 0 else 0  # first key any query can see
    for kv in range(n_kv):
        qh = q[:, kv * rep : (kv + 1) * rep, :].transpose(1, 0, 2).reshape(rep * t_n, hd)  # [rep*T, hd]
        s = qh @ k_cache[kv, lo:end, :].T  # [rep*T, n]
        cpu.causal_softmax(s, t_n, start, lo, np.float32(scale), window, np.float32(cap))
        o = s @ v_cache[kv, lo:end, :]  # [rep*T, hd]
        out[:, kv * rep : (kv + 1) * rep, :] = o.reshape(rep, t_n, hd).transpose(1, 0, 2)
