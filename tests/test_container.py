"""Container writer/reader: round trip, atomic writes, and every corruption giving one clear FormatError."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from lowbit.errors import FormatError
from lowbit.formats.layout import PREAMBLE
from lowbit.formats.qtypes import REGISTRY, get_qtype, pack_codes
from lowbit.formats.reader import Container
from lowbit.formats.writer import ContainerWriter, TensorPlan


def write_sample(path):
    rng = np.random.default_rng(0)
    q = get_qtype("q4a_g32")
    plans = [TensorPlan("norm.weight", get_qtype("f32"), (8,)), TensorPlan("w.weight", q, (4, 64))]
    codes = pack_codes(rng.integers(0, 16, size=(4, 64)), q)
    parts = {"codes": codes, "scales": np.ones((4, 2), np.float16), "mins": np.zeros((4, 2), np.float16)}
    with ContainerWriter(path, {"hello": "world"}, plans, {"tokenizer.json": b"{}"}) as w:
        w.write_tensor("norm.weight", {"data": np.arange(8, dtype=np.float32)})
        w.write_tensor("w.weight", parts)
        w.meta["quality"] = {"ppl": 1.0}
    return parts


def test_round_trip(tmp_path):
    p = tmp_path / "a.lowbit"
    parts = write_sample(p)
    c = Container(p)
    assert c.meta["hello"] == "world" and c.meta["quality"] == {"ppl": 1.0}
    np.testing.assert_array_equal(c.tensor("norm.weight").parts["data"], np.arange(8))
    t = c.tensor("w.weight")
    assert t.qtype.name == "q4a_g32" and t.shape == (4, 64)
    for k, v in parts.items():
        np.testing.assert_array_equal(t.parts[k], v)
    assert c.blob("tokenizer.json") == b"{}"
    assert c.verify() == []
    assert [f.name for f in tmp_path.iterdir()] == ["a.lowbit"]
    for part in t.parts.values():  # 64-byte alignment of every blob
        assert part.ctypes.data % 64 == 0


def test_registry_ids_unique_and_stable():
    ids = [q.id for q in REGISTRY.values()]
    assert len(ids) == len(set(ids))
    assert REGISTRY["q4_g64"].id == 1402 and REGISTRY["q4a_g64"].id == 1412 and REGISTRY["f32"].id == 0


def test_exception_leaves_no_file(tmp_path):
    p = tmp_path / "b.lowbit"
    plans = [TensorPlan("x", get_qtype("f32"), (2,))]
    with pytest.raises(KeyboardInterrupt):
        with ContainerWriter(p, {}, plans, {}):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_incomplete_write_refused(tmp_path):
    p = tmp_path / "c.lowbit"
    plans = [TensorPlan("x", get_qtype("f32"), (2,)), TensorPlan("y", get_qtype("f32"), (2,))]
    with pytest.raises(Exception, match="incomplete"):
        with ContainerWriter(p, {}, plans, {}) as w:
            w.write_tensor("x", {"data": np.zeros(2, np.float32)})
    assert list(tmp_path.iterdir()) == []


def corrupt(tmp_path, fn):
    p = tmp_path / "x.lowbit"
    write_sample(p)
    data = bytearray(p.read_bytes())
    data = fn(data)
    p.write_bytes(bytes(data))
    return p


def _flip_header_byte(d):
    d[PREAMBLE.size + 20] ^= 0x40
    return d


def _newer_major(d):
    struct.pack_into("<H", d, 8, 3)
    return d


def _offset_past_end(d):
    # rewrite a tensor offset inside the header (keeping the CRC valid) to point past the end of the file
    import json
    import zlib

    _, _, _, hlen, _, _ = PREAMBLE.unpack_from(d, 0)
    header = json.loads(bytes(d[32 : 32 + hlen]))
    header["tensors"]["w.weight"]["parts"]["codes"]["offset"] = 10**9
    raw = json.dumps(header).encode().ljust(hlen)
    d[32 : 32 + hlen] = raw
    struct.pack_into("<I", d, 20, zlib.crc32(raw))
    return d


@pytest.mark.parametrize(
    "fn,message",
    [
        (lambda d: d[:100], "truncated"),
        (lambda d: d[: len(d) - 70], "truncated"),
        (lambda d: d[:10], "too short"),
        (lambda d: b"GGUF" + d[4:], "not a lowbit container"),
        (_flip_header_byte, "corrupt header"),
        (_newer_major, "newer than this lowbit supports"),
        (_offset_past_end, "ends at byte"),
    ],
    ids=["truncated-header", "truncated-data", "tiny", "bad-magic", "flipped-header", "newer-major", "offset-past-end"],
)
def test_corruption_is_one_clear_error(tmp_path, fn, message):
    p = corrupt(tmp_path, fn)
    with pytest.raises(FormatError, match=message) as e:
        Container(p)
    assert "\n" not in str(e.value)


def test_flipped_data_byte_found_by_verify(tmp_path):
    p = tmp_path / "v.lowbit"
    write_sample(p)
    c = Container(p)
    codes = c.tensor("w.weight").parts["codes"]
    at = codes.ctypes.data - np.frombuffer(c._mm, np.uint8).ctypes.data
    del codes, c
    d = bytearray(p.read_bytes())
    d[at + 3] ^= 0xFF
    p.write_bytes(bytes(d))
    assert Container(p).verify() != []


def _mapped(path) -> bool:
    return str(path) in open("/proc/self/maps").read()


def test_load_into_memory_serves_the_same_bytes(tmp_path, monkeypatch):
    import lowbit.formats.reader as reader

    p = tmp_path / "m.lowbit"
    parts = write_sample(p)
    c = Container(p)
    earlier = c.tensor("w.weight").parts["codes"]
    monkeypatch.setattr(reader, "READ_CHUNK", 100)  # many chunks, the last one short, over several readers
    c.load_into_memory(threads=3)
    assert c.resident
    assert c.file_bytes().tobytes() == p.read_bytes()
    t = c.tensor("w.weight")
    for k, v in parts.items():
        np.testing.assert_array_equal(t.parts[k], v)
        assert not t.parts[k].flags.writeable
        assert t.parts[k].ctypes.data % 64 == 0
    np.testing.assert_array_equal(earlier, parts["codes"])  # views handed out before stay valid
    assert c.blob("tokenizer.json") == b"{}"
    assert c.verify() == []


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_load_into_memory_unmaps_the_file(tmp_path):
    p = tmp_path / "u.lowbit"
    write_sample(p)
    c = Container(p)
    assert _mapped(p)
    c.load_into_memory()
    assert not _mapped(p)
    np.testing.assert_array_equal(c.tensor("norm.weight").parts["data"], np.arange(8))


def test_load_into_memory_of_a_shrunk_file_is_one_clear_error(tmp_path):
    p = tmp_path / "s.lowbit"
    write_sample(p)
    c = Container(p)
    os.truncate(p, c.size // 2)  # another process cut the file after it was opened
    with pytest.raises(FormatError, match="cannot read into memory: file shrank"):
        c.load_into_memory(threads=2)
    assert not c.resident


def test_planned_size_is_the_written_size(tmp_path):
    """formats.writer.planned_size: what --max-size budgets against is the file ContainerWriter writes."""
    from lowbit.formats.qtypes import get_qtype
    from lowbit.formats.writer import ContainerWriter, TensorPlan, planned_size

    plans = [TensorPlan("a.weight", get_qtype("q4a_g32"), (8, 64)), TensorPlan("n.weight", get_qtype("f32"), (64,)),
             TensorPlan("b.weight", get_qtype("q8_g32"), (3, 96))]
    blobs = {"tokenizer.json": b"{}" * 1000}
    meta = {"architecture": {"model_type": "llama"}, "note": "x" * 333}
    path = tmp_path / "p.lowbit"
    rng = np.random.default_rng(0)
    with ContainerWriter(path, meta, plans, blobs) as w:
        for p in plans:
            parts = {k: rng.integers(0, 255, size=s).astype(d) for k, (s, d) in p.qtype.part_shapes(p.shape).items()}
            w.write_tensor(p.name, parts)
    assert path.stat().st_size == planned_size(meta, plans, blobs)
