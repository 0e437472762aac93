"""The configurations `lowbit compare` measures: one item of ``--configs`` -> a :class:`Config` (conversion
options plus the runtime options of its row).

Configuration grammar (``--configs``, comma-separated)::

    METHOD:BITS[:GROUP][:OPTION...]             rtn:4, gptq:4:g64, awq+gptq:3:g128:sym, gptq+lowrank:2:lowrank=0.2
    mixed:TARGET[:METHOD][:GROUP][:OPTION...]   TARGET = 2.5bpw (target_bpw) or 12MB / 1.5GB (max_size)
    f16 | 16                                    the unquantized model as a row of its own

METHOD is the converter's "+"-joined step string; BITS 2|3|4|5|6|8|16; GROUP g32|g64|g128|pc|pt (default g64;
pt: one scale per matrix);
OPTION sym | asym | embed=B | scales=8|16 (``--scale-bits``) | lowrank=X (extra bits per weight for the lowrank
step) | act=dynamic|static (evaluate with int8 activations, ``--act-quant``; static needs the smoothquant step) |
kv=16|32|8|4|k8v4 (evaluate with that KV cache, ``--kv-bits``; f16 takes this option too: ``f16:kv=8`` is what a
quantized cache alone costs). Rows that differ only in runtime options (act, kv) share one conversion.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

from lowbit.convert.converter import FLOAT_BITS, ConvertOptions
from lowbit.errors import LowbitError
from lowbit.formats.qtypes import GROUP_SIZES, PER_CHANNEL, PER_TENSOR, QUANT_BITS
from lowbit.kernels.kv_formats import KVSpec

# The method steps a config may name: the converter's registry when it has one, else the steps it documents.
try:
    from lowbit.convert.methods import METHOD_STEPS  # type: ignore[attr-defined]
except ImportError:
    METHOD_STEPS: tuple[str, ...] = ("rtn", "search", "imatrix", "awq", "gptq", "hadamard", "lowrank")

BITS = (*QUANT_BITS, FLOAT_BITS)
GROUPS = {f"g{g}": g for g in GROUP_SIZES} | {"pc": PER_CHANNEL, "pt": PER_TENSOR}
GROUP_NAMES = {v: k for k, v in GROUPS.items()}
DEFAULT_GROUP = 64
UNQUANTIZED = ("f16", "16")
_TARGET = re.compile(r"^(\d+(?:\.\d+)?)(bpw|kb|mb|gb)$", re.IGNORECASE)
_SIZE_UNITS = {"kb": 1e3, "mb": 1e6, "gb": 1e9}
_OPTION_FIELDS = {"embed": "embed_bits", "lowrank": "lowrank_bpw", "act": "act", "kv": "kv", "scales": "scale_bits"}
ACT_MODES = ("dynamic", "static")
GRAMMAR = "METHOD:BITS[:GROUP][:OPTION...], mixed:TARGET[:METHOD][:GROUP][:OPTION...] or f16"


# ------------------------------------------------------------------------------------------------ configurations
@dataclass(frozen=True)
class Config:
    label: str  # canonical spelling: "gptq:4:g64", "mixed:2.5bpw:search", "f16"
    method: str  # what the table and plot group by: the method string, "mixed" or "f16"
    bits: str  # for the table: "4", "2.5bpw", "12MB", "16"
    group: str  # "g64", "pc", "" for f16
    opts: ConvertOptions
    extras: tuple[str, ...] = ()  # the options the item sets, as the label spells them: "sym", "embed=8"
    act: str = "none"  # the runtime's --act-quant mode for this row
    kv: str = "f16"  # the runtime's --kv-bits for this row (a KVSpec label: kernels/kv_formats.py)

    @property
    def shown_method(self) -> str:
        """The method column: the method, plus the options the config sets."""
        return self.method + (f" ({', '.join(self.extras)})" if self.extras else "")

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label.replace("+", "-").replace(":", "_"))


def parse_configs(spec: str, shared: ConvertOptions | None = None) -> list[Config]:
    """Every item of ``spec`` as a Config whose options start from ``shared`` (calibration settings). All items are
    checked before anything is converted; the first bad one raises a LowbitError naming it."""
    shared = shared or ConvertOptions()
    items = [s.strip() for s in spec.split(",")]
    if not any(items):
        raise LowbitError(f"--configs is empty; give comma-separated items like rtn:4:g64 ({GRAMMAR})")
    out: list[Config] = []
    seen: dict[str, str] = {}
    for item in items:
        if not item:
            raise LowbitError(f"--configs {spec!r} has an empty item (a stray comma?)")
        try:
            cfg = parse_item(item, shared)
            cfg.opts.validate()
        except LowbitError as e:
            raise LowbitError(f"config {item!r}: {e}") from None
        if cfg.label in seen:
            raise LowbitError(f"config {item!r} is the same as {seen[cfg.label]!r} ({cfg.label}); give it once")
        seen[cfg.label] = item
        out.append(cfg)
    return out


def parse_item(item: str, shared: ConvertOptions) -> Config:
    parts = [p.strip() for p in item.split(":")]
    if parts[0].lower() in UNQUANTIZED and all(p.lower().startswith("kv=") for p in parts[1:]):
        _, fields, extras = _parse_options(parts[1:], "rtn")
        return Config(":".join(("f16", *extras)), "f16", "16", "",
                      dataclasses.replace(shared, bits=FLOAT_BITS, method="rtn"), extras, kv=fields.get("kv", "f16"))
    if len(parts) < 2 or not all(parts):
        raise LowbitError(f"expected {GRAMMAR}")
    head, second, rest = parts[0].lower(), parts[1], parts[2:]
    if head == "mixed":
        return _parse_mixed(second, rest, shared)
    method = _parse_method(head)
    try:
        bits = int(second)
    except ValueError:
        bits = None
    if bits not in BITS:
        raise LowbitError(f"bits {second!r}: choose one of {', '.join(map(str, BITS))}")
    if bits == FLOAT_BITS:
        if rest:
            raise LowbitError("16 bits keeps the weights unquantized: no group or options (write f16)")
        return parse_item("f16", shared)
    group, fields, extras = _parse_options(rest, method)
    act, kv = fields.pop("act", "none"), fields.pop("kv", "f16")
    opts = dataclasses.replace(shared, bits=bits, group_size=group, method=method, **fields)
    label = ":".join((method, str(bits), GROUP_NAMES[group], *extras))
    return Config(label, method, str(bits), GROUP_NAMES[group], opts, extras, act, kv)


def _parse_mixed(target: str, rest: list[str], shared: ConvertOptions) -> Config:
    m = _TARGET.match(target)
    if not m:
        raise LowbitError(f"mixed target {target!r}: give bits per weight (2.5bpw) or a size (12MB, 1.5GB)")
    value, unit = float(m.group(1)), m.group(2).lower()
    if value <= 0:
        raise LowbitError(f"mixed target {target!r} must be positive")
    method = shared.method
    if rest and rest[0].lower() not in GROUPS and not _is_option(rest[0]):
        method, rest = _parse_method(rest[0].lower()), rest[1:]
    group, fields, extras = _parse_options(rest, method)
    act, kv = fields.pop("act", "none"), fields.pop("kv", "f16")
    if unit == "bpw":
        fields["target_bpw"], shown = value, f"{value:g}bpw"
    else:
        fields["max_size"], shown = int(value * _SIZE_UNITS[unit]), f"{value:g}{unit.upper()}"
    opts = dataclasses.replace(shared, group_size=group, method=method, **fields)
    # the converter's default method (for a size budget) is left out of the label and the method column
    named = () if method == shared.method else (method,)
    # the allocation picks each tensor's group from its ladder: a group only shows when it was given
    given = tuple(GROUP_NAMES[group] for r in rest[:1] if r.lower() in GROUPS)
    label = ":".join(("mixed", shown, *named, *given, *extras))
    return Config(label, f"mixed({method})" if named else "mixed", shown, given[0] if given else "", opts, extras, act,
                  kv)


def _parse_method(text: str) -> str:
    if text == ConvertOptions.method:  # the converter's default (e.g. "auto") is always a valid name
        return text
    steps = text.split("+")
    for s in steps:
        if s not in METHOD_STEPS:
            raise LowbitError(f"unknown method step {s!r}; choose from {', '.join(METHOD_STEPS)} (joined with +)")
    dup = next((s for s in steps if steps.count(s) > 1), None)
    if dup:
        raise LowbitError(f"method step {dup!r} is given twice")
    return text


def _is_option(text: str) -> bool:
    return text.lower() in ("sym", "asym") or "=" in text


def _parse_options(parts: Sequence[str], method: str) -> tuple[int, dict, tuple[str, ...]]:
    """(group size, ConvertOptions fields, the options as the label spells them) from GROUP and OPTION parts."""
    group: int | None = None
    fields: dict = {}
    for p in parts:
        low = p.lower()
        if low in GROUPS:
            if group is not None:
                raise LowbitError(f"group given twice ({GROUP_NAMES[group]} and {low})")
            group = GROUPS[low]
        elif low in ("sym", "asym"):
            if "asym" in fields:
                raise LowbitError("sym/asym given twice")
            fields["asym"] = low == "asym"
        elif "=" in low:
            key, _, val = low.partition("=")
            if _OPTION_FIELDS.get(key) in fields:
                raise LowbitError(f"option {key}= given twice")
            if key == "embed":
                fields["embed_bits"] = _int_in(val, BITS, "embed")
            elif key == "scales":
                fields["scale_bits"] = _int_in(val, (8, 16), "scales")
            elif key == "lowrank":
                if "lowrank" not in method.split("+"):
                    raise LowbitError(f"lowrank={val} needs the lowrank method step (e.g. gptq+lowrank)")
                fields["lowrank_bpw"] = _positive_float(val, "lowrank")
            elif key == "kv":  # k8v4 spelt without the comma that separates configs
                fields["kv"] = KVSpec.parse(val.replace("v", ",v") if val.startswith("k") else val).label
            elif key == "act":
                if val not in ACT_MODES:
                    raise LowbitError(f"act={val}: choose {' or '.join(ACT_MODES)}")
                if val == "static" and "smoothquant" not in method.split("+"):
                    raise LowbitError("act=static needs the smoothquant method step (e.g. smoothquant+rtn)")
                fields["act"] = val
            else:
                raise LowbitError(f"unknown option {key!r}; options are sym, asym, embed=BITS, scales=8|16, "
                                  "lowrank=BPW, act=dynamic|static, kv=BITS")
        elif low.startswith("g") and low[1:].isdigit():
            raise LowbitError(f"unknown group {p!r}; use {', '.join(GROUPS)}")
        else:
            raise LowbitError(f"unknown group or option {p!r}; groups {', '.join(GROUPS)}, options sym, asym, "
                              "embed=BITS, lowrank=BPW, act=dynamic|static, kv=BITS")
    group = DEFAULT_GROUP if group is None else group
    return group, fields, tuple(_option_labels(fields))


def _option_labels(fields: dict) -> list[str]:
    out = []
    if "asym" in fields:
        out.append("asym" if fields["asym"] else "sym")
    if "embed_bits" in fields:
        out.append(f"embed={fields['embed_bits']}")
    if "scale_bits" in fields:
        out.append(f"scales={fields['scale_bits']}")
    if "lowrank_bpw" in fields:
        out.append(f"lowrank={fields['lowrank_bpw']:g}")
    if "act" in fields:
        out.append(f"act={fields['act']}")
    if "kv" in fields:
        out.append(f"kv={fields['kv'].removeprefix('q').removeprefix('f').replace(',', '')}")
    return out


def _int_in(text: str, allowed: Sequence[int], what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = None
    if v not in allowed:
        raise LowbitError(f"{what}={text}: choose one of {', '.join(map(str, allowed))}")
    return v


def _positive_float(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise LowbitError(f"{what}={text}: expected a positive number")
    return v
