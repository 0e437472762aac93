"""The forward pass on a CUDA device: every family's hooks with every primitive routed to
``lowbit.kernels.cuda.dispatch``.

The families (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3) compute only through the primitive methods
of ``lowbit.models.llama.Model`` (norms, q/k head norms, linear, embedding rows, column slices of fused projections,
RoPE, KV-cache writes, attention, activations, residual adds, scaling, soft-capping, and ``resident`` for the tables
they keep). :class:`CudaModelMixin` overrides exactly those, plus weight loading, the cache and the head; the
structural hooks (``project_qkv``, ``mlp_block``, ``block``, ``rope_for``, the layer loop, ...) stay the family's
own. Each family's device model is the mixin in front of its ``Model``, declared once below (:data:`CUDA_MODELS`).
Weights are uploaded once at load; per forward call the token ids go in and the logits come back, everything else
stays on the device.

Weights carrying low-rank/rotation/activation-scale extras (``.had``, ``.lr_a``, ``.lr_b``, ``.act_scale``) have no
device kernels yet and are refused with a message naming the tensor."""

from __future__ import annotations

import numpy as np
from numba import cuda

from lowbit.errors import LowbitError
from lowbit.kernels.cuda import dispatch as cd
from lowbit.kernels.dispatch import float_tensor
from lowbit.models import gemma, gemma2, gemma3, llama, phi3, qwen2, qwen3

WEIGHT_PARTS = ("weight", "bias")


class CudaModelMixin:
    """Device versions of the primitive hooks of ``llama.Model`` (see the module docstring)."""

    def weight(self, name: str) -> cd.Weight:
        extras = sorted(
            n for n in self.c.tensor_names if n.startswith(f"{name}.") and n[len(name) + 1 :] not in WEIGHT_PARTS
        )
        if extras:
            raise LowbitError(
                f"tensor {name} has extras ({', '.join(extras)}): low-rank/rotation extras are not supported on "
                "--device cuda yet; use --device cpu"
            )
        bias = f"{name}.bias"
        b = float_tensor(self.c.tensor(bias)) if bias in self.c else None
        return cd.Weight(self.c.tensor(f"{name}.weight"), b)

    def resident(self, a: np.ndarray):
        return cd.to_device(a)

    def new_cache(self) -> cd.KVCache:
        a = self.args
        return cd.KVCache(a.num_hidden_layers, a.num_key_value_heads, self.ctx, a.head_dim)

    # ------------------------------------------------------------------------------------------ primitives
    def rmsnorm(self, x, w):
        return cd.rmsnorm(x, w, self.args.rms_norm_eps)

    def head_rmsnorm(self, x, w):
        return cd.head_rmsnorm(x, w, self.args.rms_norm_eps)

    def linears(self, ws: list, x) -> list:
        return [self.linear(w, x) for w in ws]

    def linear(self, w: cd.Weight, x):
        return cd.linear(w, x)

    def embedding(self, w: cd.Weight, tokens: np.ndarray):
        return cd.embed(w, cuda.to_device(np.ascontiguousarray(tokens, dtype=np.int64)))

    def columns(self, x, lo: int, hi: int, contiguous: bool = True):
        return cd.columns(x, lo, hi)

    def apply_rope(self, x, li: int, start: int) -> None:
        cos, sin = self.rope_for(li)
        cd.rope_inplace(x, cos, sin, start, self.rot)

    def cache_write(self, cache: cd.KVCache, li: int, k, v, start: int) -> None:
        cd.kv_write(cache.k[li], k, start)
        cd.kv_write(cache.v[li], v, start)

    def attend(self, q, li: int, start: int, cache: cd.KVCache):
        w = self.args.window(li)
        return cd.attention(q, cache.k[li], cache.v[li], start, self.scale, w, self.attn_softcap)

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

    # ------------------------------------------------------------------------------------------ head, forward
    def head(self, x):
        logits = self.linear(self.lm_head, self.rmsnorm(x, self.out_norm))
        return self.softcap(logits, self.final_softcap) if self.final_softcap > 0 else logits

    def forward(self, tokens: np.ndarray, start: int, cache: cd.KVCache, all_logits: bool = False,
                prompt: bool = False) -> np.ndarray:
        """Host logits [T, vocab] (all_logits) or [1, vocab]; the only host<->device traffic is ids in, logits out."""
        x = self.embed_tokens(tokens)
        for li, layer in enumerate(self.layers):
            x = self.block(x, layer, li, start, cache)
        if not all_logits and x.shape[0] > 1:
            x = x[x.shape[0] - 1 :]
        return self.head(x).copy_to_host()


class CudaLlamaModel(CudaModelMixin, llama.Model):
    """llama, mistral and qwen2 (whose Model is llama's) on the device."""


class CudaQwen3Model(CudaModelMixin, qwen3.Model):
    """qwen3 on the device."""


class CudaGemmaModel(CudaModelMixin, gemma.Model):
    """gemma on the device."""


class CudaGemma2Model(CudaModelMixin, gemma2.Model):
    """gemma2 on the device."""


class CudaGemma3Model(CudaModelMixin, gemma3.Model):
    """gemma3 (text) on the device."""


class CudaPhi3Model(CudaModelMixin, phi3.Model):
    """phi3 on the device."""


# a family's Model -> its device model (a family missing here has no device forward)
CUDA_MODELS: dict[type, type] = {
    llama.Model: CudaLlamaModel,
    qwen2.Model: CudaLlamaModel,
    qwen3.Model: CudaQwen3Model,
    gemma.Model: CudaGemmaModel,
    gemma2.Model: CudaGemma2Model,
    gemma3.Model: CudaGemma3Model,
    phi3.Model: CudaPhi3Model,
}


def cuda_model(family_name: str, family, args, container, ctx: int):
    """The device model of a family (:data:`CUDA_MODELS`). LowbitError naming the family when it has none, or
    naming the tensor when a weight carries extras."""
    cls = CUDA_MODELS.get(getattr(family, "Model", None))
    if cls is None:
        raise LowbitError(
            f"the {family_name} model family has no device forward (its model is not built on the llama blocks); "
            "use --device cpu"
        )
    return cls(args, container, ctx)
