"""Backends as objects. A model computes every step of its forward pass through the ops object it was given
(``Model(args, container, ctx, ops)``) and never picks a kernel itself: :class:`CpuOps` here, ``CudaOps`` in
kernels/cuda/backend.py, with one interface:

- loading: ``weight(container, name)`` (a matrix with its bias and extras, its kernels chosen once),
  ``table(a)`` (a float32 table the pass reads: norm weights, RoPE cos/sin), ``loaded(weights)``,
  ``new_cache(n_layers, n_kv, ctx, head_dim, spec, windows)``, ``pack_for_batches(weights)``;
- a pass: ``forward_pass(n_tokens, prompt)`` (a context around one forward pass), ``to_host(logits)``;
- the primitives, arrays [T, ...] in and out: ``rmsnorm``, ``head_rmsnorm``, ``add_norm`` (fused residual add +
  RMSNorm), ``linear``, ``linears`` (one input, several weights: fused where the kernels allow), ``embedding``,
  ``columns``, ``rope_and_cache`` (RoPE of q/k and the cache write, fused), ``attend``, ``silu_mul``,
  ``gelu_tanh_mul``, ``add``, ``scale_by``, ``softcap``;
- one-token passes through llama-style layers in a few fused calls each where the backend has such kernels:
  ``decode_plan(layers, eps, scale, softcap, windows, n_heads)`` (None where it has not, or the weights do not fit
  it) and ``decode_layers(plan, x, cache, start, cos, sin)`` (the residual stream after the layers, or None: then
  the model computes them primitive by primitive, with the same numbers).

:class:`ObservingOps` wraps any ops object and shows every matrix product's input to an observer first
(calibration)."""

from __future__ import annotations

import contextlib

import numpy as np

from lowbit.kernels import blas, cpu_decode, dispatch
from lowbit.kernels.heap import release_free_heap
from lowbit.kernels.kv_cache import KVCache


class CpuOps:
    """The numba CPU kernels (kernels/dispatch.py chooses among them per weight and token count)."""

    name = "cpu"

    def __init__(self):
        # a prompt pass (forward_pass(prompt=True)): every product on the prompt kernels, whose rows do not depend
        # on how many tokens share the pass (dispatch.linear's ``prompt``)
        self.prompt_pass = False
        self.compile_ahead = None  # a kernels.compile_ahead.CompileAhead on a cold start (attend waits for it)
        self.wait_for_fused = False  # one-token passes wait for the fused decode kernels to compile (benchmarks)
        # quantized layers compute on numba's threads; BLAS (low-rank terms, per-channel types' dequantized tiles)
        # then runs on one thread, since OpenBLAS's own threads spin between calls and would take numba's cores
        self.one_thread_blas = False

    # ------------------------------------------------------------------------------------------ loading
    def weight(self, container, name: str) -> dispatch.Weight:
        bias = f"{name}.bias"
        b = dispatch.float_tensor(container.tensor(bias)) if bias in container else None
        return dispatch.Weight(container.tensor(f"{name}.weight"), b, **dispatch.weight_extras(container, name))

    def table(self, a: np.ndarray) -> np.ndarray:
        return a

    def loaded(self, weights) -> None:
        """The weights of one layer, once loaded: they decide how BLAS runs beside the kernels."""
        self.one_thread_blas = any(isinstance(w, dispatch.Weight) and not w.is_float for w in weights)

    def new_cache(self, n_layers: int, n_kv: int, ctx: int, head_dim: int, spec, windows: list[int]) -> KVCache:
        return KVCache(n_layers, n_kv, ctx, head_dim, spec, windows)

    def pack_for_batches(self, weights) -> int:
        """Unpack quantized matrices for decode passes of several sequences (kernels/packed.py); the bytes added."""
        return sum(dispatch.pack_for_batches(w) for w in weights if isinstance(w, dispatch.Weight))

    # ------------------------------------------------------------------------------------------ a pass
    @contextlib.contextmanager
    def forward_pass(self, n_tokens: int, prompt: bool = False):
        was = self.prompt_pass
        self.prompt_pass = was or prompt
        try:
            with blas.one_thread() if self.one_thread_blas else contextlib.nullcontext():
                yield
        finally:
            self.prompt_pass = was
        if n_tokens > dispatch.SMALL_BATCH:  # a prompt's activations are freed: keep them from staying resident
            release_free_heap()

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x

    # ------------------------------------------------------------------------------------------ fused decode
    def decode_plan(self, layers: list[dict], eps: float, scale: float, softcap: float, windows: list[int],
                    n_heads: int) -> cpu_decode.DecodePlan | None:  # fmt: skip
        """Each layer of a one-token pass in two fused kernel calls and attention (kernels/cpu_decode.py), where
        its weights allow."""
        return cpu_decode.DecodePlan.build(layers, eps, scale, softcap, windows, n_heads)

    def decode_layers(self, plan: cpu_decode.DecodePlan, x: np.ndarray, cache, start: int, cos: np.ndarray,
                      sin: np.ndarray) -> np.ndarray | None:  # fmt: skip
        """The residual stream after every layer of ``plan`` for one token at ``start``; None in a prompt pass
        (its products take the prompt kernels), while the attention helper of a cold start is still compiling, or
        while the fused kernel is (then the caller computes the layers one primitive at a time)."""
        ahead = self.compile_ahead
        if self.prompt_pass or (ahead is not None and not ahead.finished and not self.wait_for_fused):
            return None
        return plan.run(x, cache, start, cos, sin, self.wait_for_fused)

    # ------------------------------------------------------------------------------------------ primitives
    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return dispatch.rmsnorm(np.ascontiguousarray(x), w, eps)

    def head_rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        """RMSNorm of each head of x[T, n_heads, head_dim] with one weight[head_dim] (q/k norms)."""
        return dispatch.head_rmsnorm(x, w, eps)

    def add_norm(self, x: np.ndarray, a: np.ndarray, w: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """(x + a, rmsnorm(x + a, w)) in one kernel call."""
        return dispatch.add_rmsnorm(x, a, w, eps)

    def linear(self, w: dispatch.Weight, x: np.ndarray) -> np.ndarray:
        return dispatch.linear(w, x, self.prompt_pass)

    def linears(self, ws: list, x: np.ndarray) -> list[np.ndarray]:
        """Products of one input with several weights (q/k/v, gate/up): one fused kernel call where the weights
        allow (dispatch.linear_many); one by one in a prompt pass."""
        if self.prompt_pass:
            return [self.linear(w, x) for w in ws]
        return dispatch.linear_many(ws, x)

    def embedding(self, w: dispatch.Weight, tokens: np.ndarray) -> np.ndarray:
        """Rows ``tokens`` of an embedding table: [T, cols]."""
        return dispatch.embed(w, np.asarray(tokens, dtype=np.int64))

    def columns(self, x: np.ndarray, lo: int, hi: int, contiguous: bool = True) -> np.ndarray:
        """x[:, lo:hi] of x[T, n] (a part of a fused projection): contiguous unless ``contiguous`` is False (then a
        view)."""
        part = x[:, lo:hi]
        return np.ascontiguousarray(part) if contiguous else part

    def rope_and_cache(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                       rot: int, layer, start: int) -> None:
        """RoPE (rotate-half, tables [ctx, rot / 2]) of the first ``rot`` dims of each head of q [T, n_heads, hd]
        and k [T, n_kv, hd] at positions start.., then k and v into those positions of ``layer`` (a LayerCache):
        one kernel call."""
        t = q.shape[0]
        qr = q if rot == q.shape[2] else q[:, :, :rot]
        dispatch.rope_qk_kv_write(qr, k, v, cos[start : start + t], sin[start : start + t], layer, start)

    def attend(self, q: np.ndarray, layer, start: int, scale: float, window: int, softcap: float) -> np.ndarray:
        """Causal GQA attention of q [T, n_heads, hd] at positions start.. over ``layer`` (a LayerCache)."""
        ahead = self.compile_ahead
        if ahead is not None and ahead.finished:
            ahead = self.compile_ahead = None
        return dispatch.attention(q, tuple(layer), start, scale, window, softcap, ahead, self.prompt_pass)

    def rope_and_cache_steps(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                             rot: int, layers: list, starts: list[int]) -> None:
        """rope_and_cache of row b of q, k, v at position starts[b] into layers[b]: a decode step of several
        sequences, each with its own cache (one kernel call)."""
        qr = q if rot == q.shape[2] else q[:, :, :rot]
        dispatch.rope_qk_kv_write_steps(qr, k, v, cos, sin, layers, starts)

    def attend_steps(self, q: np.ndarray, layers: list, starts: list[int], scale: float, window: int,
                     softcap: float) -> np.ndarray:
        """attend of row b of q at position starts[b] over layers[b], for every row (one kernel call)."""
        return dispatch.attention_steps(q, [tuple(layer) for layer in layers], starts, scale, window, softcap)

    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return dispatch.silu_mul(gate, up, self.prompt_pass)

    def gelu_tanh_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return dispatch.gelu_tanh_mul(gate, up, self.prompt_pass)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a + b (the residual adds), a new array."""
        return a + b

    def scale_by(self, x: np.ndarray, s: float) -> np.ndarray:
        """x * s in float32; a device may scale x in place, so x must be an array nothing else uses."""
        return x * np.float32(s)

    def softcap(self, x: np.ndarray, cap: float) -> np.ndarray:
        return dispatch.softcap(x, cap)


class ObservingOps:
    """``inner`` with every matrix product's input shown to ``observer.observe(weight name, x)`` first; products
    sharing an input run one by one so each is seen. Everything else is ``inner``'s."""

    def __init__(self, inner, observer):
        self.inner = inner
        self.observer = observer

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def linear(self, w, x):
        self.observer.observe(w.name, x)
        return self.inner.linear(w, x)

    def linears(self, ws: list, x) -> list:
        return [self.linear(w, x) for w in ws]

    def decode_plan(self, *args) -> None:
        """No fused layers: every product is shown to the observer."""
        return None
