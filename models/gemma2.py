"""gemma2: gemma plus
- a norm after attention and a norm after the MLP (post_attention_layernorm is a post-norm here, and
  pre_feedforward_layernorm the MLP's input norm), all (1 + w);
- attention scores scaled by query_pre_attn_scalar ** -0.5 and soft-capped (attn_logit_softcapping);
- final logits soft-capped (final_logit_softcapping);
- a sliding window on the layers layer_types marks sliding (every other layer, starting with layer 0, in configs
  written before layer_types existed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.errors import SourceError
from lowbit.models import gemma, llama
from lowbit.models.gemma import adapt_to_checkpoint
from lowbit.models.names import make_expected, make_sanitize

__all__ = ["Model", "ModelArgs", "expected_tensors", "sanitize", "args_from_hf", "adapt_to_checkpoint"]

LAYER_NAMES = {
    **{k: v for k, v in llama.LAYER_NAMES.items() if k != "post_attention_layernorm"},
    "post_attention_layernorm": "attn_post_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "ffn_post_norm",
}
sanitize = make_sanitize(LAYER_NAMES)
expected_tensors = make_expected(LAYER_NAMES)


@dataclass
class ModelArgs(gemma.ModelArgs):
    query_pre_attn_scalar: float = 0.0  # 0: head_dim
    attn_logit_softcapping: float = 0.0  # 0: none
    final_logit_softcapping: float = 0.0  # 0: none

    ACTIVATIONS = gemma.GELU_TANH

    @classmethod
    def hf_fields(cls, cfg: dict, defaults: dict) -> dict:
        d = super().hf_fields(cfg, defaults)
        if cfg.get("use_bidirectional_attention"):
            raise SourceError("bidirectional (encoder) gemma models are not supported")
        d["query_pre_attn_scalar"] = float(cfg.get("query_pre_attn_scalar") or d["head_dim"])
        d["attn_logit_softcapping"] = float(cfg.get("attn_logit_softcapping") or 0.0)
        d["final_logit_softcapping"] = float(cfg.get("final_logit_softcapping") or 0.0)
        if d["sliding_window"] and d["layer_types"] is None:
            d["layer_types"] = alternating(d["num_hidden_layers"], int(cfg.get("sliding_window_pattern") or 2))
        return d


def alternating(n_layers: int, pattern: int) -> list[str]:
    """transformers' default: every ``pattern``-th layer (1-based) is global, the others sliding."""
    return [llama.SLIDING if (i + 1) % pattern else "full_attention" for i in range(n_layers)]


def args_from_hf(cfg: dict) -> ModelArgs:
    return ModelArgs.from_hf(cfg, tie_word_embeddings=True, per_layer_window=True, hidden_act="gelu_pytorch_tanh")


class SandwichMixin:
    """Post-attention and post-MLP norms, scaled + soft-capped attention, soft-capped logits."""

    def load_layer(self, p: str) -> dict:
        layer = super().load_layer(p)
        layer["attn_post_norm"] = self.norm_weight(p + "attn_post_norm")
        layer["ffn_post_norm"] = self.norm_weight(p + "ffn_post_norm")
        return layer

    def configure(self) -> None:
        super().configure()
        a = self.args
        self.scale = float(a.query_pre_attn_scalar or a.head_dim) ** -0.5
        self.attn_softcap = a.attn_logit_softcapping
        self.final_softcap = a.final_logit_softcapping

    def block(self, x: np.ndarray, layer: dict, li: int, start: int, cache) -> np.ndarray:
        h = self.attention_block(self.rmsnorm(x, layer["attn_norm"]), layer, li, start, cache)
        x = self.ops.add(x, self.rmsnorm(h, layer["attn_post_norm"]))
        h = self.mlp_block(self.rmsnorm(x, layer["ffn_norm"]), layer)
        return self.ops.add(x, self.rmsnorm(h, layer["ffn_post_norm"]))

    def layers_forward(self, x: np.ndarray, start: int, cache) -> np.ndarray:
        return self.each_block(x, start, cache)


class Model(SandwichMixin, gemma.GemmaMixin, llama.Model):
    pass
