"""Activation quantization as a runtime compute mode (``--act-quant none|dynamic|static``): every linear input is
rounded to int8 before the product.

- ``dynamic``: per token (row), symmetric absmax: ``s = max|x_row| / 127``, ``q = clip(round(x / s), -127, 127)``.
- ``static``: one per-tensor scale ``s`` calibrated at conversion (``<name>.act_scale``, formats/SPEC.md), the same
  rounding; values beyond ``127 s`` are clipped.

The product then consumes ``x̂ = q · s``: exactly the int8 values times their scale, so ``W x̂ = s · (W q)`` equals an
int8-activation integer product up to float accumulation order. This is a **quality-measurement mode**: the kernels
still run in float (or on their own int16 re-quantization of ``x̂``, which represents the int8 values exactly to
within ~1e-5), so it costs a little time rather than saving any; fast integer-activation kernels are the speed
issue's business. The mode belongs to one model instance: :func:`apply` sets ``act_q`` on that model's
:class:`~lowbit.kernels.dispatch.Weight` objects (``None`` off, ``0.0`` dynamic, ``s > 0`` static), and
``dispatch.linear`` checks that one attribute. Rounding is round-half-to-even (``np.rint``) on ``x * (1 / s)``.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from lowbit.errors import LowbitError
from lowbit.kernels.cpu import JIT, PRANGE
from lowbit.kernels.timing import kernel_call

MODES = ("none", "dynamic", "static")
QMAX = 127.0
NO_SCALES = ("this container has no static activation scales; convert with --method smoothquant+... "
             "(e.g. smoothquant+rtn) or use --act-quant dynamic")


@nb.njit(parallel=PRANGE, **JIT)
def fake_quant_rows(out, x, scale):
    """out[T, cols] = clip(rint(x / s), -127, 127) * s per row; x: f32[T, cols]; scale: f32 per-tensor scale, or
    <= 0 for a per-row scale max|x_row| / 127 (a row of zeros stays zero)."""
    t_n, cols = x.shape
    for t in nb.prange(t_n):
        s = scale
        if s <= 0:
            amax = np.float32(0.0)
            for j in range(cols):
                a = abs(x[t, j])
                if a > amax:
                    amax = a
            s = amax / np.float32(QMAX)
        if s <= 0:
            for j in range(cols):
                out[t, j] = 0.0
            continue
        inv = np.float32(1.0) / s
        for j in range(cols):
            q = np.rint(x[t, j] * inv)
            if q > QMAX:
                q = np.float32(QMAX)
            elif q < -QMAX:
                q = np.float32(-QMAX)
            out[t, j] = q * s


def reference(x: np.ndarray, scale: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """numpy specification of :func:`fake_quant_rows`: (int8 codes [T, cols], scales [T]) with x ≈ codes · scale."""
    x = np.asarray(x, dtype=np.float32)
    if scale > 0:
        s = np.full(x.shape[0], scale, dtype=np.float32)
    else:
        s = (np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)) / np.float32(QMAX)
    inv = np.where(s > 0, np.float32(1.0) / np.where(s > 0, s, 1), 0).astype(np.float32)
    q = np.clip(np.rint(x * inv[:, None]), -QMAX, QMAX).astype(np.int8)
    return q, s.astype(np.float32)


def fake_quant(x: np.ndarray, scale: float) -> np.ndarray:
    """x[T, cols] rounded to int8 levels (see :func:`fake_quant_rows`), as float32 ready for the product."""
    xc = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(xc)
    kernel_call(fake_quant_rows, out, xc, np.float32(scale))
    return out


def linear_weights(model) -> list:
    """The weights of ``model`` that multiply activations: every Weight attribute and layer entry except an
    embedding table that is only looked up (a tied one doubles as the lm_head and counts)."""
    from lowbit.kernels.dispatch import Weight

    found: dict[int, Weight] = {}
    head = getattr(model, "lm_head", None)
    for key, v in vars(model).items():
        if isinstance(v, Weight) and (key != "embed" or v is head):
            found[id(v)] = v
    for layer in getattr(model, "layers", []):
        for v in layer.values():
            if isinstance(v, Weight):
                found[id(v)] = v
    return list(found.values())


def check_mode(mode: str | None) -> str:
    mode = "none" if mode is None else str(mode).lower()
    if mode not in MODES:
        raise LowbitError(f"unknown --act-quant {mode!r}; choose from {', '.join(MODES)}")
    return mode


def apply(model, mode: str | None) -> str:
    """Set the activation-quantization mode of every linear of ``model`` (a CPU model). Returns the mode."""
    mode = check_mode(mode)
    weights = linear_weights(model)
    if mode == "static":
        missing = [w.name for w in weights if w.act_scale is None]
        if len(missing) == len(weights):
            raise LowbitError(NO_SCALES)
        if missing:
            raise LowbitError(f"{len(missing)} linears have no static activation scale (first: "
                              f"{missing[0].removesuffix('.weight')}.act_scale); {NO_SCALES.split('; ', 1)[1]}")
    for w in weights:
        w.act_q = None if mode == "none" else np.float32(w.act_scale) if mode == "static" else np.float32(0.0)
    return mode


def set_kernel_precision(model, exact: bool) -> None:
    """``--exact-activations``: every linear of ``model`` (a CPU model) multiplies int16-precision activations
    (relative error ~1e-5, the float product's quality) instead of the default int8 ones below 8 bits
    (kernels/cpu_quant.py), and bfloat16 matrices take float32 prompts instead of bfloat16-rounded ones
    (kernels/cpu_half.py)."""
    from lowbit.kernels import cpu_quant

    for w in linear_weights(model):
        if w.int_kernels is not None:
            w.set_activation_mode(cpu_quant.activation_mode(w.bits, exact))
        w.set_bf16_dot(not exact)
