"""gemma (v1): the llama blocks with
- embeddings multiplied by sqrt(hidden_size), rounded to the checkpoint's float type first (transformers casts the
  normalizer to the weights' dtype, so a bf16 checkpoint of hidden 3072 scales by 55.5, not 55.4256);
- RMSNorm weights stored as the checkpoint has them (w) and applied as (1 + w): the 1 is added once at load, in
  float32, which is exactly what transformers computes;
- GeGLU with the tanh-approximate GELU (hidden_act "gelu" in old configs means the same, as transformers says);
- head_dim from the config (not hidden / heads) and tied lm_head."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lowbit.models import llama

__all__ = ["Model", "ModelArgs", "expected_tensors", "sanitize", "args_from_hf", "adapt_to_checkpoint"]

sanitize = llama.sanitize
expected_tensors = llama.expected_tensors
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")


@dataclass
class ModelArgs(llama.ModelArgs):
    embed_scale: float = 0.0  # 0: sqrt(hidden_size) in float32

    ACTIVATIONS = (*GELU_TANH, "gelu")

    @classmethod
    def hf_fields(cls, cfg: dict, defaults: dict) -> dict:
        d = super().hf_fields(cfg, defaults)
        d["embed_scale"] = embed_scale(d["hidden_size"], cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        return d


def args_from_hf(cfg: dict) -> ModelArgs:
    return ModelArgs.from_hf(cfg, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh")


def embed_scale(hidden: int, dtype: str) -> float:
    """sqrt(hidden) as float32, then rounded to ``dtype`` (a safetensors dtype such as "BF16" or a torch name such as
    "bfloat16") the way transformers' ``embed_scale.to(weight.dtype)`` does."""
    s = np.array([math.sqrt(hidden)], dtype=np.float32)
    kind = str(dtype).lower()
    if kind in ("bf16", "bfloat16"):
        bits = s.view(np.uint32)
        bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
        s = bits.view(np.float32)
    elif kind in ("f16", "float16"):
        s = s.astype(np.float16).astype(np.float32)
    return float(s[0])


def adapt_to_checkpoint(args: ModelArgs, dtypes: dict[str, str]) -> None:
    """Called by the converter with the safetensors dtype of each canonical tensor: the normalizer follows the stored
    embedding's type (trusted over the config's dtype)."""
    if "token_embd.weight" in dtypes:
        args.embed_scale = embed_scale(args.hidden_size, dtypes["token_embd.weight"])


class GemmaMixin:
    """(1 + w) norms, scaled embeddings, GeGLU."""

    NORM_OFFSET = 1.0

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        scale = self.args.embed_scale or math.sqrt(self.args.hidden_size)
        return self.ops.scale_by(super().embed_tokens(tokens), scale)

    def act_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self.ops.gelu_tanh_mul(gate, up)


class Model(GemmaMixin, llama.Model):
    pass
