"""A conversion killed with SIGKILL (no clean-up runs) leaves neither an output nor a temporary file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from lbtest import SHARED

from lowbit.formats.qtypes import get_qtype
from lowbit.formats.writer import ContainerWriter, TensorPlan, _open_temp, _remove_stale_temps

HALF_WRITTEN = """
import sys, time
import numpy as np
from lowbit.formats.qtypes import get_qtype
from lowbit.formats.writer import ContainerWriter, TensorPlan
plans = [TensorPlan(f"t{i}.weight", get_qtype("f32"), (256, 1024)) for i in range(4)]
w = ContainerWriter(sys.argv[1], {"architecture": {}}, plans, {"tokenizer.json": b"{}"})
w.write_tensor("t0.weight", {"data": np.ones((256, 1024), np.float32)})
print("ready", flush=True)
time.sleep(60)
"""


def _unnamed_temps(folder) -> bool:
    f, unnamed = _open_temp(folder, folder / ".probe")
    f.close()
    (folder / ".probe").unlink(missing_ok=True)
    return unnamed


def _left(folder, out) -> list[str]:
    """What a kill left; without O_TMPFILE (another OS or file system), what is left after the next writer's sweep."""
    if not _unnamed_temps(folder):
        _remove_stale_temps(out)
    return os.listdir(folder)


def test_sigkill_mid_write_leaves_nothing(tmp_path):
    out = tmp_path / "m.lowbit"
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", HALF_WRITTEN, str(out)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _left(tmp_path, out) == []


def test_sigkill_during_lowbit_convert_leaves_nothing(tmp_path):
    """The real command on the real model, re-quantizing (a few seconds of work), killed part-way."""
    gguf = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path / "s.lowbit"
    cmd = [sys.executable, "-m", "lowbit.runtime.cli", "convert", str(gguf), "-o", str(out), "--bits", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = ""
    while "blk.1." not in line:  # tensors are being written
        line = proc.stderr.read(200)
        assert line or proc.poll() is None, "convert ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(0.1)
    assert _left(tmp_path, out) == []


def test_a_later_writer_removes_temporaries_of_dead_processes(tmp_path):
    out = tmp_path / "m.lowbit"
    dead = tmp_path / ".m.lowbit.tmp-999999999"  # no such process
    mine = tmp_path / f".m.lowbit.tmp-{os.getpid()}"
    other = tmp_path / ".other.lowbit.tmp-999999999"
    for p in (dead, mine, other):
        p.write_bytes(b"x")
    _remove_stale_temps(out)
    assert not dead.exists() and mine.exists() and other.exists()
    mine.unlink()
    with ContainerWriter(out, {}, [TensorPlan("a.weight", get_qtype("f32"), (4,))], {}) as w:
        w.write_tensor("a.weight", {"data": __import__("numpy").zeros(4, "float32")})
    assert sorted(os.listdir(tmp_path)) == [".other.lowbit.tmp-999999999", "m.lowbit"]
