"""The CUDA path: the simulator suite (tests/cuda_sim) in a child process, and the device-selection error paths."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lbtest import assert_clean_error, run_cli

from lowbit.errors import LowbitError
from lowbit.runtime import device

SIM_TESTS = Path(__file__).parent / "cuda_sim"


def gpu_present() -> bool:
    return device.cuda_unavailable_reason() is None


def test_kernels_and_model_in_the_cuda_simulator():
    """Every CUDA kernel against the numpy reference for every quant type, and tiny models on the device against the
    CPU path, in numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1 must be set before numba.cuda is imported, hence a
    child process)."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "NUMBA_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(SIM_TESTS)],
        capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[1],
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1], res.stdout[-2000:]


def test_cpu_never_touches_cuda():
    assert device.resolve_device("cpu") == "cpu"
    assert device.resolve_device(None) == "cpu"


def test_unknown_device():
    with pytest.raises(LowbitError, match="unknown device 'tpu'; choose one of auto, cpu, cuda"):
        device.resolve_device("tpu")


def test_cuda_without_the_extra(monkeypatch, caplog):
    monkeypatch.setattr(device, "_extra_installed", lambda: False)
    with pytest.raises(LowbitError) as e:
        device.resolve_device("cuda")
    msg = str(e.value)
    assert "\n" not in msg
    assert "CUDA extra is not installed" in msg and "pip install 'lowbit[cuda]'" in msg
    with caplog.at_level(logging.WARNING, logger="lowbit.runtime.device"):
        assert device.resolve_device("auto") == "cpu"
    assert "using the CPU, because the CUDA extra is not installed" in caplog.text


def test_cuda_when_numba_cuda_cannot_be_imported(monkeypatch):
    import numba

    monkeypatch.setitem(sys.modules, "numba.cuda", None)
    monkeypatch.delattr(numba, "cuda", raising=False)
    with pytest.raises(LowbitError, match=r"numba\.cuda cannot be imported .*pip install 'lowbit\[cuda\]'"):
        device.resolve_device("cuda")


def test_cuda_without_a_gpu(monkeypatch, caplog):
    from numba import cuda

    monkeypatch.setattr(device, "_extra_installed", lambda: True)
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    monkeypatch.setattr(cuda, "cuda_error", lambda: RuntimeError("Error at driver init:\n\nCUDA driver library "
                                                                 "cannot be found."))
    with pytest.raises(LowbitError) as e:
        device.resolve_device("cuda")
    assert str(e.value) == ("--device cuda: no usable NVIDIA GPU was found (Error at driver init: CUDA driver library "
                            "cannot be found.)")
    with caplog.at_level(logging.WARNING, logger="lowbit.runtime.device"):
        assert device.resolve_device("auto") == "cpu"
    assert "no usable NVIDIA GPU" in caplog.text


@pytest.mark.skipif(gpu_present(), reason="a usable GPU is present: the no-GPU error cannot happen here")
def test_cli_device_cuda_without_gpu_is_one_clear_line():
    env_sim = os.environ.get("NUMBA_ENABLE_CUDASIM")
    if env_sim == "1":
        pytest.skip("NUMBA_ENABLE_CUDASIM=1 in the environment: the simulator stands in for a GPU")
    assert_clean_error(run_cli("generate", "--device", "cuda", "-p", "hi", "-n", "1"), "--device cuda:")


@pytest.mark.skipif(gpu_present(), reason="a usable GPU is present: auto picks it")
def test_cli_device_auto_falls_back_to_cpu_with_a_notice():
    res = run_cli("generate", "--device", "auto", "-p", "hi", "-n", "2", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert "--device auto: using the CPU, because" in res.stderr
    assert "decode:" in res.stderr


@pytest.mark.skipif(gpu_present(), reason="a usable GPU is present: the no-GPU error cannot happen here")
def test_bench_device_cuda_without_gpu_is_one_clear_line():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("NUMBA_ENABLE_CUDASIM=1 in the environment: the simulator stands in for a GPU")
    assert_clean_error(run_cli("bench", "--device", "cuda", "--no-cold"), "--device cuda:")


def test_bench_refuses_the_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "lowbit.runtime.cli", "bench", "--device", "cuda", "--no-cold"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert_clean_error(res, "needs a real GPU")
