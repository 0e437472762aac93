"""Decode speed with each KV cache format at a long context, A/B in one process (DESIGN's measurement convention):

    python bench/kv_speed.py --shape llama3.2-1b --context 2048 --kv 32 16 8 4 --steps 48

One random-weight model of --shape (the bench workdir's container, built once); one cache per format, each filled
with the same --context prompt positions; then decode steps interleaved round-robin over the formats (format A's
step, B's, C's, A's, ...), so the host's drifting bandwidth and neighbours hit every format alike. Prints the
median step time, tokens/s and the ratio to the first format, plus each cache's bytes. Also times prompt passes
(--prefill tokens at position --context, interleaved the same way).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from lowbit.convert.converter import ConvertOptions
from lowbit.kernels.kv_formats import KVSpec
from lowbit.models import family_for
from lowbit.runtime.engine import open_container, set_threads
from lowbit.runtime.measure.bench_model import build_random_container


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--context", type=int, default=2048, help="cached positions before the timed steps")
    ap.add_argument("--kv", nargs="+", default=["32", "16", "8"], help="--kv-bits values; the first is the base")
    ap.add_argument("--steps", type=int, default=48, help="decode steps per format")
    ap.add_argument("--prefill", type=int, default=256, help="tokens of the timed prompt passes (0: none)")
    ap.add_argument("--rounds", type=int, default=3, help="prompt passes per format")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default="~/.cache/lowbit/bench")
    a = ap.parse_args()

    threads = set_threads(a.threads)
    work = Path(a.workdir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{a.shape}-b{a.bits}-g64.lowbit"  # the name lowbit bench gives it
    if not path.exists():
        build_random_container(a.shape, ConvertOptions(bits=a.bits, group_size=64, embed_bits=8), path)
    c = open_container(path, "cpu", threads, False)
    arch = c.meta["architecture"]
    _, family = family_for(arch["model_type"])
    args = family.ModelArgs.from_dict(arch["args"])
    ctx = a.context + a.steps + a.prefill + 8
    model = family.Model(args, c, ctx)
    specs = [KVSpec.parse(k) for k in a.kv]
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, args.vocab_size, size=a.context)
    caches = []
    for s in specs:
        model.kv = s
        cache = model.new_cache()
        for i in range(0, a.context, 512):
            model.forward(prompt[i : i + 512], i, cache)
        model.forward(np.array([1]), a.context, cache)  # compiles this format's decode kernels
        caches.append(cache)
    times: list[list[float]] = [[] for _ in specs]
    for step in range(a.steps):
        for j, cache in enumerate(caches):
            t0 = time.perf_counter()
            model.forward(np.array([2 + step]), a.context + 1 + step, cache)
            times[j].append(time.perf_counter() - t0)
    ptimes: list[list[float]] = [[] for _ in specs]
    if a.prefill:
        chunk = rng.integers(3, args.vocab_size, size=a.prefill)
        for _ in range(a.rounds + 1):  # the first round compiles and is dropped
            for j, cache in enumerate(caches):
                t0 = time.perf_counter()
                model.forward(chunk, a.context, cache)
                ptimes[j].append(time.perf_counter() - t0)
    base = statistics.median(times[0])
    pbase = min(ptimes[0][1:]) if a.prefill else 0.0
    print(f"{a.shape} {a.bits}-bit g64, {threads} threads; decode at {a.context} cached positions, {a.steps} steps "
          f"per format interleaved; prompt passes of {a.prefill} tokens at position {a.context}, best of {a.rounds}")
    print()
    print("| KV cache | bytes/position | decode step (median) | decode tok/s | vs first | prompt tok/s | vs first |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s, cache, t, p in zip(specs, caches, times, ptimes):
        med = statistics.median(t)
        per = cache.nbytes // cache.ctx
        prompt_cols = (f"{a.prefill / min(p[1:]):.1f} | {pbase / min(p[1:]):.2f}x" if a.prefill else "— | —")
        print(f"| {s.label} | {per:,} | {med * 1e3:.2f} ms | {1 / med:.1f} | {base / med:.2f}x | {prompt_cols} |")


if __name__ == "__main__":
    main()
