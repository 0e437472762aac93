"""The forward pass on a CUDA device: the llama family's hooks with every primitive routed to
``lowbit.kernels.cuda.dispatch``.

:class:`CudaModelMixin` overrides the primitive hooks of ``lowbit.models.llama.Model`` (weight loading, rmsnorm,
linear, embedding, RoPE, attention with the device KV cache, activation, residual adds, head); the structural hooks
(``project_qkv``, ``mlp_block``, the layer loop) are the family's own. Weights are uploaded once at load; per forward
call the token ids go in and the logits come back, everything else stays on the device.

Families whose hooks call the CPU dispatch directly (qwen3's q/k norms, gemma's scaled embeddings, ...) are not
supported yet and are refused by :func:`cuda_model` with a message naming the family."""

from __future__ import annotations

import numpy as np
from numba import cuda

from lowbit.errors import LowbitError
from lowbit.kernels.cuda import dispatch as cd
from lowbit.kernels.dispatch import float_tensor
from lowbit.models import llama

# family name -> device model class; families missing here are refused
SUPPORTED = ("llama", "qwen2")
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

    def norm_weight(self, name: str):
        return cd.to_device(super().norm_weight(name))

    def setup_rope(self) -> None:
        super().setup_rope()
        self.cos, self.sin = cd.to_device(self.cos), cd.to_device(self.sin)

    def new_cache(self) -> cd.KVCache:
        a = self.args
        return cd.KVCache(a.num_hidden_layers, a.num_key_value_heads, self.ctx, a.head_dim)

    # ------------------------------------------------------------------------------------------ primitives
    def rmsnorm(self, x, w):
        return cd.rmsnorm(x, w, self.args.rms_norm_eps)

    def linear(self, w: cd.Weight, x):
        return cd.linear(w, x)

    def embed_tokens(self, tokens: np.ndarray):
        return cd.embed(self.embed, cuda.to_device(np.ascontiguousarray(tokens, dtype=np.int64)))

    def apply_rope(self, x, li: int, start: int) -> None:
        cos, sin = self.rope_for(li)
        cd.rope_inplace(x, cos, sin, start, self.rot)

    def attend(self, q, li: int, start: int, cache: cd.KVCache):
        w = self.args.window(li)
        return cd.attention(q, cache.k[li], cache.v[li], start, self.scale, w, self.attn_softcap)

    def attention_block(self, h, layer: dict, li: int, start: int, cache: cd.KVCache):
        t = h.shape[0]
        q, k, v = self.project_qkv(h, layer)
        self.apply_rope(q, li, start)
        self.apply_rope(k, li, start)
        cd.kv_write(cache.k[li], k, start)
        cd.kv_write(cache.v[li], v, start)
        o = self.attend(q, li, start, cache)
        return self.linear(layer["attn_output"], o.reshape(t, o.size // t))

    def act_mul(self, gate, up):
        return cd.silu_mul(gate, up)

    def block(self, x, layer: dict, li: int, start: int, cache: cd.KVCache):
        x = cd.add(x, self.attention_block(self.rmsnorm(x, layer["attn_norm"]), layer, li, start, cache))
        return cd.add(x, self.mlp_block(self.rmsnorm(x, layer["ffn_norm"]), layer))

    def head(self, x):
        logits = self.linear(self.lm_head, self.rmsnorm(x, self.out_norm))
        return cd.softcap(logits, self.final_softcap) if self.final_softcap > 0 else logits

    def forward(self, tokens: np.ndarray, start: int, cache: cd.KVCache, all_logits: bool = False) -> np.ndarray:
        """Host logits [T, vocab] (all_logits) or [1, vocab]; the only host<->device traffic is ids in, logits out."""
        x = self.embed_tokens(tokens)
        for li, layer in enumerate(self.layers):
            x = self.block(x, layer, li, start, cache)
        if not all_logits and x.shape[0] > 1:
            x = x[x.shape[0] - 1 :]
        return self.head(x).copy_to_host()


class CudaLlamaModel(CudaModelMixin, llama.Model):
    """llama, mistral and qwen2 (qkv bias) on the device."""


def cuda_model(family_name: str, family, args, container, ctx: int):
    """The device model for a family, or LowbitError naming the family when it has no device forward yet."""
    if family_name not in SUPPORTED or family.Model is not llama.Model:
        raise LowbitError(
            f"the {family_name} model family is not supported on --device cuda yet (supported: llama, mistral, "
            "qwen2); use --device cpu"
        )
    return CudaLlamaModel(args, container, ctx)
