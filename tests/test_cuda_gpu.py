"""On a real NVIDIA GPU (skipped without one): kernels against the numpy reference and the bundled model on the GPU
against the CPU path."""

import numpy as np
import pytest

from lowbit.runtime import device

REASON = device.cuda_unavailable_reason()
pytestmark = pytest.mark.skipif(
    REASON is not None or device.is_simulator(),
    reason=f"no real GPU: {REASON}" if REASON else "NUMBA_ENABLE_CUDASIM=1: the simulator is not a real GPU",
)


@pytest.mark.parametrize("name", ["q4_g64", "q4a_g32", "q3a_g64", "q2_g128", "q5a_pc", "q6_g32", "q8_g64", "f16"])
def test_linear_on_gpu_matches_reference(name):
    from numba import cuda

    from lowbit.formats.qtypes import REGISTRY
    from lowbit.formats.reader import StoredTensor
    from lowbit.kernels import ref
    from lowbit.kernels.cuda import dispatch as cd

    qt = REGISTRY[name]
    rng = np.random.default_rng(qt.id)
    rows, cols = 300, 512
    if qt.is_float:
        parts = {"data": (rng.standard_normal((rows, cols)) * 0.1).astype(np.float16)}
    else:
        from lowbit.formats.qtypes import pack_codes

        g = qt.layout_group(cols)
        parts = {"codes": pack_codes(rng.integers(0, qt.max_code + 1, (rows, cols)), qt),
                 "scales": (rng.standard_normal((rows, cols // g)) * 0.05).astype(np.float16)}
        if qt.asym:
            parts["mins"] = (rng.standard_normal((rows, cols // g)) * 0.1).astype(np.float16)
    w = cd.Weight(StoredTensor("w", qt, (rows, cols), parts))
    for t in (1, 37):
        x = rng.standard_normal((t, cols)).astype(np.float32)
        want = ref.matvec(parts, qt, (rows, cols), x)
        got = cd.linear(w, cuda.to_device(x)).copy_to_host()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_bundled_model_on_gpu_matches_cpu():
    from lowbit.runtime.engine import Engine

    cpu = Engine(ctx=128, device="cpu")
    gpu = Engine(ctx=128, device="cuda")
    ids = cpu.tokenizer.encode("The Python standard library", add_special_tokens=True)
    want, got = cpu.prefill(ids), gpu.prefill(ids)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    tok = int(np.argmax(want))
    np.testing.assert_allclose(gpu.step(tok), cpu.step(tok), rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_device_bandwidth_and_bench_row(tmp_path):
    from types import SimpleNamespace

    from numba import cuda

    from lowbit.kernels.cuda.bandwidth import device_read_bandwidth, device_sum
    from lowbit.runtime.engine import default_model_path
    from lowbit.runtime.measure.bench import bench_one

    a = np.random.default_rng(0).random(100_003).astype(np.float32)
    assert device_sum(cuda.to_device(a)) == pytest.approx(float(a.astype(np.float64).sum()), rel=1e-5)
    assert device_read_bandwidth(gib=0.25, repeats=2) > 1e9
    args = SimpleNamespace(prompt=16, gen=4, threads=1, no_cold=True, device="cuda")
    row = bench_one(default_model_path(), "bundled", args).result
    assert row["device"] == "cuda" and 0 < row["roofline_fraction"] and row["outside_kernels_fraction"] is None
