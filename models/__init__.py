"""Model families: model_type -> module with ModelArgs, sanitize(), Model."""

from __future__ import annotations

from types import ModuleType

from lowbit.errors import SourceError
from lowbit.models import llama, qwen2

FAMILIES: dict[str, ModuleType] = {"llama": llama, "qwen2": qwen2}
ALIASES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def family_for(model_type: str | None) -> tuple[str, ModuleType]:
    """(family name, module) for an HF model_type; SourceError listing what is supported otherwise."""
    fam = ALIASES.get(model_type or "")
    if fam is None:
        raise SourceError(
            f"unsupported architecture {model_type!r}; supported model_type values: {', '.join(sorted(ALIASES))}"
        )
    return fam, FAMILIES[fam]
