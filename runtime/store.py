"""The local model store: run a model by what the user has — a .lowbit file, a GGUF, an HF folder or a hub id.

Anything that is not a .lowbit container is converted once, with the defaults (a GGUF keeps its own types), into
``$LOWBIT_MODELS`` (default ``~/.cache/lowbit/models``) and run from there afterwards, the way Ollama and mlx-lm
users expect. The store's ``index.json`` records each entry's source and, for local sources, their size and mtime,
so a changed file is converted again. ``lowbit list`` and ``lowbit rm NAME`` manage it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.formats.layout import MAGIC

log = logging.getLogger(__name__)

INDEX = "index.json"


def store_dir() -> Path:
    return Path(os.environ.get("LOWBIT_MODELS") or Path.home() / ".cache" / "lowbit" / "models").expanduser()


def _is_container(path: Path) -> bool:
    if path.suffix == ".lowbit":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _entry_name(src: str) -> str:
    """A store name for a source: the file's stem, the folder's name, or the hub id with '/' as '--'."""
    path = Path(src).expanduser()
    base = path.stem if path.is_file() else path.name if path.exists() else src.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model"


def _stamp(src: str) -> dict:
    path = Path(src).expanduser()
    if not path.exists():
        return {"source": src}  # a hub id: converted once
    target = path if path.is_file() else max(path.iterdir(), key=lambda p: p.stat().st_mtime_ns, default=path)
    st = target.stat()
    return {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_index(root: Path) -> dict:
    try:
        data = json.loads((root / INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_index(root: Path, index: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".index-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, root / INDEX)


def resolve_model(src: str | None, progress: bool = True) -> Path:
    """The container to run for ``src``: the bundled model for None, a .lowbit file as it is, anything else from the
    store (converted into it first when it is not there or its local source changed)."""
    from lowbit.runtime.engine import default_model_path

    if not src:
        return default_model_path()
    path = Path(src).expanduser()
    if path.is_file() and _is_container(path):
        return path
    if path.suffix == ".lowbit":
        raise LowbitError(f"{src}: no such file")
    from lowbit.convert.source import is_hub_id

    if not path.exists() and not is_hub_id(src):
        raise LowbitError(f"{src}: no such file or directory (expected a .lowbit or GGUF file, an HF folder or a "
                          "hub id)")
    root = store_dir()
    name = _entry_name(src)
    stamp = _stamp(src)
    index = _read_index(root)
    if name in index and index[name].get("source") != stamp["source"]:  # another source with the same name
        name = f"{name}-{hashlib.sha1(stamp['source'].encode()).hexdigest()[:8]}"
    out = root / f"{name}.lowbit"
    if out.is_file() and index.get(name) == stamp:
        log.info("using %s from the model store", out)
        return out
    from lowbit.convert.converter import ConvertOptions, convert

    root.mkdir(parents=True, exist_ok=True)
    print(f"lowbit: converting {src} into the model store as {name} (once)", file=sys.stderr, flush=True)
    convert(src, out, ConvertOptions(), progress=progress)
    index = _read_index(root)
    index[name] = stamp
    _write_index(root, index)
    return out


def list_models() -> list[dict]:
    """Store entries: name, path, size, source, and the dominant matrix type."""
    from lowbit.formats.reader import Container

    root = store_dir()
    index = _read_index(root)
    rows = []
    for path in sorted(root.glob("*.lowbit")) if root.is_dir() else []:
        row = {"name": path.stem, "path": str(path), "bytes": path.stat().st_size,
               "source": (index.get(path.stem) or {}).get("source", "?"), "type": "?"}  # fmt: skip
        try:
            recipe = Container(path).meta.get("quantization", {}).get("recipe") or {}
            kinds = [v for k, v in recipe.items() if k.startswith("blk.")]
            row["type"] = max(set(kinds), key=kinds.count) if kinds else "?"
        except LowbitError as e:
            row["type"] = f"unreadable ({e})"
        rows.append(row)
    return rows


def remove_model(name: str) -> Path:
    root = store_dir()
    path = root / f"{name}.lowbit"
    if "/" in name or not path.is_file():
        known = ", ".join(r["name"] for r in list_models()) or "none"
        raise LowbitError(f"no model {name!r} in the store {root} (models: {known})")
    path.unlink()
    index = _read_index(root)
    if index.pop(name, None) is not None:
        _write_index(root, index)
    return path
