"""Model families: model_type -> module with ModelArgs, args_from_hf(), sanitize(), expected_tensors(), Model (and
optionally adapt_to_checkpoint(args, dtypes), called by the converter with each tensor's safetensors dtype)."""

from __future__ import annotations

from types import ModuleType

from lowbit.errors import SourceError
from lowbit.models import gemma, gemma2, gemma3, llama, phi3, qwen2, qwen3

FAMILIES: dict[str, ModuleType] = {
    "llama": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma": gemma,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "phi3": phi3,
}
# HF config.json model_type -> family
ALIASES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",  # the llama blocks; sliding_window (when set) limits attention on every layer
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",  # Gemma3ForCausalLM
    "gemma3": "gemma3",  # Gemma3ForConditionalGeneration: the text model only
    "phi3": "phi3",
}


def family_for(model_type: str | None) -> tuple[str, ModuleType]:
    """(family name, module) for an HF model_type; SourceError listing what is supported otherwise."""
    fam = ALIASES.get(model_type or "")
    if fam is None:
        raise SourceError(
            f"unsupported architecture {model_type!r}; supported model_type values: {', '.join(sorted(ALIASES))}"
        )
    return fam, FAMILIES[fam]
