"""Resident memory of the KV cache of sliding-window models at a long context, with and without the window rings:

    python bench/kv_memory.py --ctx 16384

For each model shape (HF config values of Gemma-2-2B, Gemma-3-4B's text model and Mistral-7B-v0.1), the cache the
runtime makes (models/common.py cache_for: a ring of window + 512 positions on each sliding-window layer) and one
with a row per position on every layer are filled position by position to --ctx (every page touched, as a
conversation of that length does), and the process's resident set size is read before and after (VmRSS,
/proc/self/status). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
from functools import partial

import numpy as np

from lowbit.kernels import dispatch
from lowbit.kernels.kv_cache import KVCache
from lowbit.kernels.kv_formats import KVSpec
from lowbit.models import family_for
from lowbit.models.common import cache_for

SHAPES = {
    "gemma2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                      num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                      sliding_window=4096, max_position_embeddings=8192),
    "gemma3-4b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                      num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                      sliding_window=1024, max_position_embeddings=131072),
    "mistral-7b-v0.1": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                            sliding_window=4096, max_position_embeddings=32768),
}


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def filled_rss(make, ctx: int, n_kv: int, head_dim: int) -> tuple[int, int]:
    """(resident bytes the filled cache added, its allocated bytes)."""
    gc.collect()
    before = rss()
    cache = make()
    rng = np.random.default_rng(0)
    chunk = 512
    k = rng.standard_normal((chunk, n_kv, head_dim)).astype(np.float32)
    for start in range(0, ctx, chunk):
        t = min(chunk, ctx - start)
        for li in range(len(cache.k)):
            dispatch.kv_write(cache.layer(li), k[:t], k[:t], start)
    added = rss() - before
    nbytes = cache.nbytes
    del cache
    return added, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--kv", default="16", help="--kv-bits of the caches (default 16)")
    a = ap.parse_args()
    spec = KVSpec.parse(a.kv)
    print(f"KV cache {spec.label}, filled to {a.ctx:,} positions; RSS added by the cache (allocated bytes)")
    print()
    print("| model | window | sliding layers | every layer full | with window rings | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, cfg in SHAPES.items():
        _, family = family_for(cfg["model_type"])
        args = family.args_from_hf(cfg)
        n, nkv, hd = args.num_hidden_layers, args.num_key_value_heads, args.head_dim
        sliding = sum(1 for i in range(n) if args.window(i))
        full, full_b = filled_rss(partial(KVCache, n, nkv, a.ctx, hd, spec), a.ctx, nkv, hd)
        ring, ring_b = filled_rss(partial(cache_for, args, a.ctx, spec), a.ctx, nkv, hd)
        mib = 2**20
        print(f"| {name} | {args.sliding_window:,} | {sliding} of {n} | {full / mib:,.0f} MiB ({full_b / mib:,.0f}) "
              f"| {ring / mib:,.0f} MiB ({ring_b / mib:,.0f}) | {ring / full:.2f} |")


if __name__ == "__main__":
    main()
