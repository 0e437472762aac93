"""mmap container reader. Everything in the header is validated before any array view is created, so a corrupt or
truncated file fails with one FormatError line instead of a numpy traceback or a segfault.

Arrays are views on the file mapping, or, after :meth:`Container.load_into_memory`, on an anonymous copy of the file
in transparent huge pages (what the CPU runtime decodes from: the page cache maps a file in 4 KiB pages as often as
not, and decode streams every weight once per token, so TLB misses cost it a share of the memory bandwidth).
"""

from __future__ import annotations

import json
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.errors import FormatError
from lowbit.formats import scale_codes
from lowbit.formats.checksum import crc32
from lowbit.formats.layout import MAGIC, PREAMBLE, VERSION_MAJOR, data_start
from lowbit.formats.qtypes import QType, get_qtype

READ_CHUNK = 64 << 20  # bytes one reader thread copies per call in load_into_memory


def _advise_huge(mm: mmap.mmap) -> None:
    """Ask for transparent huge pages on a mapping (Linux; a no-op elsewhere or when the OS refuses)."""
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass


def _anonymous(size: int) -> mmap.mmap | bytearray:
    """Zeroed private memory of ``size`` bytes, in transparent huge pages where the OS has them. Private: a shared
    anonymous mapping (Python's default) is shmem, which gets no huge pages by default."""
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows
        return bytearray(size)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _advise_huge(buf)
    return buf


def _read_range(fd: int, view: memoryview, start: int, end: int) -> None:
    pos = start
    while pos < end:
        n = os.preadv(fd, [view[pos:end]], pos)
        if n <= 0:
            raise EOFError(f"file shrank while it was being read (at byte {pos})")
        pos += n


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class StoredTensor:
    name: str
    qtype: QType
    shape: tuple[int, ...]
    parts: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    def per_row(self) -> StoredTensor:
        """The tensor as the kernels and exports read it: a per-tensor type becomes its per-channel twin with the
        one scale (and min) repeated for every row; a coded-scale type becomes its float16 twin with the decoded
        scales (and mins); any other tensor is returned as it is."""
        if self.qtype.is_float:
            return self
        if self.qtype.coded_scales:
            try:
                d16, m16 = scale_codes.decode_parts(self.parts, self.qtype)
            except FormatError as e:
                raise FormatError(f"tensor {self.name}: {e}") from None
            parts = {"codes": self.parts["codes"], "scales": d16}
            if m16 is not None:
                parts["mins"] = m16
            return StoredTensor(self.name, self.qtype.f16_twin, self.shape, parts)
        if not self.qtype.per_tensor:
            return self
        rows = self.shape[0]
        parts = dict(self.parts)
        for k in ("scales", "mins"):
            if k in parts:
                parts[k] = np.repeat(np.asarray(parts[k]).reshape(1, 1), rows, axis=0)
        return StoredTensor(self.name, self.qtype.row_twin, self.shape, parts)


class Container:
    """A validated, memory-mapped .lowbit file. Arrays returned are read-only views on the mapping."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FormatError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise FormatError(f"{self.path}: is a directory, expected a .lowbit file")
        self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for the mapping
        self.resident = False  # True once the file is read into memory (load_into_memory)
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            if self.size < PREAMBLE.size:
                raise FormatError(f"{self.path}: not a lowbit container (file too short: {self.size} bytes)")
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            _advise_huge(self._mm)
            self.header = self._read_header()
            self._start = data_start(self._header_len)
            self._tensors = self._validate_tensors()
            self._blobs = self._validate_blobs()
        except BaseException:
            self._file.close()
            raise

    # ------------------------------------------------------------------------------------------- validation
    def _fail(self, msg: str) -> FormatError:
        return FormatError(f"{self.path}: {msg}")

    def _read_header(self) -> dict:
        magic, major, minor, header_len, header_crc, flags = PREAMBLE.unpack_from(self._mm, 0)
        if magic != MAGIC:
            raise self._fail("not a lowbit container (bad magic bytes)")
        if flags or any(self._mm[PREAMBLE.size - 4 : PREAMBLE.size]):  # both 0 in every version so far
            raise self._fail("corrupt preamble (flags or reserved bytes set)")
        if major > VERSION_MAJOR:
            raise self._fail(
                f"container format version {major}.{minor} is newer than this lowbit supports "
                f"({VERSION_MAJOR}.x); upgrade lowbit to read it"
            )
        if major < 1:
            raise self._fail(f"unsupported container format version {major}.{minor}")
        if header_len <= 0 or PREAMBLE.size + header_len > self.size:
            raise self._fail(f"truncated or corrupt: header of {header_len} bytes does not fit in {self.size} bytes")
        raw = self._mm[PREAMBLE.size : PREAMBLE.size + header_len]
        if crc32(raw) != header_crc:
            raise self._fail("corrupt header (checksum mismatch)")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"corrupt header (invalid JSON: {e})") from None
        except (ValueError, RecursionError) as e:  # an integer of thousands of digits; nesting beyond the stack
            raise self._fail(f"corrupt header (unreadable JSON: {type(e).__name__})") from None
        if not isinstance(header, dict) or not isinstance(header.get("tensors"), dict):
            raise self._fail("corrupt header (no tensor table)")
        self._header_len = header_len
        self.header_crc = header_crc
        self.version = (major, minor)
        return header

    def _check_range(self, what: str, offset, nbytes) -> None:
        if not (_is_int(offset) and _is_int(nbytes)) or offset < 0 or nbytes < 0:
            raise self._fail(f"corrupt header ({what}: bad offset/length)")
        end = self._start + offset + nbytes
        if end > self.size:
            raise self._fail(
                f"truncated or corrupt: {what} ends at byte {end} but the file has only {self.size} bytes"
            )

    def _validate_tensors(self) -> dict[str, dict]:
        out = {}
        for name, entry in self.header["tensors"].items():
            try:
                qt = get_qtype(entry["qtype"])
                if not isinstance(entry["shape"], list) or not all(_is_int(s) and 0 < s < 1 << 40
                                                                   for s in entry["shape"]):
                    raise self._fail(f"corrupt header (tensor {name}: bad shape {str(entry['shape'])[:40]})")
                shape = tuple(entry["shape"])
                expected = qt.part_shapes(shape)
                parts = entry["parts"]
                if set(parts) != set(expected):
                    raise self._fail(f"corrupt header (tensor {name}: parts {sorted(parts)} do not match {qt.name})")
                for pname, (pshape, dtype) in expected.items():
                    spec = parts[pname]
                    nbytes = math.prod(pshape) * np.dtype(dtype).itemsize
                    if (not isinstance(spec, dict) or not _is_int(spec["nbytes"]) or spec["nbytes"] != nbytes
                            or not isinstance(spec["shape"], list) or tuple(spec["shape"]) != pshape
                            or spec["dtype"] != dtype):
                        raise self._fail(f"corrupt header (tensor {name} part {pname}: size does not match its type)")
                    self._check_range(f"tensor {name}", spec["offset"], nbytes)
            except FormatError as e:
                if str(e).startswith(str(self.path)):
                    raise
                raise self._fail(f"corrupt header (tensor {name}: {e})") from None
            except (KeyError, TypeError, ValueError) as e:
                raise self._fail(f"corrupt header (tensor {name}: {type(e).__name__} {e})") from None
            out[name] = {"qtype": qt, "shape": shape, "parts": {p: parts[p] for p in expected}}
        return out

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name]["shape"]

    def _validate_blobs(self) -> dict[str, dict]:
        blobs = self.header.get("blobs", {})
        if not isinstance(blobs, dict):
            raise self._fail("corrupt header (blob table)")
        for name, spec in blobs.items():
            if not isinstance(spec, dict):
                raise self._fail(f"corrupt header (blob {name})")
            self._check_range(f"blob {name}", spec.get("offset"), spec.get("nbytes"))
        return blobs

    # ------------------------------------------------------------------------------------------- access
    @property
    def meta(self) -> dict:
        return self.header

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> StoredTensor:
        try:
            entry = self._tensors[name]
        except KeyError:
            raise self._fail(f"missing tensor {name!r}") from None
        parts = {}
        for pname, spec in entry["parts"].items():
            dt = np.dtype(spec["dtype"])
            count = spec["nbytes"] // dt.itemsize
            arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=self._start + spec["offset"])
            parts[pname] = arr.reshape(spec["shape"])
        return StoredTensor(name, entry["qtype"], entry["shape"], parts)

    def has_blob(self, name: str) -> bool:
        return name in self._blobs

    def blob(self, name: str) -> bytes:
        spec = self._blobs[name]
        start = self._start + spec["offset"]
        return bytes(self._mm[start : start + spec["nbytes"]])

    def blobs(self) -> dict[str, bytes]:
        return {n: self.blob(n) for n in self._blobs}

    def _ranges(self) -> list[tuple[str, int, int, str | None]]:
        """(label, first byte, bytes, stored crc32) of every tensor part and blob, largest first."""
        out = [(f"{name}.{pname}", self._start + spec["offset"], spec["nbytes"], spec.get("crc32"))
               for name, entry in self._tensors.items() for pname, spec in entry["parts"].items()]
        out += [(f"blob {name}", self._start + spec["offset"], spec["nbytes"], spec.get("crc32"))
                for name, spec in self._blobs.items()]
        return sorted(out, key=lambda r: -r[2])

    def _corrupt(self, bad: list[str]) -> FormatError:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return self._fail(f"corrupt tensor data in {shown} (checksum mismatch): the file is damaged; convert or "
                          "download it again (--no-verify runs it anyway)")

    def verify(self, threads: int = 1) -> list[str]:
        """Check every tensor part's and blob's CRC32 (``threads`` at a time: the checksum releases the GIL); the labels
        ("name.part", "blob name") of those whose data does not match, sorted."""
        def check(r) -> str | None:
            label, start, n, crc = r
            return None if f"{crc32(self._mm[start : start + n]):08x}" == crc else label

        with ThreadPoolExecutor(max(1, threads)) as ex:
            return sorted(b for b in ex.map(check, self._ranges()) if b is not None)

    def verify_data(self, threads: int = 1) -> None:
        """verify(), as a FormatError naming the damaged parts."""
        bad = self.verify(threads)
        if bad:
            raise self._corrupt(bad)

    def load_into_memory(self, threads: int = 1, verify: bool = False) -> None:
        """Read the whole file into anonymous memory (huge pages where the OS has them) and serve every later array
        from there; the file mapping is closed, so the file's pages no longer count as this process's. ``threads``
        readers share the file (reading from the page cache is a copy that one core does not saturate). With
        ``verify`` each tensor part and blob is checked against its CRC32 as it is read (while its bytes are in the
        CPU's caches); FormatError if any differs. Arrays handed out before this call stay valid on the old
        mapping."""
        if self.resident:
            return
        buf = _anonymous(self.size)
        view = memoryview(buf)
        fd = self._file.fileno()
        bad: list[str] = []

        def read(r) -> None:
            label, start, n, crc = r
            acc = 0
            for off in range(start, start + n, READ_CHUNK):  # each chunk checked while it is fresh in the cache
                end = min(off + READ_CHUNK, start + n)
                _read_range(fd, view, off, end)
                if verify:
                    acc = crc32(view[off:end], acc)
            if verify and f"{acc:08x}" != crc:
                bad.append(label)

        try:
            if hasattr(os, "preadv"):
                _read_range(fd, view, 0, min(self._start, self.size))  # preamble, header; then parts and blobs
                with ThreadPoolExecutor(max(1, threads)) as ex:
                    list(ex.map(read, self._ranges()))
            else:
                self._file.seek(0)
                if self._file.readinto(view) != self.size:
                    raise EOFError("file shrank while it was being read")
        except (OSError, EOFError) as e:
            view.release()
            raise self._fail(f"cannot read into memory: {e}") from None
        if bad:
            view.release()
            raise self._corrupt(sorted(bad))
        if verify and not hasattr(os, "preadv"):
            self.verify_data(threads)
        old, self._mm = self._mm, view.toreadonly()
        try:
            old.close()
        except BufferError:  # views handed out earlier keep the mapping alive; GC unmaps it
            pass
        self.resident = True

    def file_bytes(self) -> np.ndarray:
        """The whole file as a read-only uint8 array over the bytes the arrays view (the mapping, or the in-memory
        copy after :meth:`load_into_memory`; no copy)."""
        return np.frombuffer(self._mm, dtype=np.uint8)

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data (no header, no tokenizer blobs)."""
        return sum(s["nbytes"] for t in self._tensors.values() for s in t["parts"].values())

    def close(self) -> None:
        # arrays handed out may still reference the mapping; let GC unmap it
        self._file.close()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
