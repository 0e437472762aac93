"""phi3 (Phi-3, Phi-3.5, Phi-4-mini): the llama blocks with
- fused projections kept fused in the container: attn_qkv = [q; k; v] rows and ffn_gate_up = [gate; up] rows
  (one matvec each; the output is split, which is what transformers does too);
- longrope ("su" in older configs) with short/long factors and the attention factor on cos/sin: the long factors are
  used when the engine's context is beyond original_max_position_embeddings (see common.rope_inv_freq);
- partial rotary embeddings (partial_rotary_factor, e.g. 0.75 in Phi-4-mini);
- a sliding window on every layer when sliding_window is set (Phi-3-mini: 2047)."""

from __future__ import annotations

import numpy as np

from lowbit.models import llama
from lowbit.models.llama import ModelArgs
from lowbit.models.names import make_expected, make_sanitize

__all__ = ["Model", "ModelArgs", "expected_tensors", "sanitize", "args_from_hf"]

LAYER_NAMES = {
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_up_proj": "ffn_gate_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
sanitize = make_sanitize(LAYER_NAMES)
expected_tensors = make_expected(LAYER_NAMES)


def args_from_hf(cfg: dict) -> ModelArgs:
    # Phi3Config always has original_max_position_embeddings (default 4096) and it overrides the rope dict's
    cfg = {**cfg, "original_max_position_embeddings": cfg.get("original_max_position_embeddings") or 4096}
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if (scaling.get("rope_type") or scaling.get("type")) == "yarn" and "short_factor" in scaling:
        # transformers reads an old phi3 "yarn" rope as longrope
        key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
        cfg = {**cfg, key: {**scaling, "rope_type": "longrope", "type": "longrope"}}
    return ModelArgs.from_hf(cfg, tie_word_embeddings=False)


class Model(llama.Model):
    def load_layer(self, p: str) -> dict:
        return {
            "attn_norm": self.norm_weight(p + "attn_norm"),
            "ffn_norm": self.norm_weight(p + "ffn_norm"),
            **{k: self.weight(p + k) for k in ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down")},
        }

    def project_qkv(self, h: np.ndarray, layer: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = self.args
        t = h.shape[0]
        nq, nkv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        qkv = self.ops.linear(layer["attn_qkv"], h)
        q = self.ops.columns(qkv, 0, nq).reshape(t, a.num_attention_heads, a.head_dim)
        k = self.ops.columns(qkv, nq, nq + nkv).reshape(t, a.num_key_value_heads, a.head_dim)
        # v is only copied into the cache: a view is enough on the CPU
        v = self.ops.columns(qkv, nq + nkv, qkv.shape[1], contiguous=False)
        v = v.reshape(t, a.num_key_value_heads, a.head_dim)
        return q, k, v

    def mlp_block(self, h: np.ndarray, layer: dict) -> np.ndarray:
        gate_up = self.ops.linear(layer["ffn_gate_up"], h)
        n = gate_up.shape[1] // 2
        act = self.act_mul(self.ops.columns(gate_up, 0, n), self.ops.columns(gate_up, n, 2 * n))
        return self.ops.linear(layer["ffn_down"], act)
