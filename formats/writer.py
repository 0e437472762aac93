"""Streaming container writer: tensors are written one at a time into a temporary file that is fsynced and
renamed into place only when complete. An exception (Ctrl-C included) removes the temporary file.

Where the OS has it (Linux ``O_TMPFILE``) the temporary file has no name until it is complete, so even a SIGKILL
leaves nothing behind; it is then linked under a temporary name and renamed over the output. Elsewhere it is a
hidden ``.NAME.tmp-PID`` file, and a later writer of the same output removes those of processes no longer alive."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats.checksum import crc32
from lowbit.formats.layout import ALIGN, MAGIC, PREAMBLE, VERSION_MINOR, align_up, data_start, major_version_for
from lowbit.formats.qtypes import QType

log = logging.getLogger(__name__)

HEADER_SLACK = 16384  # spare bytes so metadata added at close (quality card, provenance) fits in place


@dataclass(frozen=True)
class TensorPlan:
    name: str
    qtype: QType
    shape: tuple[int, ...]


def _crc_hex(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"


def _layout(plans: list[TensorPlan], blobs: dict[str, bytes]) -> tuple[dict, dict, int]:
    """(tensor table, blob table, bytes of the data section) of a container holding ``plans`` and ``blobs``: each
    part and blob at the next ALIGN boundary, in order (tensor checksums filled in as they are written)."""
    tensors: dict[str, dict] = {}
    table: dict[str, dict] = {}
    offset = 0
    for plan in plans:
        entry = {"qtype": plan.qtype.name, "shape": list(plan.shape), "parts": {}}
        for part, (pshape, dtype) in plan.qtype.part_shapes(plan.shape).items():
            nbytes = int(np.prod(pshape, dtype=np.int64)) * np.dtype(dtype).itemsize
            entry["parts"][part] = {"offset": offset, "nbytes": nbytes, "shape": list(pshape), "dtype": dtype,
                                    "crc32": _crc_hex(0)}  # fmt: skip
            offset = align_up(offset + nbytes)
        tensors[plan.name] = entry
    for name, data in blobs.items():
        table[name] = {"offset": offset, "nbytes": len(data), "crc32": _crc_hex(crc32(data))}
        offset = align_up(offset + len(data))
    return tensors, table, offset


def planned_size(meta: dict, plans: list[TensorPlan], blobs: dict[str, bytes]) -> int:
    """Bytes of the file that ContainerWriter(path, meta, plans, blobs) writes."""
    tensors, table, data_len = _layout(plans, blobs)
    header = _header_json(meta, major_version_for({p.name: p for p in plans}), tensors, table)
    return data_start(len(header) + HEADER_SLACK) + data_len


def _header_json(meta: dict, major: int, tensors: dict, blobs: dict) -> bytes:
    """The header's JSON bytes (before padding to the reserved length)."""
    header = {**meta, "format": {"name": "lowbit", "version": [major, VERSION_MINOR], "align": ALIGN},
              "tensors": tensors, "blobs": blobs}  # fmt: skip
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class ContainerWriter:
    """Usage::

        with ContainerWriter(path, meta, plans, blobs) as w:
            for plan in plans:
                w.write_tensor(plan.name, parts)
            w.meta["quality"] = {...}      # optional, before the block ends
    """

    def __init__(self, path: str | os.PathLike, meta: dict, plans: list[TensorPlan], blobs: dict[str, bytes]):
        self.path = Path(path)
        self.meta = dict(meta)
        self._plans = {p.name: p for p in plans}
        self._major = major_version_for(self._plans)
        if len(self._plans) != len(plans):
            raise LowbitError("duplicate tensor names in the conversion plan")
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._written: set[str] = set()
        self._tensors, self._blobs, self._data_len = _layout(plans, blobs)
        blob_data = dict(blobs)
        self._header_len = len(self._header_bytes()) + HEADER_SLACK
        self._start = data_start(self._header_len)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(self.path)
        self._f, self._unnamed = _open_temp(self.path.parent, self._tmp)
        try:
            self._f.truncate(self._start + self._data_len)
            for name, data in blob_data.items():
                self._f.seek(self._start + self._blobs[name]["offset"])
                self._f.write(data)
        except BaseException:
            self.abort()
            raise

    def _header_bytes(self) -> bytes:
        return _header_json(self.meta, self._major, self._tensors, self._blobs)

    def write_tensor(self, name: str, parts: dict[str, np.ndarray]) -> None:
        entry = self._tensors.get(name)
        if entry is None:
            raise LowbitError(f"tensor {name!r} is not in the conversion plan")
        if set(parts) != set(entry["parts"]):
            raise LowbitError(f"tensor {name!r}: expected parts {sorted(entry['parts'])}, got {sorted(parts)}")
        for part, spec in entry["parts"].items():
            arr = np.ascontiguousarray(parts[part])
            if list(arr.shape) != spec["shape"] or arr.dtype != np.dtype(spec["dtype"]):
                raise LowbitError(
                    f"tensor {name!r} part {part}: expected {spec['dtype']}{spec['shape']}, "
                    f"got {arr.dtype}{list(arr.shape)}"
                )
            buf = memoryview(arr).cast("B")
            spec["crc32"] = _crc_hex(crc32(buf))
            self._f.seek(self._start + spec["offset"])
            self._f.write(buf)
        self._written.add(name)

    def close(self) -> Path:
        """Finish: header with checksums, fsync, atomic rename. Returns the final path."""
        try:
            missing = [n for n in self._tensors if n not in self._written]
            if missing:
                raise LowbitError(f"conversion incomplete: {len(missing)} tensors not written (first: {missing[0]})")
            header = self._header_bytes()
            if len(header) > self._header_len:
                raise LowbitError("container metadata grew past the reserved header space")
            header = header + b" " * (self._header_len - len(header))
            pre = PREAMBLE.pack(MAGIC, self._major, VERSION_MINOR, self._header_len, crc32(header), 0)
            self._f.seek(0)
            self._f.write(pre)
            self._f.write(header)
            self._f.flush()
            os.fsync(self._f.fileno())
            if self._unnamed:  # give the finished file a (temporary) name, then move it into place
                _link_unnamed(self._f.fileno(), self._tmp)
            self._f.close()
            os.replace(self._tmp, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        log.info("wrote %s (%d bytes)", self.path, self._start + self._data_len)
        return self.path

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _open_temp(folder: Path, named: Path):
    """(file, unnamed?): an O_TMPFILE file in ``folder`` where the OS and file system allow it, else ``named``."""
    flag = getattr(os, "O_TMPFILE", 0)
    if flag and Path("/proc/self/fd").is_dir():
        try:
            fd = os.open(folder, flag | os.O_RDWR, 0o644)
        except OSError:
            pass
        else:
            return os.fdopen(fd, "w+b"), True
    return open(named, "w+b"), False  # closed by the writer


def _link_unnamed(fd: int, name: Path) -> None:
    """linkat(AT_SYMLINK_FOLLOW) of an O_TMPFILE file to ``name`` (os.link takes that path only with a dir fd)."""
    dir_fd = os.open(name.parent, os.O_RDONLY)
    try:
        os.link(f"/proc/self/fd/{fd}", name.name, dst_dir_fd=dir_fd, follow_symlinks=True)
    finally:
        os.close(dir_fd)


def _remove_stale_temps(path: Path) -> None:
    """Remove ``.NAME.tmp-PID`` files of ``path`` left by writers that died (a kill skips their clean-up)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            log.info("removed %s, left by a conversion that did not finish", tmp)
        except PermissionError:  # alive, another user's
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
