"""The helper process that compiles the attention kernels on a cold start (kernels/compile_ahead.py)."""

from __future__ import annotations

import time

import numpy as np

from lowbit.kernels import compile_ahead, cpu_attention, cpu_attention_prompt, dispatch
from lowbit.kernels.kv_formats import KVSpec


def test_helper_fills_an_empty_numba_cache_and_reports_each_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))  # the helper starts cold, whatever this process holds
    spec = KVSpec.parse("k8,v4")
    ahead = compile_ahead.CompileAhead(spec)
    ahead.wait("attention_prompt")
    assert ahead._done["attention_prompt"].is_set()
    ahead.wait("attention_decode")
    assert ahead.finished and ahead._proc.wait(60) == 0
    written = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert any(n.startswith("cpu_attention_prompt.") and "attention_prompt-" in n for n in written), written
    assert any(n.startswith("cpu_attention.attention-") and n.endswith(".nbi") for n in written), written
    assert any(n.startswith("cpu_attention.attention_decode-") for n in written), written


def test_cached_kernels_start_no_helper_and_match_the_runtime_call():
    spec = KVSpec.parse("16")
    layer = tuple(np.zeros(s, dtype=d) for s, d in (((2, 16, 32), np.uint16), ((2, 16, 0), np.uint16)) * 2)
    q = np.random.default_rng(0).standard_normal((3, 4, 32)).astype(np.float32)
    dispatch.attention(q, layer, 0, 0.125)  # a prompt: compiled (or loaded) here, so in numba's cache
    dispatch.attention(q[:1], layer, 0, 0.125)  # a decode step
    assert compile_ahead.cached(spec)
    assert compile_ahead.start(spec) is None
    # the helper's arguments have the runtime calls' types: the same cache entries
    for name, kernel in (
        ("attention_prompt", cpu_attention_prompt.kernels()[0]),
        ("attention", cpu_attention.attention),
    ):
        sig = tuple(kernel.typeof_pyval(a) for a in compile_ahead._arguments(spec, name))
        assert sig in kernel.overloads, name


def test_a_helper_that_dies_ends_the_wait(monkeypatch):
    monkeypatch.setattr(compile_ahead.sys, "executable", "false")  # exits at once, reporting nothing
    ahead = compile_ahead.CompileAhead(KVSpec.parse("16"))
    t0 = time.perf_counter()
    ahead.wait("attention")
    assert time.perf_counter() - t0 < 30 and ahead.finished
