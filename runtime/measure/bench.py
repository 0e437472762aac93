"""`lowbit bench`: load time, prefill and decode speed, decode as a fraction of the memory-bandwidth roofline
measured in the same run, time outside kernels, peak RSS, cold vs warm start.

Each measurement runs in a child process (runtime/measure/bench_worker.py): once with an empty numba cache (cold start:
everything compiles) and once more with the cache the first one left (warm start: should compile nothing).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.convert.converter import ConvertOptions
from lowbit.errors import LowbitError
from lowbit.formats.reader import Container
from lowbit.kernels.kv_formats import KVSpec
from lowbit.runtime.measure.bench_model import SHAPES, build_random_container
from lowbit.runtime.measure.membw import read_bandwidth

log = logging.getLogger(__name__)

MB = 1e6


def matrix_shapes(c: Container) -> list[tuple[int, int]]:
    """Shapes of the 2-D weights one prefill multiplies by (every layer matrix; not embeddings or lm_head)."""
    return [tuple(c.tensor(n).shape) for n in c.tensor_names if n.startswith("blk.") and n.endswith(".weight")
            and len(c.tensor(n).shape) == 2]


def numpy_gemm_seconds(shapes: list[tuple[int, int]], tokens: int) -> float:
    """Time numpy float32 GEMMs x[tokens, cols] @ W[rows, cols].T take for these shapes (each distinct shape timed
    once, best of 3, multiplied by how often it occurs)."""
    rng = np.random.default_rng(0)
    total = 0.0
    for shape in sorted(set(shapes)):
        rows, cols = shape
        x = rng.standard_normal((tokens, cols), dtype=np.float32)
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        y = np.empty((tokens, rows), dtype=np.float32)
        np.matmul(x, w.T, out=y)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            np.matmul(x, w.T, out=y)
            best = min(best, time.perf_counter() - t0)
        total += best * shapes.count(shape)
    return total


def decode_bytes_per_token(c: Container, kv_positions: float, kv_bytes_per_position: int | None = None) -> float:
    """Bytes one decode step reads: every weight except the embedding table (one row), plus the KV cache
    (``kv_bytes_per_position``: the cache's bytes per position; default float32)."""
    meta = c.meta["architecture"]["args"]
    total = 0
    tied = "output.weight" not in c
    for n in c.tensor_names:
        if n == "token_embd.weight" and not tied:
            continue
        total += c.tensor(n).nbytes
    if kv_bytes_per_position is None:
        kv_bytes_per_position = 2 * meta["num_hidden_layers"] * meta["num_key_value_heads"] * meta["head_dim"] * 4
    return total + kv_bytes_per_position * kv_positions


def run_worker(path: Path, prompt: int, gen: int, threads: int | None, cache_dir: Path | None, startup_only: bool,
               device: str = "cpu", exact: bool | None = None, mmap: bool = False, kv: str | None = None):
    """Measure in a child process; ``cache_dir``: its NUMBA_CACHE_DIR (None: numba's default cache)."""
    req = dict(path=str(path), prompt=prompt, gen=gen, threads=threads, startup_only=startup_only, device=device,
               exact=exact, mmap=mmap, kv=kv)
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit.runtime.measure.bench_worker", json.dumps(req)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise LowbitError(f"benchmark process failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class BenchRow:
    label: str
    qtype: str
    file_bytes: int
    result: dict

    def as_dict(self) -> dict:
        return {"model": self.label, "type": self.qtype, "file_bytes": self.file_bytes, **self.result}


def bench_one(path: Path, label: str, args, kv: str | None = None) -> BenchRow:
    """Measure one container. The read bandwidth is measured just before and just after the measuring process (a
    sum over a fresh 1 GiB array) and, inside it, between every 16 decode steps (a sum over the container's own
    bytes, the memory decode reads: the in-memory copy, or the file mapping with --mmap); the highest reading is
    the roofline (the host's bandwidth drifts between two levels; the highest reading gives the conservative
    fraction)."""
    c = Container(path)
    q = c.meta.get("quantization", {})
    qtype = f"{q.get('bits')}-bit g{q.get('group_size')}" if q else "?"
    if q and q.get("bits") is None:  # a GGUF import: the types it kept
        recipe = q.get("recipe") or {}
        kinds = Counter(v for k, v in recipe.items() if k.startswith("blk.") and v not in ("f32", "f16"))
        qtype = f"{kinds.most_common(1)[0][0] if kinds else '?'} ({q.get('method')})"
    exact = getattr(args, "exact_activations", None)
    if exact is not None:
        qtype += ", exact activations" if exact else ", int8 activations"
    mmap = getattr(args, "mmap", False)
    if mmap:
        qtype += ", mmap"
    device = getattr(args, "device", "cpu")
    if device == "cpu":
        qtype += f", KV {KVSpec.parse(kv).label}"
    shapes = matrix_shapes(c)
    bw_before = read_bandwidth()
    if args.no_cold:  # numba's ordinary cache, whatever state it is in
        cold = None
        warm = run_worker(path, args.prompt, args.gen, args.threads, None, False, device, exact, mmap, kv)
    else:
        with tempfile.TemporaryDirectory(prefix="lowbit-numba-") as cache_dir:
            run = (path, args.prompt, args.gen, args.threads, Path(cache_dir))
            cold = run_worker(*run, True, device, exact, mmap, kv)
            warm = run_worker(*run, False, device, exact, mmap, kv)
    bw_after = read_bandwidth()
    if device == "cuda":  # decode reads the weights from GPU memory: that is the roofline
        bw_before, bw_after = warm["device_bandwidth_before"], warm["device_bandwidth_after"]
    probes = warm.get("mapped_bandwidth_probes") or []
    bw_during = max(probes) if probes else None
    bandwidth = max(bw_before, bw_after, bw_during or 0.0)
    gemm_s = numpy_gemm_seconds(shapes, args.prompt)
    layer_params = sum(r * k for r, k in shapes)
    decode_s = warm["decode_seconds"]
    decode_tps = args.gen / decode_s
    bpt = decode_bytes_per_token(c, args.prompt + args.gen / 2, warm["kv_bytes_per_position"])
    roofline_tps = bandwidth / bpt
    res = dict(
        threads=warm["threads"],
        load_seconds=warm["load_seconds"],
        first_token_cold_seconds=cold["first_token_seconds"] if cold else None,
        warmup_cold_seconds=cold["warmup_seconds"] if cold else None,
        first_token_warm_seconds=warm["first_token_seconds"],
        warmup_warm_seconds=warm["warmup_seconds"],
        warm_start_new_cache_files=warm["new_cache_files"],
        prefill_tokens=args.prompt,
        prefill_tps=args.prompt / warm["prefill_seconds"],
        prefill_gflops=2 * args.prompt * layer_params / warm["prefill_seconds"] / 1e9,
        numpy_gemm_gflops=2 * args.prompt * layer_params / gemm_s / 1e9,
        prefill_vs_numpy_gemm=gemm_s / warm["prefill_seconds"],
        decode_tokens=args.gen,
        decode_tps=decode_tps,
        decode_median_tps=1.0 / warm["decode_step_median"],
        bandwidth_gbs=bandwidth / 1e9,
        bandwidth_before_gbs=bw_before / 1e9,
        bandwidth_after_gbs=bw_after / 1e9,
        bandwidth_during_gbs=None if bw_during is None else bw_during / 1e9,
        decode_bytes_per_token=bpt,
        roofline_tps=roofline_tps,
        roofline_fraction=decode_tps / roofline_tps,
        device=device,
        # host-side kernel timing: meaningless for device kernels, which run asynchronously
        outside_kernels_fraction=None if device == "cuda" else 1 - warm["decode_kernel_seconds"] / decode_s,
        peak_rss_bytes=warm["peak_rss"],  # while decoding when decode_peak_is_own, else over the whole run
        decode_peak_is_own=warm["decode_peak_is_own"],
        peak_rss_prefill_bytes=warm["peak_rss_prefill"],
        rss_limit_bytes=warm["container_bytes"] + warm["kv_cache_bytes"] + 200 * 1024 * 1024,
        kv_cache_bytes=warm["kv_cache_bytes"],
        kv_cache=warm["kv_cache"],
        kv_bytes_per_position=warm["kv_bytes_per_position"],
    )
    return BenchRow(label, qtype, path.stat().st_size, res)


def _targets(args) -> list[tuple[Path, str]]:
    if args.model:
        p = Path(args.model)
        if not p.is_file():
            raise LowbitError(f"{p}: no such file")
        return [(p, p.name)]
    shape = args.shape or "smollm2-135m"
    workdir = Path(args.workdir).expanduser()
    out = []
    for bits in _int_list(args.bits, "--bits"):
        # 8-bit embeddings as before the 6-bit default: the same layout as the figures README compares with
        opts = ConvertOptions(bits=bits, group_size=args.group_size, embed_bits=None if bits == 16 else max(8, bits))
        path = workdir / f"{shape}-b{bits}-g{args.group_size}.lowbit"
        if not path.exists():
            print(f"building random {shape} container at {bits} bits: {path}", file=sys.stderr)
            build_random_container(shape, opts, path)
        out.append((path, shape))
    return out


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise LowbitError(f"{what} must be a comma-separated list of integers, got {text!r}") from None


def cmd_bench(args) -> int:
    if args.shape and args.model:
        raise LowbitError("give either a MODEL file or --shape, not both")
    if args.shape and args.shape not in SHAPES:
        raise LowbitError(f"unknown shape {args.shape!r}; choose one of {', '.join(SHAPES)}")
    if args.prompt < 1 or args.gen < 2:
        raise LowbitError("--prompt must be at least 1 and --gen at least 2")
    from lowbit.runtime.device import is_simulator, resolve_device

    args.device = resolve_device(args.device)
    if args.device == "cuda" and is_simulator():
        raise LowbitError("bench --device cuda needs a real GPU: the CUDA simulator says nothing about speed")
    if args.device == "cuda" and getattr(args, "kv_bits", None):
        raise LowbitError("--kv-bits is a CPU cache format; the cuda backend keeps a float32 cache")
    kvs = [KVSpec.parse(k).label for k in (getattr(args, "kv_bits", None) or [None])]  # bad values fail first
    targets = _targets(args)
    from lowbit.runtime.engine import set_threads

    set_threads(args.threads)
    rows = []
    for path, label in targets:
        for kv in kvs:
            print(f"benchmarking {path.name} (KV cache {kv}) ...", file=sys.stderr)
            rows.append(bench_one(path, label, args, kv))
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        print(format_table(rows, args))
    return 0


def format_table(rows: list[BenchRow], args) -> str:
    r0 = rows[0].result
    lines = [
        f"threads {r0['threads']}, prefill {args.prompt} tokens, decode {args.gen} tokens; read bandwidth: parallel "
        f"sum over 1 GiB {'of GPU memory ' if r0.get('device') == 'cuda' else ''}just before and after each row's "
        "measurement, and over the model's bytes decode reads (in memory, or the file mapping with --mmap) between "
        "every 16 decode steps (during); the roofline uses the highest reading",
        "",
        "| model | type | file | load | first token cold / warm | prefill tok/s | prefill vs numpy f32 GEMM "
        "| decode tok/s | bandwidth before / during / after | % of roofline | outside kernels "
        "| peak RSS decoding (limit) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.result
        cold = f"{r['first_token_cold_seconds']:.2f} s" if r["first_token_cold_seconds"] is not None else "—"
        during = "—" if r.get("bandwidth_during_gbs") is None else f"{r['bandwidth_during_gbs']:.0f}"
        lines.append(
            f"| {row.label} | {row.qtype} | {row.file_bytes / MB:.0f} MB | {r['load_seconds']:.2f} s "
            f"| {cold} / {r['first_token_warm_seconds']:.2f} s | {r['prefill_tps']:.1f} "
            f"| {r['prefill_vs_numpy_gemm']:.2f}x ({r['prefill_gflops']:.0f} vs {r['numpy_gemm_gflops']:.0f} GFLOP/s) "
            f"| {r['decode_tps']:.1f} "
            f"| {r['bandwidth_before_gbs']:.0f} / {during} / {r['bandwidth_after_gbs']:.0f} GB/s "
            f"| {r['roofline_fraction']:.0%} of {r['roofline_tps']:.1f} "
            f"| {'n/a' if r['outside_kernels_fraction'] is None else format(r['outside_kernels_fraction'], '.1%')} "
            f"| {r['peak_rss_bytes'] / MB:.0f} MB ({r['rss_limit_bytes'] / MB:.0f} MB) |"
        )
    warm_files = [row.result["warm_start_new_cache_files"] for row in rows]
    lines.append("")
    if any(f is None for f in warm_files):  # --no-cold: numba's default cache, where files are not counted
        lines.append("numba cache files written: not counted (--no-cold runs on numba's default cache)")
    else:
        files = ", ".join(map(str, warm_files))
        lines.append(f"numba cache files written by the warm start: {files} (0 = compiled nothing)")
    return "\n".join(lines)
