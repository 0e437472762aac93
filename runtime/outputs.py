"""Files the commands write: never onto one of their inputs, never half-written."""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.errors import LowbitError


def source_files(source: str) -> list[Path]:
    """The files a conversion reads (a GGUF, or every file of a checkpoint folder), to never write onto them."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []


def check_output(out: Path, sources: list[Path], force: bool, what: str) -> None:
    """Refuse to write onto an input (always) or onto an existing file (unless ``force``)."""
    if out.exists() and out.is_file():
        if any(out.resolve() == p.resolve() for p in sources):
            raise LowbitError(f"{what} {out}: that is an input of this command; refusing to overwrite it")
        if not force:
            raise LowbitError(f"{what} {out}: file exists; pass --force to replace it")


def write_json_atomic(path: Path, data) -> None:
    """``data`` as JSON at ``path``, through a temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LowbitError(f"cannot write {path}: {e.strerror or e}") from None
