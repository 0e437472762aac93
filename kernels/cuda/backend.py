"""The CUDA backend as an ops object (the interface of lowbit.kernels.ops): every primitive of the forward pass
routed to ``lowbit.kernels.cuda.dispatch``. Weights and tables are uploaded once at load; per forward pass the token
ids go in and the logits come back (``to_host``), everything else stays on the device.

Weights carrying low-rank/rotation/activation-scale extras (``.had``, ``.lr_a``, ``.lr_b``, ``.act_scale``) have no
device kernels yet and are refused with a message naming the tensor. The device cache is float32 whatever KV format
is asked for, with every layer keeping the whole context."""

from __future__ import annotations

import contextlib

import numpy as np
from numba import cuda

from lowbit.errors import LowbitError
from lowbit.kernels.cuda import dispatch as cd
from lowbit.kernels.dispatch import float_tensor

WEIGHT_PARTS = ("weight", "bias")


class CudaOps:
    name = "cuda"
    prompt_pass = False  # the device computes every pass the same way

    # ------------------------------------------------------------------------------------------ loading
    def weight(self, container, name: str) -> cd.Weight:
        extras = sorted(
            n for n in container.tensor_names if n.startswith(f"{name}.") and n[len(name) + 1 :] not in WEIGHT_PARTS
        )
        if extras:
            raise LowbitError(
                f"tensor {name} has extras ({', '.join(extras)}): low-rank/rotation extras are not supported on "
                "--device cuda yet; use --device cpu"
            )
        bias = f"{name}.bias"
        b = float_tensor(container.tensor(bias)) if bias in container else None
        return cd.Weight(container.tensor(f"{name}.weight"), b)

    def table(self, a: np.ndarray):
        return cd.to_device(a)

    def loaded(self, weights) -> None:
        pass

    def new_cache(self, n_layers: int, n_kv: int, ctx: int, head_dim: int, spec, windows) -> cd.DeviceKVCache:
        return cd.DeviceKVCache(n_layers, n_kv, ctx, head_dim)

    def pack_for_batches(self, weights) -> int:
        return 0

    def decode_plan(self, *args) -> None:
        """No fused decode layer on the GPU: a step runs primitive by primitive."""
        return None

    # ------------------------------------------------------------------------------------------ a pass
    def forward_pass(self, n_tokens: int, prompt: bool = False):
        return contextlib.nullcontext()

    def to_host(self, x) -> np.ndarray:
        return x.copy_to_host()

    # ------------------------------------------------------------------------------------------ primitives
    def rmsnorm(self, x, w, eps: float):
        return cd.rmsnorm(x, w, eps)

    def head_rmsnorm(self, x, w, eps: float):
        return cd.head_rmsnorm(x, w, eps)

    def add_norm(self, x, a, w, eps: float):
        x = cd.add(x, a)
        return x, cd.rmsnorm(x, w, eps)

    def linear(self, w: cd.Weight, x):
        return cd.linear(w, x)

    def linears(self, ws: list, x) -> list:
        return [cd.linear(w, x) for w in ws]

    def embedding(self, w: cd.Weight, tokens: np.ndarray):
        return cd.embed(w, cuda.to_device(np.ascontiguousarray(tokens, dtype=np.int64)))

    def columns(self, x, lo: int, hi: int, contiguous: bool = True):
        return cd.columns(x, lo, hi)

    def rope_and_cache(self, q, k, v, cos, sin, rot: int, layer, start: int) -> None:
        cd.rope_inplace(q, cos, sin, start, rot)
        cd.rope_inplace(k, cos, sin, start, rot)
        keys, values = layer
        cd.kv_write(keys, k, start)
        cd.kv_write(values, v, start)

    def attend(self, q, layer, start: int, scale: float, window: int, softcap: float):
        keys, values = layer
        return cd.attention(q, keys, values, start, scale, window, softcap)

    def rope_and_cache_steps(self, q, k, v, cos, sin, rot: int, layers: list, starts: list[int]) -> None:
        raise NotImplementedError("decode passes of several sequences run on the CPU (the server serves one at a time)")

    attend_steps = rope_and_cache_steps

    def silu_mul(self, gate, up):
        return cd.silu_mul(gate, up)

    def gelu_tanh_mul(self, gate, up):
        return cd.gelu_tanh_mul(gate, up)

    def add(self, a, b):
        return cd.add(a, b)

    def scale_by(self, x, s: float):
        cd.scale_inplace(x, s)
        return x

    def softcap(self, x, cap: float):
        return cd.softcap(x, cap)
