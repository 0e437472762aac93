"""numba's on-disk cache and the kernel factories: two variants of one kernel (packed.prepack for 4-bit groups of 32
and 6-bit groups of 64), each compiled and cached by its own process, then loaded together by a third, give each its
own numbers. Before the variants were named (kernels/cpu.py ``variant``) both cached entries carried the same symbol,
and the third process ran one's code for the other (a server on a model of two types failed with "descr is NULL")."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lowbit.kernels import cpu_quant

pytestmark = pytest.mark.skipif(not cpu_quant.HAS_BYTE_DOT, reason="weights are packed for batches on byte-dot hosts")

RUN = """
import sys
import numpy as np
from lowbit.kernels import packed
from lowbit.kernels.cpu_quant import GEMM_ROWS

def case(bits, g, seed):
    rng = np.random.default_rng(seed)
    rows, cols = 2 * GEMM_ROWS, 2 * g
    codes = rng.integers(0, 256, (rows, cols * bits // 8), dtype=np.uint8)
    scales = rng.integers(0x3000, 0x3C00, (rows, cols // g), dtype=np.uint16)
    mins = rng.integers(0x3000, 0x3C00, (rows, cols // g), dtype=np.uint16)
    for a in (codes, scales, mins):  # as a model's weights are (read-only: the container's memory)
        a.setflags(write=False)
    kernel = packed._prepack(bits, g)
    wb, sc = kernel(codes, scales, mins, True)
    symbols = sorted(cres.fndesc.mangled_name for cres in kernel.overloads.values())
    return wb, sc, np.array(symbols)

out = {}
for name in sys.argv[2].split(","):
    bits, g = (int(v) for v in name.split("_"))
    out[f"wb{name}"], out[f"sc{name}"], out[f"symbols{name}"] = case(bits, g, bits * 100 + g)
np.savez(sys.argv[1], **out)
"""


def _run(tmp_path, cache, out: str, variants: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    path = tmp_path / f"{out}.npz"
    res = subprocess.run([sys.executable, "-c", RUN, str(path), variants], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    with np.load(path) as f:
        return dict(f)


def test_variants_cached_by_different_processes_load_together(tmp_path):
    cache = tmp_path / "numba-cache"
    first = _run(tmp_path, cache, "first", "4_32")  # each process compiles its variant first: the same counter
    second = _run(tmp_path, cache, "second", "6_64")
    # the symbols of the two variants' code differ (they were the same, and a process loading both entries bound
    # one name to two functions: the server failure above, reproduced by hand with that cache)
    assert not set(first["symbols4_32"]) & set(second["symbols6_64"])
    both = _run(tmp_path, cache, "both", "4_32,6_64")  # loads both from the cache
    for name, want in (*first.items(), *second.items()):
        assert np.array_equal(both[name], want), name
