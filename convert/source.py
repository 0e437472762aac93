"""Reading a Hugging Face checkpoint: a local folder or a hub repo id, config.json, and safetensors tensors one at a
time through an mmap (bf16 is widened to float32 by bit shifting; no torch needed)."""

from __future__ import annotations

import json
import logging
import mmap
import re
import struct
from pathlib import Path

import numpy as np

from lowbit.errors import SourceError
from lowbit.formats.jsonfile import read_json_object

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def resolve_source(src: str) -> Path:
    """A local checkpoint folder for ``src`` (downloading from the hub when it is a repo id)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{src}: expected a Hugging Face checkpoint folder, got a file")
        return path
    if not is_hub_id(src):
        raise SourceError(f"{src}: no such file or directory")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=src, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{src}: not a local folder and could not be fetched from the hub ({first})") from None
    return Path(local)


def read_json(path: Path, required: bool = True) -> dict | None:
    data = read_json_object(path)
    if data is None and required:
        raise SourceError(f"{path.parent}: no {path.name} (is this a Hugging Face checkpoint folder?)")
    return data


def is_hub_id(src: str) -> bool:
    """Whether ``src`` reads as a hub repo id (org/name) rather than a local path."""
    return bool(HUB_ID.match(src)) and not src.startswith((".", "/", "~"))


class SafetensorsFile:
    """Minimal validated safetensors reader over an mmap."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()
        size = path.stat().st_size
        try:
            if size < 8:
                raise SourceError(f"{path}: truncated safetensors file")
            self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
            (n,) = struct.unpack_from("<Q", self._mm, 0)
            if n > size - 8:
                raise SourceError(f"{path}: corrupt safetensors header")
            header = json.loads(self._mm[8 : 8 + n].decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            self._f.close()
            raise SourceError(f"{path}: corrupt safetensors header ({e})") from None
        self._base = 8 + n
        self.tensors: dict[str, dict] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt = info.get("dtype")
            if dt not in ST_DTYPES:
                raise SourceError(f"{path}: tensor {name} has unsupported dtype {dt}")
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(ST_DTYPES[dt]).itemsize or (
                self._base + end > size
            ):
                raise SourceError(f"{path}: tensor {name} has inconsistent size (truncated file?)")
            self.tensors[name] = {"dtype": dt, "shape": shape, "start": start, "end": end}

    def raw(self, name: str) -> tuple[str, np.ndarray]:
        """(safetensors dtype name, array view in the stored dtype; bf16 as uint16)."""
        info = self.tensors[name]
        dt = np.dtype(ST_DTYPES[info["dtype"]])
        count = (info["end"] - info["start"]) // dt.itemsize
        arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=self._base + info["start"])
        return info["dtype"], arr.reshape(info["shape"])

    def close(self) -> None:
        self._f.close()


def to_f32(dtype: str, arr: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


class Checkpoint:
    """All safetensors files of a checkpoint folder (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = read_json(folder / "model.safetensors.index.json", required=False)
        if index is not None:
            try:
                files = sorted(set(index["weight_map"].values()))
            except (KeyError, AttributeError):
                raise SourceError(f"{folder}/model.safetensors.index.json: no weight_map") from None
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{folder}: no .safetensors weights found (PyTorch .bin checkpoints are not supported)")
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, SafetensorsFile] = {}
        for fname in files:
            p = folder / fname
            if not p.exists():
                raise SourceError(f"{p}: shard listed in the index is missing")
            st = SafetensorsFile(p)
            self.files.append(st)
            for name in st.tensors:
                self.where[name] = st

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].tensors[name]["shape"]

    def dtype(self, name: str) -> str:
        return self.where[name].tensors[name]["dtype"]

    def raw(self, name: str) -> tuple[str, np.ndarray]:
        return self.where[name].raw(name)

    def close(self) -> None:
        for f in self.files:
            f.close()
