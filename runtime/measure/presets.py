"""Named sets of `lowbit compare` configurations.

``seeds``: the twelve approaches the project's seed articles compare — static and dynamic post-training quantization,
quantization-aware training, symmetric, asymmetric, per-tensor, per-channel, group-wise, weight-only,
activation-aware, low-rank, extreme 2-bit — each as the configuration that realises it here, at every bit-width of
``--preset-bits``. A row's method column names the approach; its label keeps the configuration's spelling. Rows that
only make sense at low widths (tuning, low-rank correction) are left out at 8 bits, and the extreme 2-bit row exists
only at 2 bits."""

from __future__ import annotations

import dataclasses

from lowbit.convert.converter import ConvertOptions
from lowbit.errors import LowbitError

# (approach, configuration template, the widths it runs at: None = every one)
SEEDS: tuple[tuple[str, str, tuple[int, ...] | None], ...] = (
    ("per-tensor", "rtn:{b}:pt", None),
    ("per-channel", "rtn:{b}:pc", None),
    ("group-wise", "rtn:{b}:g64", None),
    ("symmetric", "rtn:{b}:g64:sym", None),
    ("asymmetric", "rtn:{b}:g64:asym", None),
    ("weight-only, optimized", "search:{b}:g64", None),
    ("dynamic PTQ (int8 activations)", "rtn:{b}:g64:act=dynamic", None),
    ("static PTQ (int8 activations)", "smoothquant+rtn:{b}:g64:act=static", None),
    ("activation-aware (AWQ)", "awq:{b}:g64", None),
    ("low-rank correction", "gptq+lowrank:{b}:g64:lowrank=0.25", (2, 3, 4)),
    ("quantization-aware tuning", "gptq+tune:{b}:g64", (2, 3, 4)),
    ("extreme 2-bit, optimized group-wise", "gptq:2:g32", (2,)),
)
PRESETS = {"seeds": SEEDS}
DEFAULT_BITS = (8, 4, 3, 2)


def preset_configs(name: str, bits: tuple[int, ...], shared: ConvertOptions) -> list:
    """The configurations of preset ``name`` at ``bits``, each a compare.Config whose method is its approach."""
    from lowbit.runtime.measure.configs import parse_item

    if name not in PRESETS:
        raise LowbitError(f"unknown --preset {name!r}; choose from {', '.join(PRESETS)}")
    out = []
    for b in bits:
        for approach, template, widths in PRESETS[name]:
            if widths is not None and b not in widths:
                continue
            cfg = parse_item(template.format(b=b), shared)
            cfg.opts.validate()
            out.append(dataclasses.replace(cfg, method=approach))
    if not out:
        raise LowbitError(f"--preset {name} has no configuration at {','.join(map(str, bits))} bits")
    if any(c.opts.resolved_method().tune for c in out) and shared.calib is None:
        raise LowbitError(f"--preset {name} has quantization-aware tuning rows, which learn from calibration text: "
                          "give --calib FILE")
    return out


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise LowbitError(f"--preset-bits {text!r}: expected comma-separated bit-widths such as 8,4,3,2") from None
    if not bits or any(b not in (2, 3, 4, 5, 6, 8) for b in bits) or len(set(bits)) != len(bits):
        raise LowbitError(f"--preset-bits {text!r}: each of 2, 3, 4, 5, 6, 8 at most once")
    return bits
