"""The measuring child process of `lowbit bench`.

Run as ``python -m lowbit.runtime.measure.bench_worker '<json>'``; prints one JSON object on stdout. A separate
process so that peak RSS is the runtime's alone and so numba's on-disk cache can be cold (empty NUMBA_CACHE_DIR) or
warm.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from lowbit.runtime.measure.membw import mapped_read_bandwidth

PROBE_EVERY = 16  # decode steps between two bandwidth probes


def _peak_rss() -> int:
    """Peak resident set of this process image, in bytes. VmHWM starts afresh at exec; getrusage's ru_maxrss
    would carry over the parent's peak (vfork/exec), so it is only the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Start VmHWM afresh (Linux: "5" to /proc/self/clear_refs), so the next reading is the decode phase's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cache_files() -> int | None:
    """Index and data files in the numba cache this process writes to; None for numba's default cache (files
    beside each module, which a compile may overwrite rather than add to, so a count would say nothing)."""
    d = os.environ.get("NUMBA_CACHE_DIR")
    if not d:
        return None
    if not Path(d).is_dir():
        return 0
    return sum(1 for p in Path(d).rglob("*") if p.suffix in (".nbi", ".nbc"))


def measure(path: str, prompt: int, gen: int, threads: int | None, startup_only: bool, device: str = "cpu",
            exact: bool | None = None, mmap: bool = False, kv: str | None = None) -> dict:
    from lowbit.kernels import compile_ahead
    from lowbit.kernels.dispatch import SMALL_BATCH
    from lowbit.kernels.heap import keep_freed_heap
    from lowbit.kernels.kv_formats import KVSpec
    from lowbit.kernels.timing import KernelTimer
    from lowbit.models import family_for
    from lowbit.runtime.engine import kernel_activations_exact, open_container, set_threads

    probe = np.zeros(4096, dtype=np.uint8)
    probe.flags.writeable = False  # typed like the read-only container bytes it will sum
    mapped_read_bandwidth(probe)  # the probe's own kernel: compiled (or loaded from cache) before counting files
    files0 = _cache_files()
    rss0 = _peak_rss()
    n_threads = set_threads(threads)
    t0 = time.perf_counter()
    container = open_container(path, device, n_threads, mmap)
    arch = container.meta["architecture"]
    _, family = family_for(arch["model_type"])
    args = family.ModelArgs.from_dict(arch["args"])
    ctx = prompt + gen + 1
    if device == "cuda":
        from lowbit.models.device_forward import cuda_model

        model = cuda_model(arch.get("family", arch["model_type"]), family, args, container, ctx)
    else:
        ahead = compile_ahead.start(KVSpec.parse(kv))  # as the engine does: attention compiles beside (cold start)
        keep_freed_heap()  # as the engine does: a pass reuses the pages it frees
        model = family.Model(args, container, ctx)
        model.ops.compile_ahead = ahead
        if kernel_activations_exact(container.meta, exact):
            from lowbit.kernels.act_quant import set_kernel_precision

            set_kernel_precision(model, True)
        model.kv = KVSpec.parse(kv)
    cache = model.new_cache()
    load_s = time.perf_counter() - t0

    # the first token of a reply: the logits after a prompt of `prompt` tokens, as `lowbit run -p` computes them
    # (with a cold cache: the prompt path's kernels compiled first)
    t0 = time.perf_counter()
    model.forward(np.arange(2, 2 + prompt), 0, cache)
    first_token_s = time.perf_counter() - t0
    # warm-up: every other kernel path compiled (cold cache) or loaded from numba's cache (warm): one token, a few
    # tokens, a batch large enough for the prefill path, and one token at a long position
    t0 = time.perf_counter()
    model.forward(np.array([1]), 0, cache)
    model.forward(np.arange(2, 2 + SMALL_BATCH // 2), 1, cache)
    model.forward(np.arange(2, 2 + 2 * SMALL_BATCH), 1 + SMALL_BATCH // 2, cache)
    model.forward(np.array([1]), min(ctx - 1, prompt), cache)  # one token deep in the context (split attention)
    if hasattr(model.ops, "wait_for_fused"):  # the fused decode layers too, which a reply compiles on a helper
        model.ops.wait_for_fused = True  # thread after its 16th token: decode is timed as it runs from then on
        model.forward(np.array([1]), 1, cache)
        model.ops.wait_for_fused = False
    warmup_s = time.perf_counter() - t0
    out = dict(
        threads=n_threads,
        load_seconds=load_s,
        first_token_seconds=first_token_s,
        warmup_seconds=warmup_s,
        rss_before_load=rss0,
        container_bytes=container.size,
        kv_cache_bytes=cache.nbytes,
        kv_cache=cache.spec.label if device == "cpu" else "f32",
        kv_bytes_per_position=cache.nbytes // ctx,
    )
    if not startup_only:
        rng = np.random.default_rng(0)
        tokens = rng.integers(3, args.vocab_size, size=prompt)
        t0 = time.perf_counter()
        logits = model.forward(tokens, 0, cache)
        out["prefill_seconds"] = time.perf_counter() - t0
        tok = int(np.argmax(logits[0]))
        out["peak_rss_prefill"] = _peak_rss()
        if device == "cuda":  # the roofline is the GPU's memory, read before and after decode like the host's
            from lowbit.kernels.cuda.bandwidth import device_read_bandwidth

            out["device_bandwidth_before"] = device_read_bandwidth()
        out["decode_peak_is_own"] = _reset_peak_rss()
        step_times = []
        probes = []  # read bandwidth of the bytes decode reads (container.file_bytes()), probed between blocks of
        # decode steps (untimed)
        file_bytes = container.file_bytes()
        timer = KernelTimer()
        for i in range(gen):
            if device == "cpu" and i % PROBE_EVERY == 0:
                probes.append(mapped_read_bandwidth(file_bytes))
            with timer:
                t0 = time.perf_counter()
                logits = model.forward(np.array([tok]), prompt + i, cache)
                tok = int(np.argmax(logits[0]))
                step_times.append(time.perf_counter() - t0)
        if device == "cpu":
            probes.append(mapped_read_bandwidth(file_bytes))
        out["mapped_bandwidth_probes"] = probes
        out["decode_seconds"] = float(sum(step_times))
        out["decode_step_median"] = float(np.median(step_times))
        out["decode_kernel_seconds"] = timer.seconds
        out["decode_kernel_calls"] = timer.calls
        if device == "cuda":
            out["device_bandwidth_after"] = device_read_bandwidth()
    out["peak_rss"] = _peak_rss()
    files1 = _cache_files()
    out["new_cache_files"] = None if files0 is None or files1 is None else files1 - files0
    return out


def main() -> None:
    req = json.loads(sys.argv[1])
    res = measure(req["path"], req["prompt"], req["gen"], req.get("threads"), req.get("startup_only", False),
                  req.get("device", "cpu"), req.get("exact"), req.get("mmap", False), req.get("kv"))
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
