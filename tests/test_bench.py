"""`lowbit bench` and its random-weight containers (the speed numbers themselves are not asserted here)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
from lbtest import TOY_MODEL

from lowbit.convert.converter import ConvertOptions
from lowbit.formats.reader import Container
from lowbit.kernels import dispatch
from lowbit.kernels.timing import KernelTimer
from lowbit.models import family_for
from lowbit.runtime.measure.bench import decode_bytes_per_token, matrix_shapes
from lowbit.runtime.measure.bench_model import SHAPES, build_random_container, tensor_shapes

TINY = dict(
    model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_random_container_has_real_layout_and_runs(tmp_path, bits):
    path = build_random_container(TINY, ConvertOptions(bits=bits, group_size=64), tmp_path / "m.lowbit")
    c = Container(path)
    _, fam = family_for("llama")
    args = fam.ModelArgs.from_dict(c.meta["architecture"]["args"])
    assert {n: tuple(c.tensor(n).shape) for n in c.tensor_names} == tensor_shapes(args)
    assert c.verify() == []
    q = {c.tensor(n).qtype.name for n in c.tensor_names if n.startswith("blk.") and n.endswith("q.weight")}
    assert q == ({"bf16"} if bits == 16 else {f"q{bits}{'a' if bits < 8 else ''}_g64"})
    model = fam.Model(args, c, 64)
    cache = model.new_cache()
    logits = model.forward(np.arange(1, 20), 0, cache)
    assert logits.shape == (1, 512) and np.isfinite(logits).all()
    # activations stay in a sane range through the layers, as in a trained model
    assert 1e-3 < np.abs(logits).max() < 1e3


def test_shapes_match_the_real_models():
    _, fam = family_for("llama")
    n = {k: sum(int(np.prod(s)) for s in tensor_shapes(fam.args_from_hf(cfg)).values()) for k, cfg in SHAPES.items()}
    assert round(n["smollm2-135m"] / 1e6) == 135
    assert round(n["llama3.2-1b"] / 1e9, 2) == 1.24


def test_decode_bytes_count_weights_and_kv(tmp_path):
    path = build_random_container(TINY, ConvertOptions(bits=4), tmp_path / "m.lowbit")
    c = Container(path)
    weights = sum(c.tensor(n).nbytes for n in c.tensor_names)  # tied: the embedding table is the lm_head
    kv = 2 * 2 * 2 * 32 * 4 * 10  # k+v, layers, kv heads, head_dim, f32, positions
    assert decode_bytes_per_token(c, 10) == weights + kv
    assert len(matrix_shapes(c)) == 2 * 7


def test_kernel_timer_counts_dispatched_kernels():
    w = np.random.default_rng(0).standard_normal((4, 8), dtype=np.float32)
    with KernelTimer() as t:
        dispatch.rmsnorm(w, np.ones(8, dtype=np.float32), 1e-5)
        dispatch.silu_mul(w, w)
    assert t.calls == 2 and t.seconds > 0
    dispatch.rmsnorm(w, np.ones(8, dtype=np.float32), 1e-5)
    assert t.calls == 2  # no timer active outside the block


def test_ctrl_c_while_numba_loads_a_kernel_is_a_keyboard_interrupt():
    """numba turns a KeyboardInterrupt raised while it unpickles a cached kernel into a SystemError caused by it:
    kernel_call gives the REPL back the KeyboardInterrupt (the REPL's Ctrl-C test once met this as a traceback)."""
    from lowbit.kernels.timing import kernel_call

    def loading(*_):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise SystemError("<function _numba_unpickle> returned a result with an exception set") from e

    def broken(*_):
        raise SystemError("something else")

    for timer in (None, KernelTimer()):
        with timer or contextlib.nullcontext():
            with pytest.raises(KeyboardInterrupt):
                kernel_call(loading, 1)
            with pytest.raises(SystemError):
                kernel_call(broken)
    assert timer.calls == 2


def test_bench_command_json_on_bundled_model():
    res = subprocess.run(
        [sys.executable, "-m", "lowbit.runtime.cli", "bench", str(TOY_MODEL), "--prompt", "32", "--gen",
         "8", "--no-cold", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)
    assert row["prefill_tokens"] == 32 and row["decode_tokens"] == 8
    for key in ("prefill_tps", "decode_tps", "bandwidth_gbs", "roofline_tps", "load_seconds", "peak_rss_bytes"):
        assert row[key] > 0, key
    assert 0 < row["roofline_fraction"] < 1.5
    assert 0 <= row["outside_kernels_fraction"] < 1
    assert row["warm_start_new_cache_files"] is None  # numba's default cache: not counted, never a false 0


def test_bench_bad_input():
    res = subprocess.run([sys.executable, "-m", "lowbit.runtime.cli", "bench", "--shape", "nope"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("lowbit: error: unknown shape 'nope'")
    assert "Traceback" not in res.stderr


def test_default_threads_are_physical_cores():
    import os

    import numba

    from lowbit.runtime.engine import physical_cores, set_threads

    n = physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    assert set_threads(None) == min(n, numba.config.NUMBA_NUM_THREADS)
