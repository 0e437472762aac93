"""Device-side dispatch: the functions of ``lowbit.kernels.dispatch`` over device arrays (numba DeviceNDArray,
float32, C-contiguous). Outputs are allocated on the device; nothing is copied to or from the host here except the
weights (once, in :class:`Weight`) and the RoPE/norm tables uploaded by the caller."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from lowbit.errors import FormatError, LowbitError
from lowbit.formats.reader import StoredTensor
from lowbit.kernels.cuda import ops
from lowbit.kernels.cuda.quant import GRID_CAP, THREADS, blocks, kernels_for, matmul_grid
from lowbit.kernels.ref import dequantize

SCORES_ELEMS = 1 << 24  # float32 elements of attention score scratch per launch (64 MiB); longer prefills are sliced


def _grid(n: int) -> int:
    """Blocks for a grid-stride loop over n elements."""
    return max(1, min(GRID_CAP, math.ceil(n / THREADS)))


def _flat(a):
    return a.reshape(a.size)


class Weight:
    """A weight ``W[rows, cols]`` resident on the device: packed codes (u8), scales and mins (f16) exactly as stored,
    or float32 data for float tensors; bias f32[rows] (zeros when the tensor has none)."""

    def __init__(self, st: StoredTensor, bias: np.ndarray | None = None):
        st = st.per_row()  # per-tensor types run as their per-channel twins
        if len(st.shape) != 2:
            raise FormatError(f"tensor {st.name} must be 2-D, got shape {st.shape}")
        self.name = st.name
        self.qtype = st.qtype
        self.rows, self.cols = st.shape
        self.nbytes = st.nbytes
        self.kernels = kernels_for(st.qtype, self.cols)
        placeholder = np.zeros((1, 1), dtype=np.float16)
        if st.qtype.is_float:
            self.data = cuda.to_device(np.ascontiguousarray(dequantize(st.parts, st.qtype, st.shape), np.float32))
            self.scales = self.mins = cuda.to_device(placeholder)
        else:
            self.data = cuda.to_device(np.ascontiguousarray(st.parts["codes"]))
            self.scales = cuda.to_device(np.ascontiguousarray(st.parts["scales"]))
            self.mins = cuda.to_device(np.ascontiguousarray(st.parts["mins"]) if st.qtype.asym else placeholder)
        b = np.zeros(self.rows, np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        self.bias = cuda.to_device(b)

    def _args(self):
        return self.data, self.scales, self.mins


def to_device(a: np.ndarray):
    return cuda.to_device(np.ascontiguousarray(a, dtype=np.float32))


def linear(w: Weight, x):
    """y[T, rows] = x[T, cols] @ W.T + bias: the fused dequantize-matvec for one token, the tiled matmul beyond."""
    t = x.shape[0]
    y = cuda.device_array((t, w.rows), dtype=np.float32)
    if t == 1:
        w.kernels.matvec[blocks(w.rows), THREADS](y.reshape(w.rows), *w._args(), w.bias, x.reshape(w.cols), w.cols)
    else:
        w.kernels.matmul[matmul_grid(w.rows, t), THREADS](y, *w._args(), w.bias, x, w.cols)
    return y


def embed(w: Weight, ids):
    """Rows ``ids`` (device i64[T]) of an embedding table: [T, cols]."""
    out = cuda.device_array((ids.shape[0], w.cols), dtype=np.float32)
    w.kernels.gather[blocks(ids.shape[0]), THREADS](out, *w._args(), ids, w.cols)
    return out


def rmsnorm(x, w, eps: float):
    out = cuda.device_array(x.shape, dtype=np.float32)
    ops.rmsnorm[blocks(x.shape[0]), THREADS](out, x, w, np.float32(eps))
    return out


def head_rmsnorm(x, w, eps: float):
    """RMSNorm of each head of x[T, n_heads, hd] with one weight[hd]."""
    t, nh, hd = x.shape
    return rmsnorm(x.reshape(t * nh, hd), w, eps).reshape(t, nh, hd)


def rope_inplace(x, cos, sin, start: int, rot: int) -> None:
    """RoPE on the first ``rot`` dims of each head of x[T, H, hd] at positions start..; cos, sin: [ctx, rot/2]."""
    half = rot // 2
    n = x.shape[0] * x.shape[1] * half
    ops.rope[_grid(n), THREADS](x, cos, sin, start, half)


def kv_write(cache, x, start: int) -> None:
    """cache[:, start:start+T] = x[T, n_kv, hd] transposed (cache: [n_kv, ctx, hd])."""
    ops.kv_write[_grid(x.size), THREADS](cache, x, start)


def attention(q, k_cache, v_cache, start: int, scale: float, window: int = 0, softcap: float = 0.0):
    """Causal GQA attention of q[T, nh, hd] (positions start..) over the cache; as ``lowbit.kernels.ref.attention``."""
    t, nh, _ = q.shape
    n = start + t
    out = cuda.device_array(q.shape, dtype=np.float32)
    per = max(1, min(t, SCORES_ELEMS // (nh * n)))  # queries per launch
    scores = cuda.device_array((per * nh, n), dtype=np.float32)
    for t0 in range(0, t, per):
        items = min(per, t - t0) * nh
        ops.attention[blocks(items), THREADS](out, q, k_cache, v_cache, start, t0, items, np.float32(scale), window,
                                              np.float32(softcap), scores)
    return out


def columns(x, lo: int, hi: int):
    """x[:, lo:hi] of x[T, n] as a new contiguous [T, hi - lo] array (the parts of a fused projection)."""
    if not 0 <= lo <= hi <= x.shape[1]:
        raise LowbitError(f"columns {lo}:{hi} out of range for {x.shape[1]} columns")
    out = cuda.device_array((x.shape[0], hi - lo), dtype=np.float32)
    if out.size:
        ops.copy_columns[_grid(out.size), THREADS](out, x, lo)
    return out


def _elementwise(kernel, *arrays):
    out = cuda.device_array(arrays[0].shape, dtype=np.float32)
    kernel[_grid(out.size), THREADS](_flat(out), *map(_flat, arrays))
    return out


def silu_mul(gate, up):
    return _elementwise(ops.silu_mul, gate, up)


def gelu_tanh_mul(gate, up):
    return _elementwise(ops.gelu_tanh_mul, gate, up)


def add(a, b):
    """a + b (residual add), a new device array."""
    return _elementwise(ops.add, a, b)


def scale_inplace(x, s: float) -> None:
    ops.scale_inplace[_grid(x.size), THREADS](_flat(x), np.float32(s))


def softcap(x, cap: float):
    out = cuda.device_array(x.shape, dtype=np.float32)
    ops.softcap[_grid(x.size), THREADS](_flat(out), _flat(x), np.float32(cap))
    return out


class DeviceKVCache:
    """Preallocated device keys/values per layer: [n_kv_heads, ctx, head_dim] float32 (same shape as the CPU one)."""

    def __init__(self, n_layers: int, n_kv: int, ctx: int, head_dim: int):
        self.ctx = ctx
        self.k = [cuda.device_array((n_kv, ctx, head_dim), dtype=np.float32) for _ in range(n_layers)]
        self.v = [cuda.device_array((n_kv, ctx, head_dim), dtype=np.float32) for _ in range(n_layers)]

    def layer(self, li: int) -> tuple:
        """(keys, values) of layer li, as :func:`attention` takes them."""
        return self.k[li], self.v[li]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def can_rewind(self, held: int, keep: int) -> bool:
        """Always: every layer keeps the whole context (no sliding-window rings on the device)."""
        return True
