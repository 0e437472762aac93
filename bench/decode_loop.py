"""Decode steps of one container in this process, with no bench machinery around them: ms per token after a prompt,
and with --profile the Python call counts (kernel calls are the ``kernel_call`` rows); --batch N steps N sequences
at once, as the server's continuous batching does (ms per step and per token). For A/B runs of two installs:

    PYTHONPATH=/tmp/base python bench/decode_loop.py m.lowbit --prompt 256 --steps 64
    PYTHONPATH=/tmp/head python bench/decode_loop.py m.lowbit --prompt 256 --steps 64
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np

from lowbit.formats.reader import Container
from lowbit.models import family_for
from lowbit.models.common import Segments


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a .lowbit file (e.g. ~/.cache/lowbit/bench/smollm2-135m-b4-g64.lowbit)")
    ap.add_argument("--prompt", type=int, default=32, help="tokens before the timed steps (default 32)")
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps (default 100)")
    ap.add_argument("--batch", type=int, default=1, help="sequences stepped together (default 1)")
    ap.add_argument("--pack", action="store_true", help="unpack the matrices for batches first, as the server does")
    ap.add_argument("--profile", action="store_true", help="profile another --steps steps and print the top rows")
    a = ap.parse_args()
    c = Container(a.model)
    arch = c.meta["architecture"]
    _, family = family_for(arch["model_type"])
    model = family.Model(family.ModelArgs.from_dict(arch["args"]), c, a.prompt + 2 * a.steps + 24)
    if a.pack:
        model.pack_for_batches()
    caches = [model.new_cache() for _ in range(a.batch)]
    for cache in caches:
        model.forward(np.arange(2, 2 + a.prompt), 0, cache)
    pos = a.prompt

    def step():
        nonlocal pos
        if a.batch == 1:
            model.forward(np.array([5]), pos, caches[0])
        else:
            model.forward(np.full(a.batch, 5), None, Segments(caches, [pos] * a.batch, [1] * a.batch))
        pos += 1

    for _ in range(20):  # warm-up (kernels compiled or loaded from numba's cache)
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    ms = (time.perf_counter() - t0) / a.steps * 1e3
    print(f"batch {a.batch}: ms/step {ms:.3f}, ms/token {ms / a.batch:.3f}")
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.steps):
            step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
