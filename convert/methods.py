"""Quantization methods as composable steps: the one place that names them.

A method string joins steps with "+", e.g. ``search``, ``gptq``, ``awq+gptq``, ``hadamard+gptq+lowrank``. Steps run in
a fixed order whatever the order written: first at most one transform of the weight's input space (``hadamard``,
``awq`` or ``smoothquant``), then exactly one rounding step (``rtn``, ``search``, ``imatrix`` or ``gptq``; ``search``
when none is named), then ``lowrank`` on the remaining error, then ``tune`` (quantization-aware tuning of the
written file, convert/tune.py). Every step but ``rtn`` and ``search`` needs calibration activations; ``tune`` needs
a calibration text file.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError

ROUNDING = ("rtn", "search", "imatrix", "gptq")
TRANSFORMS = ("hadamard", "awq", "smoothquant")
CORRECTIONS = ("lowrank",)
FINISHING = ("tune",)
METHOD_STEPS = (*TRANSFORMS, *ROUNDING, *CORRECTIONS, *FINISHING)
CALIBRATED = ("imatrix", "gptq", "awq", "hadamard", "smoothquant", "lowrank", "tune")
DESCRIPTIONS = {
    "rtn": "round to nearest from the group's range",
    "search": "weighted least-squares scale/min search (k-quants style), no data needed",
    "imatrix": "the search, weighted by each input channel's mean squared activation on calibration text",
    "gptq": "GPTQ: Hessian-based column-by-column error feedback (act-order, static groups)",
    "awq": "activation-aware per-input-channel scaling folded into the previous norm/linear, plus clipping",
    "hadamard": "random-sign block Hadamard rotation of input channels (inverse applied at run time)",
    "smoothquant": "SmoothQuant: activation outliers migrated into the weights (s = max|x|^0.5 / max|w|^0.5, folded "
    "into the previous norm/linear), plus static int8 activation scales for --act-quant static",
    "lowrank": "rank-r correction of the quantization error stored as two fp16 factors",
    "tune": "quantization-aware tuning of the converted file: each block's scales and mins learned by distillation "
    "against the float model on the calibration text (lowbit tune; needs PyTorch, lowbit[tune])",
}


@dataclass(frozen=True)
class Method:
    rounding: str
    hadamard: bool = False
    awq: bool = False
    smoothquant: bool = False
    lowrank: bool = False
    tune: bool = False

    @property
    def calibrated(self) -> bool:
        return (self.rounding in CALIBRATED or self.hadamard or self.awq or self.smoothquant or self.lowrank
                or self.tune)

    @property
    def name(self) -> str:
        transforms = (("hadamard", self.hadamard), ("awq", self.awq), ("smoothquant", self.smoothquant))
        steps = [s for s, on in transforms if on]
        steps.append(self.rounding)
        if self.lowrank:
            steps.append("lowrank")
        if self.tune:
            steps.append("tune")
        return "+".join(steps)


def parse_method(text: str) -> Method:
    """Parse ``a+b+c`` into a :class:`Method`; LowbitError naming the problem otherwise."""
    steps = [s.strip().lower() for s in str(text).split("+")]
    if not text or any(not s for s in steps):
        raise LowbitError(f"bad --method {text!r}: expected steps joined by '+', e.g. 'gptq' or 'awq+gptq'")
    unknown = [s for s in steps if s not in METHOD_STEPS]
    if unknown:
        raise LowbitError(f"unknown method step {unknown[0]!r}; choose from {', '.join(METHOD_STEPS)}")
    if len(set(steps)) != len(steps):
        raise LowbitError(f"bad --method {text!r}: a step is repeated")
    rounding = [s for s in steps if s in ROUNDING]
    if len(rounding) > 1:
        raise LowbitError(f"bad --method {text!r}: choose one of {', '.join(ROUNDING)}, not {' and '.join(rounding)}")
    if "hadamard" in steps and "awq" in steps:
        raise LowbitError("hadamard and awq both rescale the input channels; use one of them")
    for other in ("awq", "hadamard"):
        if "smoothquant" in steps and other in steps:
            raise LowbitError(f"smoothquant and {other} both rescale the input channels; use one of them")
    return Method(
        rounding=rounding[0] if rounding else "search",
        hadamard="hadamard" in steps,
        awq="awq" in steps,
        smoothquant="smoothquant" in steps,
        lowrank="lowrank" in steps,
        tune="tune" in steps,
    )
