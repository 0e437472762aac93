"""Load time of a container with and without its checksums verified (A/B in one process, interleaved rounds):

    python bench/load_verify.py ~/.cache/lowbit/bench/llama3.2-1b-b4-g64.lowbit --threads 2 --rounds 5

Each round opens the file as the runtime does (read into memory by --threads readers) three ways: --no-verify,
verified (no stamp: every CRC32 checked while reading), and stamped (verified before, as the runtime does from the
second load on). Stamps go to a temporary $LOWBIT_CACHE. Prints the best time of each and the ratios, and which
CRC-32 computed the checksums (formats/checksum.py: ISA-L where installed; --zlib: Python's zlib, to compare).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

if "--zlib" in sys.argv:
    sys.modules["isal"] = None  # ImportError: formats/checksum.py falls back to zlib

from lowbit.formats import checksum
from lowbit.runtime.engine import open_container, verified_stamp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--zlib", action="store_true", help="checksums by Python's zlib instead of ISA-L")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="lowbit-stamps-")
    os.environ["LOWBIT_CACHE"] = tmp
    best = {"no-verify": 1e9, "verified": 1e9, "stamped": 1e9}
    try:
        open_container(a.path, "cpu", a.threads, verify=False)  # page cache warm for every way
        for _ in range(a.rounds):
            for way in best:
                if way == "verified":
                    shutil.rmtree(tmp, ignore_errors=True)
                t0 = time.perf_counter()
                c = open_container(a.path, "cpu", a.threads, verify=way != "no-verify")
                best[way] = min(best[way], time.perf_counter() - t0)
                if way != "no-verify":
                    assert verified_stamp(c).exists()
                c.close()
                del c
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = os.path.getsize(a.path)
    print(f"{a.path}: {size / 1e6:.0f} MB, {a.threads} threads, best of {a.rounds}, CRC-32 by {checksum.BACKEND}")
    for way, t in best.items():
        print(f"  {way:<10} {t * 1e3:7.1f} ms  ({t / best['no-verify']:.2f}x)")


if __name__ == "__main__":
    main()
