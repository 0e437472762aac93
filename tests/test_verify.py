"""Tensor data integrity by default: a container's CRC32s are checked on its first load (while it is read into
memory, or over the mapping with --mmap), remembered per file as it is now, and a damaged file is refused."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from lbtest import DEV_EVAL, TOY_MODEL, assert_clean_error, run_cli

from lowbit.errors import FormatError
from lowbit.formats.reader import Container
from lowbit.runtime.engine import Engine, open_container, verified_stamp


@pytest.fixture
def damaged(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.lowbit"
    shutil.copy(TOY_MODEL, path)
    with Container(path) as c:
        part = c._tensors["output_norm.weight"]["parts"]["data"]
        at = c._start + part["offset"] + 8
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))
    return path


@pytest.mark.parametrize("mmap", [False, True])
def test_damaged_data_is_refused_and_no_verify_runs_it(damaged, mmap):
    with pytest.raises(FormatError, match="corrupt tensor data in output_norm.weight.data"):
        open_container(damaged, "cpu", 2, mmap)
    c = open_container(damaged, "cpu", 2, mmap, verify=False)
    assert "output_norm.weight" in c
    assert not verified_stamp(c).exists()


def test_a_good_file_is_checked_once_until_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.lowbit"
    shutil.copy(TOY_MODEL, path)
    c = open_container(path, "cpu", 2)
    stamp = verified_stamp(c)
    assert stamp.exists() and c.resident
    # the arrays read while verifying are the file's bytes
    np.testing.assert_array_equal(c.file_bytes()[: c._start], np.fromfile(path, dtype=np.uint8)[: c._start])
    calls = []
    monkeypatch.setattr(Container, "verify_data", lambda self, threads=1: calls.append(self))
    open_container(path, "cpu", 2, mmap=True)
    assert calls == []  # stamped: not checked again
    os.utime(path, ns=(1, 1))  # the file changed (as far as its stamp can tell)
    c2 = open_container(path, "cpu", 2, mmap=True)
    assert calls == [c2] and verified_stamp(c2) != stamp


def test_cli_refuses_a_damaged_file(damaged):
    env_args = ["generate", damaged, "--raw", "-p", "Once upon", "-n", "4"]
    assert_clean_error(run_cli(*env_args), "corrupt tensor data")
    res = run_cli(*env_args, "--no-verify")
    assert res.returncode == 0, res.stderr
    assert_clean_error(run_cli("eval", damaged, "--text", DEV_EVAL), "corrupt tensor data")


def test_engine_verifies(damaged):
    with pytest.raises(FormatError, match="checksum mismatch"):
        Engine(damaged)


def test_checksum_is_zlibs_crc32_in_pieces():
    """formats/checksum.py (ISA-L where installed) computes zlib's CRC-32, also continued from a running value as the
    reader checks a part chunk by chunk."""
    import zlib

    from lowbit.formats import checksum

    data = np.random.default_rng(1).integers(0, 256, size=3 * 65536 + 123, dtype=np.uint8).tobytes()
    assert checksum.crc32(data) == zlib.crc32(data)
    acc = 0
    for i in range(0, len(data), 65536):
        acc = checksum.crc32(memoryview(data)[i : i + 65536], acc)
    assert acc == zlib.crc32(data) and checksum.crc32(b"") == 0
    assert checksum.BACKEND in ("isal", "zlib")
