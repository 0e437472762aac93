"""qwen2: the llama blocks with biases on q/k/v (loaded when present) and usually tied embeddings; a sliding window
only with use_sliding_window, on the layers layer_types marks (layers >= max_window_layers in older configs)."""

from __future__ import annotations

from lowbit.models.llama import Model, ModelArgs, expected_tensors, sanitize

__all__ = ["Model", "ModelArgs", "expected_tensors", "sanitize", "args_from_hf"]


def args_from_hf(cfg: dict) -> ModelArgs:
    return ModelArgs.from_hf(cfg, tie_word_embeddings=False, use_sliding_window=False, per_layer_window=True)
