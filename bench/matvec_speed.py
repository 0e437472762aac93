"""Decode matvec throughput per quant type: the generic plane-loop kernel against the integer kernels in each
activation mode (int16: portable SIMD; split: the same numbers on the byte dot product; int8: the default below
8 bits on CPUs with the byte dot product; kernels/cpu_quant.py).

    python bench/matvec_speed.py [--rows 8192 --cols 2048 --threads 1,2] [--stream MB] [--gemm TOKENS]

Prints G weights/s (best of 30) for one W[rows, cols] @ x, per type and thread count, measured in one run. The
matrix (a few MB) stays in cache, so this is the kernels' compute rate, not memory bandwidth.

With ``--stream MB`` it measures memory-bound decode instead: one pass of the default kernel over distinct copies of
the matrix totalling MB megabytes (codes and scales; best of 3 passes), against a parallel sum over a fresh 1 GiB
array in the same process (lowbit.runtime.measure.membw, the roofline `lowbit bench` uses), per type and thread count.

With ``--gemm TOKENS`` it measures the prompt GEMM instead: x[TOKENS, cols] @ W.T in GFLOP/s (best of 5) for the
byte dot-product kernel (VNNI, or its AVX2 pair below 8 bits) and, where this process may use AMX, the AMX one,
and, with AVX512-BF16, bfloat16 weights on ``vdpbf16ps`` (kernels/cpu_half.py, the activations' rounding included),
against numpy's float32 GEMM of the same shape in the same process.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from lowbit.formats.qtypes import PLANES, quant_type
from lowbit.kernels import cpu
from lowbit.kernels.cpu_quant import HAS_BYTE_DOT, byte_dot_serves, make_kernels
from lowbit.runtime.measure.bench_model import random_parts


def _weights(qt, rows: int, cols: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random codes, scales and mins (a 1×1 placeholder for symmetric types) of W[rows, cols], as the kernels take
    them."""
    p = random_parts(qt, (rows, cols), rng)
    mins = p["mins"].view(np.uint16) if qt.asym else np.zeros((1, 1), dtype=np.uint16)
    return p["codes"], p["scales"].view(np.uint16), mins


def best_seconds(fn, *args, repeats: int = 30) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--stream", type=float, default=None, metavar="MB",
                    help="stream over this many MB of weights instead (memory-bound rate vs read bandwidth)")
    ap.add_argument("--gemm", type=int, default=None, metavar="TOKENS",
                    help="time the prompt GEMM for this many tokens instead (GFLOP/s vs numpy float32)")
    args = ap.parse_args()
    if args.gemm is not None and args.gemm < 1:
        ap.error("--gemm needs a positive number of tokens")
    if args.stream:
        stream(args)
        return
    if args.gemm:
        gemm(args)
        return
    rng = np.random.default_rng(0)
    modes = ["int16", "split", "int8"] if HAS_BYTE_DOT else ["int16"]
    print("| threads | type | generic plane loop | " + " | ".join(f"integer, {m} activations" for m in modes) + " |")
    print("|---|---|---|" + "---|" * len(modes))
    for threads in (int(t) for t in args.threads.split(",")):
        numba.set_num_threads(threads)
        for bits, g in ((4, 32), (4, 64), (4, 128), (8, 64), (3, 64), (2, 64)):
            qt = quant_type(bits, g, bits < 8)
            codes, scales, mins = _weights(qt, args.rows, args.cols, rng)
            x = rng.standard_normal((1, args.cols), dtype=np.float32)
            y = np.empty(args.rows, dtype=np.float32)
            planes = np.array(PLANES[bits], dtype=np.int32)
            zp = np.float32(qt.zero_point)
            n = args.rows * args.cols
            t_generic = best_seconds(cpu.qmatvec, y, codes, scales, mins, x[0], planes, g, bits, qt.asym, zp)
            rates = [n / best_seconds(make_kernels(bits, g, m)[0], y, codes, scales, mins, x, qt.asym) / 1e9
                     if m == "int16" or byte_dot_serves(bits) else None for m in modes]
            print(f"| {threads} | {qt.name} | {n / t_generic / 1e9:.1f} Gw/s | "
                  + " | ".join("—" if r is None else f"{r:.1f} Gw/s" for r in rates) + " |")


def stream(args) -> None:
    from lowbit.runtime.measure.membw import read_bandwidth

    rng = np.random.default_rng(0)
    print("| threads | type | matvec streaming | parallel sum (1 GiB) | ratio |")
    print("|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        numba.set_num_threads(threads)
        for bits in (4, 8, 3, 2):
            qt = quant_type(bits, 64, bits < 8)
            codes, scales, mins = _weights(qt, args.rows, args.cols, rng)
            per = codes.nbytes + scales.nbytes + (mins.nbytes if qt.asym else 0)
            mats = [(codes.copy(), scales.copy(), mins.copy()) for _ in range(max(1, int(args.stream * 1e6 / per)))]
            x = rng.standard_normal((1, args.cols), dtype=np.float32)
            y = np.empty(args.rows, dtype=np.float32)
            rate = len(mats) * per / best_seconds(_one_pass, make_kernels(bits, 64)[0], y, mats, x, qt.asym,
                                                  repeats=3)
            bw = read_bandwidth(1.0, 3)
            print(f"| {threads} | {qt.name} | {rate / 1e9:.1f} GB/s | {bw / 1e9:.1f} GB/s | {rate / bw:.0%} |")
            del mats


def gemm(args) -> None:
    from lowbit.kernels import cpu_half
    from lowbit.kernels.ir.amx import host_has_amx
    from lowbit.kernels.ir.gemm_bf16 import host_has_bf16_dot

    if not HAS_BYTE_DOT:
        raise SystemExit("the integer prompt GEMM needs AVX-512 VNNI, AVX-VNNI or AVX2")
    rng = np.random.default_rng(0)
    kinds = ["vnni"] + (["amx"] if host_has_amx() else [])
    print("| threads | type | " + " | ".join(f"{k} GEMM" for k in kinds) + " | numpy f32 GEMM | best / numpy |")
    print("|---|---|" + "---|" * (len(kinds) + 2))
    t, flops = args.gemm, 2.0 * args.gemm * args.rows * args.cols
    x = rng.standard_normal((t, args.cols), dtype=np.float32)
    wf = rng.standard_normal((args.rows, args.cols), dtype=np.float32)
    y = np.empty((t, args.rows), dtype=np.float32)
    for threads in (int(n) for n in args.threads.split(",")):
        numba.set_num_threads(threads)
        with threadpool_limits(threads, user_api="blas"):
            numpy_rate = flops / best_seconds(np.matmul, x, wf.T, y, repeats=5)
        for bits in (b for b in (4, 8, 3, 2) if byte_dot_serves(b)):
            qt = quant_type(bits, 64, bits < 8)
            codes, scales, mins = _weights(qt, args.rows, args.cols, rng)
            rates = [flops / best_seconds(make_kernels(bits, 64, amx=k == "amx").gemm, y, codes, scales, mins, x,
                                          qt.asym, repeats=5) for k in kinds]
            print(f"| {threads} | {qt.name} | " + " | ".join(f"{r / 1e9:.0f} GFLOP/s" for r in rates)
                  + f" | {numpy_rate / 1e9:.0f} GFLOP/s | {max(rates) / numpy_rate:.2f}x |")
        if host_has_bf16_dot():  # bfloat16 weights on vdpbf16ps, the activations' rounding included
            w16 = (wf.view(np.uint32) >> 16).astype(np.uint16).view(np.uint32)
            prompt = cpu_half.bf16_kernels()[1]
            rate = flops / best_seconds(_bf16_product, prompt, y, w16, x, repeats=5)
            print(f"| {threads} | bf16 (vdpbf16ps) | {rate / 1e9:.0f} GFLOP/s" + " | —" * (len(kinds) - 1)
                  + f" | {numpy_rate / 1e9:.0f} GFLOP/s | {rate / numpy_rate:.2f}x |")


def _bf16_product(prompt, y, w16, x) -> None:
    from lowbit.kernels import cpu_half

    prompt(y, w16, cpu_half.round_pairs(x))


def _one_pass(kernel, y, mats, x, asym) -> None:
    for codes, scales, mins in mats:
        kernel(y, codes, scales, mins, x, asym)


if __name__ == "__main__":
    main()
