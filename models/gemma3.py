"""gemma3 (text): gemma2's blocks plus
- q/k RMSNorm over each head ((1 + w) like every gemma norm) before RoPE;
- sliding-window layers from layer_types (older configs: sliding_window_pattern, every 6th layer global);
- RoPE per layer type: sliding layers use rope_local_base_freq (10k) without scaling, global layers rope_theta (1M)
  with the config's rope scaling (e.g. linear x8); transformers 5 writes both under rope_parameters
  {"sliding_attention": ..., "full_attention": ...};
- no attention soft-capping (transformers ignores attn_logit_softcapping for gemma3), final soft-capping if set.

model_type "gemma3_text" is Gemma3ForCausalLM (what transformers writes for a Gemma3TextConfig, e.g. gemma-3-1b).
model_type "gemma3" is the multimodal Gemma3ForConditionalGeneration: its text_config and language-model tensors are
converted, the vision tower and projector are left out. Sparse text configs (as on the Hub) get Gemma3TextConfig's
defaults. (transformers' Gemma3ForConditionalGeneration never applies final_logit_softcapping; released gemma3
configs have none, and a configured one is applied here as Gemma3ForCausalLM does.)"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.errors import SourceError
from lowbit.models import gemma, gemma2, llama
from lowbit.models.common import SUPPORTED_ROPE, rope_attention_factor, rope_config, rope_inv_freq, rope_tables
from lowbit.models.gemma import adapt_to_checkpoint
from lowbit.models.names import make_expected, make_sanitize
from lowbit.models.qwen3 import QKNormMixin

__all__ = ["Model", "ModelArgs", "expected_tensors", "sanitize", "args_from_hf", "adapt_to_checkpoint"]

LAYER_NAMES = {**gemma2.LAYER_NAMES, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
MULTIMODAL_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("vision_tower.", None),
    ("multi_modal_projector.", None),
    ("model.vision_tower.", None),
    ("model.multi_modal_projector.", None),
)
sanitize = make_sanitize(LAYER_NAMES, prefixes=MULTIMODAL_PREFIXES)
expected_tensors = make_expected(LAYER_NAMES)

# Gemma3TextConfig defaults (transformers 5), for the sparse text_config of multimodal checkpoints
DEFAULTS = dict(
    vocab_size=262_208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131_072,
    rms_norm_eps=1e-6,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    tie_word_embeddings=True,
)
GLOBAL_THETA, LOCAL_THETA, PATTERN = 1_000_000.0, 10_000.0, 6


@dataclass
class ModelArgs(gemma2.ModelArgs):
    rope_local_theta: float = LOCAL_THETA
    rope_local_scaling: dict | None = None

    @classmethod
    def hf_fields(cls, cfg: dict, defaults: dict) -> dict:
        d = super().hf_fields(cfg, defaults)
        d["attn_logit_softcapping"] = 0.0
        n = d["num_hidden_layers"]
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or PATTERN)
        types = cfg.get("layer_types") or gemma2.alternating(n, pattern)
        if len(types) != n:
            raise SourceError(f"layer_types has {len(types)} entries for {n} layers")
        d["layer_types"] = list(types)
        (d["rope_theta"], d["rope_scaling"]), (d["rope_local_theta"], d["rope_local_scaling"]) = rope_by_type(cfg)
        return d


def rope_by_type(cfg: dict) -> tuple[tuple[float, dict | None], tuple[float, dict | None]]:
    """((global theta, scaling), (local theta, scaling)) from rope_parameters per layer type (transformers 5) or
    rope_theta + rope_scaling + rope_local_base_freq (older configs)."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:

        def one(p: dict | None, theta: float) -> tuple[float, dict | None]:
            flat = {"rope_parameters": {"rope_theta": theta, **(p or {})}}
            return rope_config({**flat, "max_position_embeddings": cfg.get("max_position_embeddings")})

        out = (
            one(params.get("full_attention"), cfg.get("rope_theta") or GLOBAL_THETA),
            one(params.get("sliding_attention"), cfg.get("rope_local_base_freq") or LOCAL_THETA),
        )
    else:
        out = (
            rope_config({**cfg, "rope_theta": cfg.get("rope_theta") or params.get("rope_theta") or GLOBAL_THETA}),
            (float(cfg.get("rope_local_base_freq") or LOCAL_THETA), None),
        )
    for _, scaling in out:
        if scaling and scaling["rope_type"] not in SUPPORTED_ROPE:
            raise SourceError(
                f"unsupported rope scaling {scaling['rope_type']!r}; supported: {', '.join(SUPPORTED_ROPE)}"
            )
    return out


def args_from_hf(cfg: dict) -> ModelArgs:
    text = cfg.get("text_config")
    if text is not None:  # multimodal Gemma3ForConditionalGeneration: the language model only
        text = {"tie_word_embeddings": cfg.get("tie_word_embeddings", True), **text}
    merged = {**DEFAULTS, **(text if text is not None else cfg)}
    return ModelArgs.from_hf(merged, tie_word_embeddings=True, per_layer_window=True)


class Model(QKNormMixin, gemma2.SandwichMixin, gemma.GemmaMixin, llama.Model):
    def setup_rope(self) -> None:
        super().setup_rope()  # global layers: self.cos, self.sin
        a = self.args
        inv = rope_inv_freq(self.rot, a.rope_local_theta, a.rope_local_scaling, self.ctx)
        cos, sin = rope_tables(inv, self.ctx, rope_attention_factor(a.rope_local_scaling))
        self.cos_local, self.sin_local = self.ops.table(cos), self.ops.table(sin)

    def rope_for(self, li: int) -> tuple[np.ndarray, np.ndarray]:
        types = self.args.layer_types
        if types is not None and types[li] == llama.SLIDING:
            return self.cos_local, self.sin_local
        return self.cos, self.sin
