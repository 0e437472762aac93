"""Choosing the compute device: ``cpu``, ``cuda`` (numba-cuda kernels on an NVIDIA GPU) or ``auto``.

Nothing CUDA is imported unless a device other than ``cpu`` is asked for. ``cuda`` without a usable GPU or without
the ``cuda`` extra is one clear LowbitError; ``auto`` falls back to the CPU with a logged notice. With
``NUMBA_ENABLE_CUDASIM=1`` numba's CUDA simulator stands in for the GPU (how the tests run the CUDA path)."""

from __future__ import annotations

import logging

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
INSTALL_HINT = "pip install 'lowbit[cuda]'"


def _one_line(err: object) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _extra_installed() -> bool:
    try:
        import numba_cuda  # noqa: F401  (the NVIDIA-maintained numba.cuda the extra installs)
    except ImportError:
        return False
    return True


def cuda_unavailable_reason() -> str | None:
    """Why ``--device cuda`` cannot run here (one line), or None when it can."""
    try:
        import numba
        from numba import cuda
    except ImportError as e:
        return f"numba.cuda cannot be imported ({_one_line(e)}); install the CUDA extra: {INSTALL_HINT}"
    if numba.config.ENABLE_CUDASIM:
        return None  # the simulator needs no GPU and no toolkit
    if not _extra_installed():
        return f"the CUDA extra is not installed (numba-cuda is missing); install it with {INSTALL_HINT}"
    try:
        if cuda.is_available():
            return None
        detail = cuda.cuda_error()
    except Exception as e:  # noqa: BLE001 - a broken driver or toolkit install surfaces as anything
        detail = e
    return f"no usable NVIDIA GPU was found ({_one_line(detail) if detail else 'no CUDA device'})"


def resolve_device(requested: str | None) -> str:
    """``cpu`` or ``cuda`` for a requested device (None means cpu)."""
    requested = requested or "cpu"
    if requested not in DEVICES:
        raise LowbitError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    why = cuda_unavailable_reason()
    if why is None:
        return "cuda"
    if requested == "cuda":
        raise LowbitError(f"--device cuda: {why}")
    log.warning("--device auto: using the CPU, because %s", why)
    return "cpu"


def is_simulator() -> bool:
    """True when numba's CUDA simulator stands in for the GPU (only meaningful once a CUDA device was resolved)."""
    import numba

    return bool(numba.config.ENABLE_CUDASIM)
