"""One decode step of a llama-style layer in three calls instead of nine.

A one-token step of SmolLM2-135M made ~270 kernel calls (nine a layer: the q/k/v product, RoPE and the cache write,
attention, the output product, the residual add and norm, gate/up, SiLU, down, the next add and norm), and the
Python between them — the model's and the ops' methods, allocations, numba's argument checks — was a tenth of the
step. :func:`layer_kernel` makes two kernels a layer: ``layer_in`` (the residual add and norm, q/k/v, RoPE and the
cache write) and ``layer_out`` (the output product, add and norm, gate/up, SiLU, down), with attention between them
by the one-token pass's own kernel (``dispatch.attention``). They call the same numba functions in the same order as
the primitives (each matrix's rows as ``cpu_quant``'s ``matvec``/``matvec3`` compute them, ``cpu.add_rmsnorm``,
``cpu_kv.rope2_kv_write``, ``cpu.silu_mul``), so their numbers are the per-primitive path's bit for bit and a step
may take either. (Attention stays outside: compiled into a caller, the split-decode kernel's combination of its
chunks summed in another order.)

:class:`DecodePlan` holds each layer's fixed arguments (weights, norms, window) and compiles the kernels on a
helper thread once a model has asked for a few one-token passes, or loads them from numba's cache at the first pass
where it holds them (every run after the first): until they are ready, steps take the per-primitive path, so a
cold start does not stall in a reply.
"""

from __future__ import annotations

import inspect
import logging
import threading
import zlib
from functools import lru_cache

import numba as nb
import numpy as np

from lowbit.kernels import cpu_quant
from lowbit.kernels.act8 import quantize8
from lowbit.kernels.compile_ahead import load_cached
from lowbit.kernels.cpu import JIT, PRANGE, add_rmsnorm, rmsnorm, silu_mul, variant
from lowbit.kernels.cpu_kv import rope2_kv_write
from lowbit.kernels.cpu_quant import row_dot8
from lowbit.kernels.dispatch import attention, cache_arrays
from lowbit.kernels.timing import kernel_call

log = logging.getLogger(__name__)


def _dependency_key() -> int:
    """cpu_quant's key and the sources this kernel inlines besides (see cpu_quant._dependency_key)."""
    from lowbit.kernels import cpu_attention, cpu_kv, kv_formats

    src = "".join(inspect.getsource(m) for m in (cpu_quant, cpu_attention, cpu_kv, kv_formats))
    return zlib.crc32(src.encode(), cpu_quant.DEPS)


DEPS = _dependency_key()
MODES = ("int8", "split")  # activation modes with a fused layer (the byte dot-product kernels)
START_AFTER = 16  # one-token passes before the kernels are compiled: a short reply (a test, a one-line answer)
# never spends a core on it


@lru_cache(maxsize=None)
def layer_kernel(bits: int, g: int, split: bool):
    """(layer_in, layer_out) for weights of ``bits``-bit groups of ``g`` (every matrix of the layer) on int8
    (``split`` False) or split activations."""
    tag = f"b{bits}g{g}" + ("s" if split else "i")
    deps = DEPS

    @nb.njit(parallel=PRANGE, **JIT)
    @variant(tag)
    def layer_in(x, m, first, wa, eps, cq, sq, mq, bq, ck, sk, mk, bk, cv, sv, mv, bv, asym, cos, sin, kd, ks, vd,
                 vs, start, nh):  # fmt: skip
        """(x', q) of one layer at position ``start`` for the residual x: f32[1, n] and the previous layer's
        output m (``first``: none; x is then normed as it is): x' = x + m, q the roped queries [1, nh, hd], the
        roped key and the value written into the layer's cache (kd, ks, vd, vs; room for ``start`` made). Weights
        as in cpu_quant's kernels (codes, scales, mins; biases f32[rows] or empty); wa: the attention norm; cos,
        sin: the whole RoPE tables."""
        h = np.empty_like(x)
        if first:
            xa = x.copy()
            rmsnorm(h, x, wa, eps)
        else:
            xa = np.empty_like(x)
            add_rmsnorm(xa, h, x, m, wa, eps)
        xh, xl, dx, xs = quantize8(h, g, split)
        rq, rk, rv = cq.shape[0], ck.shape[0], cv.shape[0]
        yq = np.empty(rq, dtype=np.float32)
        yk = np.empty(rk, dtype=np.float32)
        yv = np.empty(rv, dtype=np.float32)
        if deps == 0:  # never true; ties the compiled code to the dependency key
            return xa, yq.reshape((1, nh, rq // nh))
        for i in nb.prange(rq + rk + rv):
            if i < rq:
                yq[i] = row_dot8(cq, sq, mq, i, xh[0], xl[0], dx[0], xs[0], asym, bits, g, split)
            elif i < rq + rk:
                yk[i - rq] = row_dot8(ck, sk, mk, i - rq, xh[0], xl[0], dx[0], xs[0], asym, bits, g, split)
            else:
                yv[i - rq - rk] = row_dot8(cv, sv, mv, i - rq - rk, xh[0], xl[0], dx[0], xs[0], asym, bits, g, split)
        for i in range(bq.shape[0]):
            yq[i] += bq[i]
        for i in range(bk.shape[0]):
            yk[i] += bk[i]
        for i in range(bv.shape[0]):
            yv[i] += bv[i]
        hd = rq // nh
        q = yq.reshape((1, nh, hd))
        k = yk.reshape((1, rk // hd, hd))
        v = yv.reshape((1, rv // hd, hd))
        rope2_kv_write(q, k, v, cos[start : start + 1], sin[start : start + 1], kd, ks, vd, vs, start)
        return xa, q

    @nb.njit(parallel=PRANGE, **JIT)
    @variant(tag)
    def layer_out(xa, o, wf, eps, co, so, mo, cg, sg, mg, cu, su, mu, cd, sd, md, asym):
        """(x', m') of one layer after its attention o: f32[1, nh, hd]: x' = xa + o's projection, m' the MLP's
        output on norm(x') (the next layer adds it); wf: the MLP norm."""
        oh, ol, odx, oxs = quantize8(o.reshape((1, o.shape[1] * o.shape[2])), g, split)
        a = np.empty((1, co.shape[0]), dtype=np.float32)
        if deps == 0:  # never true; see layer_in
            return xa, a
        for r in nb.prange(co.shape[0]):
            a[0, r] = row_dot8(co, so, mo, r, oh[0], ol[0], odx[0], oxs[0], asym, bits, g, split)
        xf = np.empty_like(xa)
        hf = np.empty_like(xa)
        add_rmsnorm(xf, hf, xa, a, wf, eps)
        fh, fl, fdx, fxs = quantize8(hf, g, split)
        rg, ru = cg.shape[0], cu.shape[0]
        gate = np.empty((1, rg), dtype=np.float32)
        up = np.empty((1, ru), dtype=np.float32)
        for i in nb.prange(rg + ru):
            if i < rg:
                gate[0, i] = row_dot8(cg, sg, mg, i, fh[0], fl[0], fdx[0], fxs[0], asym, bits, g, split)
            else:
                up[0, i - rg] = row_dot8(cu, su, mu, i - rg, fh[0], fl[0], fdx[0], fxs[0], asym, bits, g, split)
        act = np.empty_like(gate)
        silu_mul(act, gate, up)
        ah, al, adx, axs = quantize8(act, g, split)
        out = np.empty((1, cd.shape[0]), dtype=np.float32)
        for r in nb.prange(cd.shape[0]):
            out[0, r] = row_dot8(cd, sd, md, r, ah[0], al[0], adx[0], axs[0], asym, bits, g, split)
        return xf, out

    return layer_in, layer_out


_NO_BIAS = np.empty(0, dtype=np.float32)
_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class DecodePlan:
    """A model's layers as fused decode calls: per layer the fixed arguments of :func:`layer_kernel`'s kernels.
    Made by :meth:`build`, which answers None where the layers do not fit them (another type per matrix, extras,
    activation quantization, exact activations, biases beyond q/k/v)."""

    def __init__(self, kernels: tuple, ins: list[tuple], outs: list[tuple], weights: list, scale: float,
                 softcap: float, windows: list[int], n_heads: int):  # fmt: skip
        self.layer_in, self.layer_out = kernels
        self.ins, self.outs = ins, outs  # per layer: the fixed arguments of layer_in and of layer_out
        self.weights = [(w, w.int_kernels) for w in weights]  # a later change of activation mode ends the plan
        self.scale, self.softcap = scale, softcap
        self.windows = windows
        self.n_heads = n_heads
        self._ready: dict[tuple, threading.Event] = {}  # per cache formats: compiled (or loaded), or failed
        self._failed: set[tuple] = set()
        self.asked = 0  # one-token passes asked for before the kernels were compiled
        self._uncached: set[tuple] = set()  # cache formats whose kernels numba's cache did not hold

    @classmethod
    def build(cls, layers: list[dict], eps: float, scale: float, softcap: float, windows: list[int],
              n_heads: int) -> DecodePlan | None:  # fmt: skip
        if not layers:
            return None
        first = layers[0]["attn_q"]
        k = getattr(first, "int_kernels", None)
        if k is None or first.act_mode not in MODES or k.matvec3 is None:
            return None
        ins, outs, weights = [], [], []
        for layer in layers:
            ws = [layer.get(name) for name in _MATRICES]
            for i, w in enumerate(ws):
                if (getattr(w, "int_kernels", None) is not k or w.had_d is not None or w.lr_a is not None
                        or w.act_q is not None or (w.bias is not None and i > 2)):  # fmt: skip
                    return None
            weights += ws
            qkv = [a for w in ws[:3] for a in (w.codes, w.scales, w.mins, _NO_BIAS if w.bias is None else w.bias)]
            ins.append((layer["attn_norm"], np.float32(eps), *qkv, bool(first.asym)))
            rest = [a for w in ws[3:] for a in (w.codes, w.scales, w.mins)]
            outs.append((layer["ffn_norm"], np.float32(eps), *rest, bool(first.asym)))
        kernels = layer_kernel(first.bits, first.g, first.act_mode == "split")
        return cls(kernels, ins, outs, weights, scale, softcap, windows, n_heads)

    def valid(self) -> bool:
        """Whether every weight still computes with the kernels the plan was made for."""
        return all(w.int_kernels is k and w.act_q is None for w, k in self.weights)

    def ready(self, args: tuple, wait: bool = False) -> bool:
        """Whether the kernels are compiled for the cache formats of ``args`` (layer_in's arguments). Held in
        numba's cache (every run after the first), they are loaded at the first pass that asks; else, at the
        START_AFTER-th, compiling starts on a helper thread. ``wait``: start now and wait until it has finished."""
        key = tuple(nb.typeof(a) for a in args[_CACHE_ARGS])  # the cache's formats: all else is fixed by the plan
        event = self._ready.get(key)
        if event is None and key not in self._uncached:
            sig_in = tuple(nb.typeof(a) for a in args)
            if load_cached(self.layer_in, sig_in) and load_cached(self.layer_out, self._sig_out()):
                event = self._ready[key] = threading.Event()  # in numba's cache: loaded (~10 ms), ready now
                event.set()
            else:
                self._uncached.add(key)
        if event is None and not wait:
            self.asked += 1
            if self.asked < START_AFTER:
                return False
        if event is None:
            event = self._ready[key] = threading.Event()
            sig_in = tuple(nb.typeof(a) for a in args)
            threading.Thread(target=self._compile, args=(sig_in, key, event), name="lowbit-decode-compile",
                             daemon=True).start()  # fmt: skip
        if wait:
            event.wait()
        return event.is_set() and key not in self._failed

    def _sig_out(self) -> tuple:
        """layer_out's argument types (they do not depend on the cache)."""
        return tuple(nb.typeof(a) for a in (_ROW, _HEADS, *self.outs[0]))

    def _compile(self, sig_in: tuple, key: tuple, event: threading.Event) -> None:
        try:
            self.layer_in.compile(sig_in)
            if not self.layer_out.signatures:  # its types do not depend on the cache
                self.layer_out.compile(self._sig_out())
        except Exception:  # the per-primitive path goes on serving every step
            log.warning("the fused decode layer did not compile; decoding without it", exc_info=True)
            self._failed.add(key)
        event.set()

    def run(self, x: np.ndarray, cache, start: int, cos: np.ndarray, sin: np.ndarray,
            wait: bool = False) -> np.ndarray | None:  # fmt: skip
        """The residual stream after every layer for one token x: f32[1, n] at ``start`` (each layer's cache
        grown to hold it), or None while the kernels are not ready (``wait``: until they are)."""
        if not self.valid():
            return None
        x = np.ascontiguousarray(x, dtype=np.float32)
        m = x
        for li, (fixed_in, fixed_out) in enumerate(zip(self.ins, self.outs)):
            layer = cache.layer(li)
            reserve = getattr(layer, "reserve", None)
            if reserve is not None:
                reserve(start + 1)
            arrays = tuple(layer)
            args = (x, m, li == 0, *fixed_in, cos, sin, *cache_arrays(arrays), start, self.n_heads)
            if li == 0 and not self.ready(args, wait):
                return None
            xa, q = kernel_call(self.layer_in, *args)
            # attention by the one-token pass's own kernel (a callee inlined into a fused kernel may sum in
            # another order)
            o = attention(q, arrays, start, self.scale, self.windows[li], self.softcap)
            x, m = kernel_call(self.layer_out, xa, o, *fixed_out)
        return x + m


_CACHE_ARGS = slice(20, 24)  # (kd, ks, vd, vs) among layer_in's arguments
_ROW = np.zeros((1, 8), dtype=np.float32)  # argument types of layer_out's attention rows
_HEADS = np.zeros((1, 1, 8), dtype=np.float32)
