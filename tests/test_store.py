"""Models by name: `lowbit run|generate|serve|eval SOURCE` with a GGUF, an HF folder (or a hub id) converts once into
the model store and runs from it afterwards; `lowbit list` / `lowbit rm` manage it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from gguf_tiny import write_gguf
from lbtest import assert_clean_error


def lowbit(store, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOWBIT_MODELS": str(store), "NUMBA_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lowbit.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip


def test_gguf_and_hf_folder_run_by_name_then_from_the_store(tiny_models, tmp_path):
    store = tmp_path / "store"
    gg = write_gguf(tiny_models["llama"], tmp_path / "tiny-llama.gguf", qtype="Q8_0")
    first = lowbit(store, "generate", gg, "-p", "hi", "-n", "4", "--raw")
    assert first.returncode == 0, first.stderr
    assert "converting" in first.stderr and "into the model store as tiny-llama" in first.stderr
    assert (store / "tiny-llama.lowbit").is_file()
    second = lowbit(store, "generate", gg, "-p", "hi", "-n", "4", "--raw")
    assert second.returncode == 0 and "converting" not in second.stderr
    assert second.stdout == first.stdout

    folder = tiny_models["qwen2"]
    res = lowbit(store, "generate", folder, "-p", "hi", "-n", "4", "--raw")
    assert res.returncode == 0 and f"into the model store as {folder.name}" in res.stderr, res.stderr

    listed = lowbit(store, "list", "--json")
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {"tiny-llama", folder.name}
    assert rows["tiny-llama"]["type"] == "q8_g32" and rows["tiny-llama"]["source"] == str(gg.resolve())
    assert rows[folder.name]["type"] == "q4a_g32"  # the defaults of an HF conversion
    # a GGUF whose weights are kept asks for exact activations (int8 ones flip near-tied tokens); an HF one int8
    from lowbit.formats.reader import Container

    for name, want in (("tiny-llama", "exact"), (folder.name, "int8")):
        with Container(store / f"{name}.lowbit") as c:
            assert c.meta["runtime"]["kernel_activations"] == want, name
    table = lowbit(store, "list").stdout
    assert "tiny-llama" in table and " MB " in table

    # a changed source is converted again
    os.utime(gg, ns=(gg.stat().st_atime_ns, gg.stat().st_mtime_ns + 10**9))
    again = lowbit(store, "generate", gg, "-p", "hi", "-n", "2", "--raw")
    assert again.returncode == 0 and "converting" in again.stderr

    assert lowbit(store, "rm", "tiny-llama").returncode == 0
    assert not (store / "tiny-llama.lowbit").exists()
    assert_clean_error(lowbit(store, "rm", "tiny-llama"), "no model 'tiny-llama' in the store")
    assert [r["name"] for r in json.loads(lowbit(store, "list", "--json").stdout)] == [folder.name]


def test_missing_sources_and_version(tmp_path):
    store = tmp_path / "store"
    assert_clean_error(lowbit(store, "generate", tmp_path / "nope.lowbit", "-p", "x"), "no such file")
    assert_clean_error(lowbit(store, "generate", tmp_path / "nope", "-p", "x"), "no such file or directory")
    assert not store.exists() or not list(store.glob("*.lowbit"))
    res = lowbit(store, "--version")
    assert res.returncode == 0 and res.stdout.startswith("lowbit ")
    empty = lowbit(store, "list")
    assert empty.returncode == 0 and "no models in the store" in empty.stdout
