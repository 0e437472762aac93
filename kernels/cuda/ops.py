"""Device kernels of the forward pass other than the weight products: RMSNorm, RoPE, KV-cache writes, causal GQA
attention (scores, softmax and the value sum in one kernel), column copies (the parts of a fused projection),
activations, residual adds, scaling and soft-capping.

Elementwise kernels are grid-stride loops (any grid size works). Each kernel writes into an output passed first (or
updates its first argument in place); launches live in ``lowbit.kernels.cuda.dispatch``. Semantics match
``lowbit.kernels.ref``."""

from __future__ import annotations

import math

import numba
from numba import cuda

from lowbit.kernels.cuda.quant import PER_BLOCK, THREADS, block_sum


@cuda.jit(device=True, inline=True)
def block_max(buf, tid):
    """Tree maximum of buf[THREADS] (shared); every thread gets the result."""
    step = THREADS // 2
    while step > 0:
        cuda.syncthreads()
        if tid < step:
            buf[tid] = max(buf[tid], buf[tid + step])
        step //= 2
    cuda.syncthreads()
    total = buf[0]
    cuda.syncthreads()
    return total


@cuda.jit
def rmsnorm(out, x, w, eps):
    """out, x: f32[R, n]; w: f32[n]. One block per PER_BLOCK rows."""
    tid = cuda.threadIdx.x
    n = x.shape[1]
    buf = cuda.shared.array(THREADS, numba.float32)
    r0 = cuda.blockIdx.x * PER_BLOCK
    for r in range(r0, min(r0 + PER_BLOCK, x.shape[0])):
        acc = numba.float32(0.0)
        for e in range(tid, n, THREADS):
            v = x[r, e]
            acc += v * v
        buf[tid] = acc
        total = block_sum(buf, tid)
        inv = numba.float32(1.0) / math.sqrt(total / numba.float32(n) + eps)
        for e in range(tid, n, THREADS):
            out[r, e] = x[r, e] * inv * w[e]


@cuda.jit
def rope(x, cos, sin, start, half):
    """Rotate-half RoPE in place on the first 2*half dims of each head. x: f32[T, H, hd]; cos, sin: f32[ctx, half]
    (row = position). Grid-stride over (t, h, j < half)."""
    nh = x.shape[1]
    for i in range(cuda.grid(1), x.shape[0] * nh * half, cuda.gridsize(1)):
        t = i // (nh * half)
        h = (i // half) % nh
        j = i % half
        c = cos[start + t, j]
        s = sin[start + t, j]
        a = x[t, h, j]
        b = x[t, h, half + j]
        x[t, h, j] = a * c - b * s
        x[t, h, half + j] = b * c + a * s


@cuda.jit
def kv_write(cache, x, start):
    """cache: f32[n_kv, ctx, hd]; x: f32[T, n_kv, hd] -> cache[:, start:start+T]. Grid-stride over x."""
    t_n, nkv, hd = x.shape
    for i in range(cuda.grid(1), t_n * nkv * hd, cuda.gridsize(1)):
        t = i // (nkv * hd)
        kv = (i // hd) % nkv
        d = i % hd
        cache[kv, start + t, d] = x[t, kv, d]


@cuda.jit
def attention(out, q, k_cache, v_cache, start, t0, n_items, scale, window, cap, scores):
    """Causal GQA attention for the ``n_items`` (query, head) pairs of queries t0.. (PER_BLOCK pairs per block).

    out, q: f32[T, nh, hd]; k_cache, v_cache: f32[n_kv, ctx, hd]; scores: f32[>= n_items, >= start + T] scratch.
    window > 0: a query at position p sees keys (p - window, p]; cap > 0: scores soft-capped before the softmax."""
    tid = cuda.threadIdx.x
    nh = q.shape[1]
    hd = q.shape[2]
    rep = nh // k_cache.shape[0]
    buf = cuda.shared.array(THREADS, numba.float32)
    b0 = cuda.blockIdx.x * PER_BLOCK
    for b in range(b0, min(b0 + PER_BLOCK, n_items)):
        t = t0 + b // nh
        h = b % nh
        kv = h // rep
        pos = start + t
        lo = 0
        if window > 0:
            lo = max(0, pos - window + 1)
        mx = numba.float32(-math.inf)
        for s in range(lo + tid, pos + 1, THREADS):
            acc = numba.float32(0.0)
            for d in range(hd):
                acc += q[t, h, d] * k_cache[kv, s, d]
            acc *= scale
            if cap > 0:
                acc = cap * math.tanh(acc / cap)
            scores[b, s] = acc
            mx = max(mx, acc)
        buf[tid] = mx
        mx = block_max(buf, tid)
        tot = numba.float32(0.0)
        for s in range(lo + tid, pos + 1, THREADS):
            p = math.exp(scores[b, s] - mx)
            scores[b, s] = p
            tot += p
        buf[tid] = tot
        tot = block_sum(buf, tid)  # its syncthreads also publish every thread's probabilities
        for d in range(tid, hd, THREADS):
            acc = numba.float32(0.0)
            for s in range(lo, pos + 1):
                acc += scores[b, s] * v_cache[kv, s, d]
            out[t, h, d] = acc / tot


@cuda.jit
def copy_columns(out, x, lo):
    """out = x[:, lo:lo + n]; out: f32[T, n], x: f32[T, >= lo + n]. Grid-stride over out."""
    n = out.shape[1]
    for i in range(cuda.grid(1), out.shape[0] * n, cuda.gridsize(1)):
        r = i // n
        j = i % n
        out[r, j] = x[r, lo + j]


@cuda.jit
def silu_mul(out, gate, up):
    """out = silu(gate) * up; all f32[n] (flattened)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        g = gate[i]
        out[i] = g / (numba.float32(1.0) + math.exp(-g)) * up[i]


@cuda.jit
def gelu_tanh_mul(out, gate, up):
    """out = gelu_tanh(gate) * up; all f32[n] (flattened)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        g = gate[i]
        inner = numba.float32(0.7978845608028654) * (g + numba.float32(0.044715) * g * g * g)
        out[i] = numba.float32(0.5) * g * (numba.float32(1.0) + math.tanh(inner)) * up[i]


@cuda.jit
def add(out, a, b):
    """out = a + b (residual add); all f32[n] (flattened)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = a[i] + b[i]


@cuda.jit
def scale_inplace(x, s):
    """x *= s; x: f32[n] (flattened)."""
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        x[i] *= s


@cuda.jit
def softcap(out, x, cap):
    """out = cap * tanh(x / cap); f32[n] (flattened)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = cap * math.tanh(x[i] / cap)
