"""The quant-type registry: the one place that defines every tensor encoding of the container.

A quantized 2-D tensor ``W[rows, cols]`` is stored as three parts:

- ``codes``  uint8 ``[rows, cols * bits // 8]``: unsigned codes ``u`` in ``[0, 2**bits - 1]``, packed group by group;
- ``scales`` float16 ``[rows, n_groups]``: ``d`` per group;
- ``mins``   float16 ``[rows, n_groups]`` (asymmetric types only): ``m`` per group.

Per-tensor types (``q4_pt``, ``q4a_pt``, ...) store one ``d`` (and ``m``) for the whole matrix: ``scales``/``mins``
are ``[1, 1]`` and the codes are packed as the per-channel type's (a row is one group). The kernels run them as that
per-channel twin with the scale repeated per row (:meth:`lowbit.formats.reader.StoredTensor.per_row`).

Coded-scale types (``q4a_g32s8``, ...; ``scale_bits == 8``) store ``scales`` (and ``mins``) as uint8 codes against a
per-matrix ``grid`` (float32 ``[2]``), see :mod:`lowbit.formats.scale_codes`; codes are packed as their float16 twin's
(``q4a_g32``), which the kernels run with the decoded scales.

Dequantization: ``x = d * u - m``; symmetric types have no stored min and use ``m = d * 2**(bits-1)``,
i.e. ``x = d * (u - 2**(bits-1))``.

Packing inside a group of ``g`` elements is a sequence of *bit planes* (``PLANES[bits]``), low bits first. A plane
of width ``p`` uses ``g * p / 8`` bytes; byte ``j`` holds elements ``j + k * g / n`` (``n = 8 / p``) at bit
``k * p``, so one pass over contiguous bytes with a fixed shift touches contiguous activations. 4-bit: byte j holds
elements j and j + g/2; 3-bit: a 2-bit plane followed by a 1-bit plane.

Adding a bit-width means adding an entry to ``PLANES`` (and to ``QUANT_BITS`` if it should be registered).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.errors import FormatError

# bits -> plane widths, low bits first; each width divides 8
PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}
QUANT_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
PER_CHANNEL = 0  # group_size value meaning "one group per row"
PER_TENSOR = -1  # group_size value meaning "one scale (and min) for the whole matrix", codes packed as per-channel
CODED_SUFFIX = "s8"  # name suffix of the coded-scale types (8-bit scale/min codes, group sizes only)
# coded scales exist up to this bit-width: a scale up to 1.1% off moves a weight by that much of its distance from the
# zero point, small next to half a rounding step at 2-5 bits, not at 6 or 8 (steps 4 and 16 times finer than at 4)
CODED_MAX_BITS = 5

FLOAT_DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": np.dtype(np.uint16)}


@dataclass(frozen=True)
class QType:
    name: str
    id: int
    bits: int
    group_size: int = PER_CHANNEL  # 32/64/128, PER_CHANNEL or PER_TENSOR; meaningless for floats
    asym: bool = False
    is_float: bool = False
    scale_bits: int = 16  # 16: float16 scales/mins; 8: uint8 codes on a per-matrix grid (formats/scale_codes.py)

    def layout_group(self, cols: int) -> int:
        """The number of elements in one group for a row of ``cols`` elements (the packing's group: a per-tensor
        type packs its codes row by row, as per-channel)."""
        return cols if self.group_size in (PER_CHANNEL, PER_TENSOR) else self.group_size

    @property
    def per_tensor(self) -> bool:
        return self.group_size == PER_TENSOR

    @property
    def row_twin(self) -> QType:
        """The per-channel type whose kernels run this per-tensor type (its scale repeated per row)."""
        if not self.per_tensor:
            raise FormatError(f"internal: {self.name} is not a per-tensor type")
        return REGISTRY[self.name.replace("_pt", "_pc")]

    @property
    def coded_scales(self) -> bool:
        return self.scale_bits == 8

    @property
    def f16_twin(self) -> QType:
        """The float16-scale type whose layout and kernels a coded-scale type shares."""
        if not self.coded_scales:
            raise FormatError(f"internal: {self.name} has no coded scales")
        return REGISTRY[self.name[: -len(CODED_SUFFIX)]]

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        """Return why ``shape`` cannot use this type, or None when it can."""
        if self.is_float:
            return None
        if len(shape) != 2:
            return f"{self.name} needs a 2-D tensor, got shape {tuple(shape)}"
        rows, cols = shape
        g = self.layout_group(cols)
        if cols % g:
            return f"{self.name}: {cols} columns are not a multiple of the group size {g}"
        step = max(8 // p for p in PLANES[self.bits])
        if g % step:
            return f"{self.name}: group of {g} elements is not a multiple of {step}"
        return None

    def part_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
        """The stored parts for a tensor of logical ``shape``: name -> (shape, numpy dtype name)."""
        if self.is_float:
            return {"data": (tuple(shape), "uint16" if self.name == "bf16" else FLOAT_DTYPES[self.name].name)}
        why = self.check_shape(shape)
        if why:
            raise FormatError(why)
        rows, cols = shape
        ng = cols // self.layout_group(cols)
        srows = 1 if self.per_tensor else rows
        sdt = "uint8" if self.coded_scales else "float16"
        parts = {"codes": ((rows, cols * self.bits // 8), "uint8"), "scales": ((srows, ng), sdt)}
        if self.asym:
            parts["mins"] = ((srows, ng), sdt)
        if self.coded_scales:
            parts["grid"] = ((2,), "float32")
        return parts

    def nbytes(self, shape: tuple[int, ...]) -> int:
        total = 0
        for pshape, dt in self.part_shapes(shape).values():
            total += int(np.prod(pshape, dtype=np.int64)) * np.dtype(dt).itemsize
        return total

    @property
    def zero_point(self) -> int:
        return 0 if self.asym else 1 << (self.bits - 1)

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1


def _group_code(g: int) -> int:
    return {PER_CHANNEL: 0, 32: 1, 64: 2, 128: 3, PER_TENSOR: 4}[g]


CODED_ID = 5  # added to a group type's id for its coded-scale twin: 1006/1007/1008 + 100 bits (+10 asym)


def _group_name(g: int) -> str:
    return {PER_CHANNEL: "pc", PER_TENSOR: "pt"}.get(g, f"g{g}")


def _build_registry() -> dict[str, QType]:
    reg = {
        "f32": QType("f32", 0, 32, is_float=True),
        "f16": QType("f16", 1, 16, is_float=True),
        "bf16": QType("bf16", 2, 16, is_float=True),
    }
    for bits in QUANT_BITS:
        for asym in (False, True):
            for g in (PER_CHANNEL, *GROUP_SIZES, PER_TENSOR):
                name = f"q{bits}{'a' if asym else ''}_{_group_name(g)}"
                # stable id: never renumber; new kinds get new digits
                qid = 1000 + bits * 100 + (10 if asym else 0) + _group_code(g)
                reg[name] = QType(name, qid, bits, g, asym)
                if g in GROUP_SIZES and bits <= CODED_MAX_BITS:
                    coded = name + CODED_SUFFIX
                    reg[coded] = QType(coded, qid + CODED_ID, bits, g, asym, scale_bits=8)
    return reg


REGISTRY: dict[str, QType] = _build_registry()  # name -> type: names are the key files store (formats/SPEC.md)
if len({q.id for q in REGISTRY.values()}) != len(REGISTRY):
    raise RuntimeError("two quant types share an id")


def get_qtype(name: str) -> QType:
    try:
        return REGISTRY[name]
    except KeyError:
        raise FormatError(f"unknown quant type {name!r}") from None


def quant_type(bits: int, group_size: int, asym: bool, scale_bits: int = 16) -> QType:
    if scale_bits not in (8, 16):
        raise FormatError(f"unsupported scale width {scale_bits}; choose 16 (float16) or 8 (coded)")
    if scale_bits == 8 and group_size not in GROUP_SIZES:
        raise FormatError("8-bit coded scales need a group size (32, 64 or 128), not per-channel or per-tensor scales")
    if scale_bits == 8 and bits > CODED_MAX_BITS:
        raise FormatError(f"8-bit coded scales exist up to {CODED_MAX_BITS} bits, not {bits}")
    if bits not in QUANT_BITS:
        raise FormatError(f"unsupported bit-width {bits}; choose one of {', '.join(map(str, QUANT_BITS))}")
    if group_size not in (PER_CHANNEL, *GROUP_SIZES, PER_TENSOR):
        raise FormatError(f"unsupported group size {group_size}; choose 32, 64, 128, 0 (per-channel) or -1 "
                          "(per-tensor)")
    return REGISTRY[f"q{bits}{'a' if asym else ''}_{_group_name(group_size)}{CODED_SUFFIX if scale_bits == 8 else ''}"]


# ----------------------------------------------------------------------------------------------- packing


def pack_codes(u: np.ndarray, qt: QType) -> np.ndarray:
    """Pack unsigned codes ``u`` (int array ``[rows, cols]``) into the byte layout of ``qt``."""
    rows, cols = u.shape
    g = qt.layout_group(cols)
    ng = cols // g
    u = u.astype(np.uint8).reshape(rows, ng, g)
    planes = []
    shift = 0
    for p in PLANES[qt.bits]:
        n = 8 // p
        part = (u >> shift) & ((1 << p) - 1)  # [rows, ng, g]
        part = part.reshape(rows, ng, n, g // n)
        byte = np.zeros((rows, ng, g // n), dtype=np.uint8)
        for k in range(n):
            byte |= part[:, :, k, :] << (k * p)
        planes.append(byte)
        shift += p
    return np.concatenate(planes, axis=2).reshape(rows, cols * qt.bits // 8)


def unpack_codes(codes: np.ndarray, qt: QType, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: int32 codes ``[rows, cols]``."""
    rows = codes.shape[0]
    g = qt.layout_group(cols)
    ng = cols // g
    c = codes.reshape(rows, ng, g * qt.bits // 8).astype(np.int32)
    u = np.zeros((rows, ng, g), dtype=np.int32)
    shift = 0
    start = 0
    for p in PLANES[qt.bits]:
        n = 8 // p
        nb = g // n
        plane = c[:, :, start : start + nb]
        for k in range(n):
            u[:, :, k * nb : (k + 1) * nb] |= ((plane >> (k * p)) & ((1 << p) - 1)) << shift
        start += nb
        shift += p
    return u.reshape(rows, cols)
