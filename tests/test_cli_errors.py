"""Bad input through the real command line: one clear error line, exit code 2, no traceback, no partial files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from lbtest import REFSMALL, assert_clean_error, run_cli

from lowbit.runtime.cli import main


@pytest.fixture(scope="module")
def good_container(tmp_path_factory, tiny_models):
    from lowbit.convert.converter import ConvertOptions, convert

    return convert(
        str(tiny_models["llama"]), tmp_path_factory.mktemp("c") / "m.lowbit", ConvertOptions(bits=4), progress=False
    )


def test_missing_path(tmp_path):
    assert_clean_error(run_cli("convert", tmp_path / "nope", "-o", tmp_path / "o.lowbit"), "no such file")


def test_folder_without_config(tmp_path):
    assert_clean_error(run_cli("convert", tmp_path, "-o", tmp_path / "o.lowbit"), "no config.json")


def test_unsupported_architecture(tmp_path, tiny_models):
    src = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    res = run_cli("convert", src, "-o", tmp_path / "o.lowbit")
    assert_clean_error(res, "unsupported architecture 'gpt2'")
    assert "llama" in res.stderr and "qwen2" in res.stderr


def test_missing_tokenizer(tmp_path, tiny_models):
    src = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], src)
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.model").unlink()
    assert_clean_error(run_cli("convert", src, "-o", tmp_path / "o.lowbit"), "tokenizer")
    assert not (tmp_path / "o.lowbit").exists()


def test_unknown_bits(tmp_path, tiny_models):
    assert_clean_error(run_cli("convert", tiny_models["llama"], "-o", tmp_path / "o.lowbit", "--bits", "7"), "--bits 7")


def _corrupt(src, dst, fn):
    data = bytearray(src.read_bytes())
    dst.write_bytes(bytes(fn(data)))
    return dst


@pytest.mark.parametrize(
    "fn,needle",
    [
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:17] + bytes([d[17] ^ 0x10]) + d[18:], "truncated or corrupt"),  # header length
        (lambda d: d[:200] + bytes([d[200] ^ 0x55]) + d[201:], "corrupt header"),
        (lambda d: d[:8] + b"\x07\x00" + d[10:], "newer than this lowbit supports"),
    ],
    ids=["truncated", "bad-header-length", "flipped-header", "newer-major"],
)
def test_bad_container(tmp_path, good_container, fn, needle):
    bad = _corrupt(good_container, tmp_path / "bad.lowbit", fn)
    assert_clean_error(run_cli("generate", bad, "-p", "hi", "-n", "2"), needle)
    assert_clean_error(run_cli("inspect", bad), needle)


def test_offsets_past_end(tmp_path, good_container):
    from test_container import _offset_past_end

    def fn(d):  # _offset_past_end edits a tensor named w.weight; point ours at it
        import json as j
        import struct
        import zlib

        from lowbit.formats.layout import PREAMBLE

        _, _, _, hlen, _, _ = PREAMBLE.unpack_from(d, 0)
        header = j.loads(bytes(d[32 : 32 + hlen]))
        header["tensors"]["w.weight"] = header["tensors"].pop("blk.0.attn_q.weight")
        raw = j.dumps(header).encode().ljust(hlen)
        d[32 : 32 + hlen] = raw
        struct.pack_into("<I", d, 20, zlib.crc32(raw))
        return _offset_past_end(d)

    bad = _corrupt(good_container, tmp_path / "bad.lowbit", fn)
    assert_clean_error(run_cli("inspect", bad), "ends at byte")


def test_not_a_file(tmp_path):
    assert_clean_error(run_cli("generate", tmp_path / "missing.lowbit", "-p", "x"), "no such file")


def test_interrupted_convert_in_process_leaves_nothing(tmp_path, tiny_models, monkeypatch):
    import lowbit.convert.converter as conv

    calls = {"n": 0}
    real = conv.encode_tensor

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "encode_tensor", interrupting)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["convert", str(tiny_models["llama"]), "-o", str(out / "m.lowbit"), "--no-progress"])
    assert code == 130
    assert list(out.iterdir()) == []


def _writing_into(pid: int, folder) -> bool:
    """Whether the process has a file open in ``folder`` (the container being written: unnamed with O_TMPFILE, so
    only its descriptor shows it) or a named temporary there."""
    if any(p.name.startswith(".m.lowbit.tmp") for p in folder.iterdir()):
        return True
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(folder)):
                return True
        except OSError:
            continue
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_killed_convert_process_leaves_nothing(tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowbit.runtime.cli", "convert", str(REFSMALL), "-o", str(out / "m.lowbit"),
         "--bits", "2", "--no-progress"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not _writing_into(proc.pid, out):
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "convert finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err  # 128 + the signal, as shells report
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


def test_bad_thread_count():
    assert_clean_error(run_cli("generate", "-p", "hi", "-n", "2", "--threads", "0"), "--threads must be at least 1")


def test_no_command_overwrites_an_input_or_an_existing_file(tmp_path, tiny_models):
    """convert -o and inspect --save-recipe: an existing file needs --force; an input of the command is refused
    even with it, and stays byte for byte what it was."""
    folder = tiny_models["llama"]
    weights = folder / "model.safetensors"
    before = weights.read_bytes()
    for force in ((), ("--force",)):
        res = run_cli("convert", folder, "-o", weights, "--no-progress", *force)
        assert_clean_error(res, "that is an input of this command")
    assert weights.read_bytes() == before
    out = tmp_path / "m.lowbit"
    out.write_bytes(b"mine")
    assert_clean_error(run_cli("convert", folder, "-o", out, "--no-progress"), "file exists; pass --force")
    assert out.read_bytes() == b"mine"
    assert run_cli("convert", folder, "-o", out, "--no-progress", "--force").returncode == 0
    model = out.read_bytes()
    assert_clean_error(run_cli("inspect", out, "--save-recipe", out, "--force"), "that is an input of this command")
    assert out.read_bytes() == model
    recipe = tmp_path / "r.json"
    recipe.write_text("keep")
    assert_clean_error(run_cli("inspect", out, "--save-recipe", recipe), "file exists; pass --force")
    assert recipe.read_text() == "keep"
    assert run_cli("inspect", out, "--save-recipe", recipe, "--force").returncode == 0
    assert recipe.read_text().startswith("{")


def test_threads_beyond_the_machine_and_verbose_after_the_command():
    assert_clean_error(run_cli("generate", "-p", "hi", "-n", "1", "--threads", "100000"), "logical CPUs")
    res = run_cli("inspect", "-v")
    assert res.returncode == 0 and "architecture:" in res.stdout


def test_an_impossible_budget_fails_at_once(tmp_path, tiny_models):
    """Before any calibration text is sampled or any layer measured: one line, no output."""
    for flag, value, needle in (("--max-size", "1", "a file this small cannot be made; with the cheapest types"),
                                ("--target-bpw", "1.5", "cannot be met; the cheapest types need")):
        t0 = time.monotonic()
        res = run_cli("convert", tiny_models["llama"], "-o", tmp_path / "b.lowbit", flag, value, "--no-progress")
        assert_clean_error(res, needle)
        assert time.monotonic() - t0 < 60 and not (tmp_path / "b.lowbit").exists()


@pytest.mark.parametrize("flag,value", [("--parallel", "0"), ("--cache-ram", "-1"), ("--max-queue", "-3")])
def test_serve_capacity_flags_are_checked_before_anything_starts(flag, value):
    assert_clean_error(run_cli("serve", flag, value, "--port", "0"), f"{flag} must be at least")
