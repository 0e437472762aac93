"""qwen3: the qwen2 blocks plus a per-head RMSNorm on q and k before RoPE (q_norm/k_norm, one weight[head_dim]
shared by the heads), head_dim from the config, tied or untied embeddings, optional biases on q/k/v."""

from __future__ import annotations

import numpy as np

from lowbit.models import llama
from lowbit.models.llama import ModelArgs
from lowbit.models.names import make_expected, make_sanitize

__all__ = ["Model", "ModelArgs", "expected_tensors", "sanitize", "args_from_hf"]

LAYER_NAMES = {**llama.LAYER_NAMES, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
sanitize = make_sanitize(LAYER_NAMES)
expected_tensors = make_expected(LAYER_NAMES)


def args_from_hf(cfg: dict) -> ModelArgs:
    return ModelArgs.from_hf(cfg, tie_word_embeddings=False, use_sliding_window=False, per_layer_window=True)


class QKNormMixin:
    """q/k RMSNorm over each head's head_dim, applied after the projections and before RoPE."""

    def load_layer(self, p: str) -> dict:
        layer = super().load_layer(p)
        layer["attn_q_norm"] = self.norm_weight(p + "attn_q_norm")
        layer["attn_k_norm"] = self.norm_weight(p + "attn_k_norm")
        return layer

    def project_qkv(self, h: np.ndarray, layer: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, k, v = super().project_qkv(h, layer)
        return self.head_rmsnorm(q, layer["attn_q_norm"]), self.head_rmsnorm(k, layer["attn_k_norm"]), v


class Model(QKNormMixin, llama.Model):
    pass
