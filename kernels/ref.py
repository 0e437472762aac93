"""Plain numpy reference kernels: the specification the numba kernels are tested against."""

from __future__ import annotations

import numpy as np

from lowbit.formats import scale_codes
from lowbit.formats.qtypes import QType, unpack_codes


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32."""
    return (a.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) of float32 values, rounded to nearest, ties to even; NaN stays NaN."""
    f = np.ascontiguousarray(a, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    b[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return b


def dequantize(parts: dict[str, np.ndarray], qt: QType, shape: tuple[int, ...]) -> np.ndarray:
    """Full float32 copy of a stored tensor (reference only; the runtime never does this in decode)."""
    if qt.is_float:
        data = parts["data"]
        return bf16_to_f32(data) if qt.name == "bf16" else np.asarray(data, dtype=np.float32)
    rows, cols = shape
    g = qt.layout_group(cols)
    u = unpack_codes(parts["codes"], qt, cols).astype(np.float32).reshape(rows, cols // g, g)
    # coded-scale types: the float16 values of their 8-bit codes (formats/scale_codes.py)
    scales, mins = scale_codes.decode_parts(parts, qt) if qt.coded_scales else (parts["scales"], parts.get("mins"))
    d = scales.astype(np.float32)[:, :, None]
    m = mins.astype(np.float32)[:, :, None] if qt.asym else d * np.float32(qt.zero_point)
    return (d * u - m).reshape(rows, cols)


def matvec(parts: dict[str, np.ndarray], qt: QType, shape: tuple[int, ...], x: np.ndarray) -> np.ndarray:
    """y[..., rows] = x[..., cols] @ W.T"""
    return x.astype(np.float32) @ dequantize(parts, qt, shape).T


def round_activations(x: np.ndarray, g: int, qmax: float) -> np.ndarray:
    """x[T, cols] rounded to ``qmax`` integer levels per group of ``g`` (scale = group absmax / qmax), returned
    dequantized: what the integer kernels' activation modes multiply by (kernels/cpu_quant.py). Round half to
    even of one rounded product, as the kernels: no add after the multiply that a fused multiply-add could change."""
    t, cols = x.shape
    xg = x.astype(np.float32).reshape(t, cols // g, g)
    d = np.abs(xg).max(axis=-1, keepdims=True) / np.float32(qmax)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d > 0)
    return (np.rint(xg * inv) * d).reshape(t, cols)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32)
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p [..., vocab] in float64 (evaluation, KL)."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE. x: [T, n_heads, head_dim]; positions: [T]; inv_freq: [head_dim // 2]."""
    half = x.shape[-1] // 2
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :].astype(np.float64)  # [T, half]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    start: int,
    scale: float | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> np.ndarray:
    """Causal GQA attention.

    q: [T, n_heads, hd] for positions start..start+T-1; k_cache, v_cache: [n_kv, >= start+T, hd].
    scale: score multiplier (default 1/sqrt(hd)); window > 0: a query at position p sees keys in (p - window, p];
    softcap > 0: scores become softcap * tanh(scores / softcap) before the mask. Returns [T, n_heads, hd].
    """
    t, nh, hd = q.shape
    nkv = k_cache.shape[0]
    rep = nh // nkv
    n = start + t
    out = np.empty_like(q, dtype=np.float32)
    scale = 1.0 / np.sqrt(hd) if scale is None else scale
    pos = start + np.arange(t)
    mask = np.arange(n)[None, :] > pos[:, None]  # [T, n]
    if window > 0:
        mask |= np.arange(n)[None, :] <= (pos - window)[:, None]
    for h in range(nh):
        kv = h // rep
        s = (q[:, h, :] @ k_cache[kv, :n, :].T) * scale
        if softcap > 0:
            s = softcap * np.tanh(s / softcap)
        s[mask] = -np.inf
        out[:, h, :] = softmax(s) @ v_cache[kv, :n, :]
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (transformers' gelu_pytorch_tanh / gelu_new)."""
    x = x.astype(np.float64)
    return (0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))).astype(np.float32)


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap): logit soft-capping."""
    return (cap * np.tanh(x.astype(np.float64) / cap)).astype(np.float32)
