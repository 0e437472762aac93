"""Reading a JSON object from a checkpoint's side files (config.json, tokenizer_config.json, ...)."""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.errors import SourceError


def read_json_object(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when there is no such file; SourceError when it is not one."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SourceError(f"cannot read {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SourceError(f"cannot read {path}: expected a JSON object, got {type(data).__name__}")
    return data
