"""lowbit group types -> GGUF (llama.cpp) blocks: the inverse of convert/gguf_quants.py, for ``lowbit export``.

A lowbit matrix keeps its codes and scales in GGUF whenever a GGUF block type computes the same numbers. GGUF's
legacy types have 32-element blocks with one fp16 scale (and fp16 min), so any lowbit group of 32, 64 or 128
elements (or a whole row whose length is a multiple of 32) becomes blocks that repeat the group's scale; and a code
of fewer bits fits a wider block type with its zero point moved:

==========================  ==========  =======================================================================
lowbit                      GGUF        why the dequantized numbers are the same
==========================  ==========  =======================================================================
q2/q3/q4 (symmetric)        Q4_0        ``d * (u - z)``, ``z = 2**(bits-1)``, is ``d * (q - 8)`` for ``q = u - z + 8``
q2a/q3a/q4a (min)           Q4_1        ``d * u - min`` is ``d * q + m`` for ``q = u``, ``m = -min``
q5 / q5a                    Q5_0 / Q5_1 the same at 5 bits (the fifth bit in ``qh``)
q6 / q8 (symmetric)         Q8_0        ``d * (u - z)`` is ``d * q`` for the signed ``q = u - z``
==========================  ==========  =======================================================================

The 2- and 3-bit types keep their numbers exactly but take the 4-bit block's room (4.5 or 5 bits per weight in the
GGUF). Asymmetric 6- and 8-bit groups have no GGUF block with a min: they are dequantized and re-quantized to Q8_0 by
gguf-py (``exact`` false), as are groups whose size is not a multiple of 32.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats.qtypes import QType, unpack_codes

BLOCK = 32
# (bits, asym) -> the GGUF type that holds those codes exactly
EXACT_TYPE = {
    (2, False): "Q4_0", (3, False): "Q4_0", (4, False): "Q4_0", (5, False): "Q5_0", (6, False): "Q8_0",
    (8, False): "Q8_0", (2, True): "Q4_1", (3, True): "Q4_1", (4, True): "Q4_1", (5, True): "Q5_1",
}  # fmt: skip
REQUANT_TYPE = "Q8_0"  # where no GGUF block holds the codes: re-quantized from the dequantized weights
FLOAT_TYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
# GGUF type -> (bytes per 32-element block, offset of the codes in the block)
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}


def gguf_type(qt: QType, shape: tuple[int, ...]) -> tuple[str, bool]:
    """(GGUF type name, exact?) that a tensor of lowbit type ``qt`` and ``shape`` is exported to."""
    if qt.is_float:
        return FLOAT_TYPE[qt.name], True
    cols = shape[-1]
    if cols % BLOCK:
        raise LowbitError(f"a matrix of {cols} columns has no GGUF block layout (32 elements per block)")
    target = EXACT_TYPE.get((qt.bits, qt.asym))
    if target is None or qt.layout_group(cols) % BLOCK:
        return REQUANT_TYPE, False
    return target, True


def nbytes(kind: str, shape: tuple[int, ...]) -> int:
    n = int(np.prod(shape, dtype=np.int64))
    if kind in ("F16", "BF16"):
        return 2 * n
    if kind == "F32":
        return 4 * n
    return n // BLOCK * BLOCK_BYTES[kind]


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """``[rows, nb]`` values -> ``[rows, nb, 2]`` bytes of their float16."""
    return np.ascontiguousarray(x, dtype=np.float16)[..., None].view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """``[rows, nb, 32]`` 4-bit codes -> ``[rows, nb, 16]`` bytes: low nibble element j, high nibble element j+16."""
    q = q.astype(np.uint8)
    return (q[:, :, :16] & 0x0F) | ((q[:, :, 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """``[rows, nb, 32]`` 5-bit codes -> ``[rows, nb, 4]`` bytes of the little-endian uint32 of their fifth bits."""
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=2, bitorder="little")


def encode(parts: dict[str, np.ndarray], qt: QType, shape: tuple[int, int], kind: str) -> np.ndarray:
    """The GGUF blocks (``uint8 [rows, bytes per row]``) of type ``kind`` holding a lowbit matrix's exact numbers
    (``kind`` is what :func:`gguf_type` named for it, with exact true)."""
    rows, cols = shape
    per = qt.layout_group(cols) // BLOCK  # blocks per lowbit group (a whole row per-channel)
    u = unpack_codes(np.asarray(parts["codes"]), qt, cols).reshape(rows, cols // BLOCK, BLOCK)
    pieces = [_f16_bytes(np.repeat(np.asarray(parts["scales"], dtype=np.float16), per, axis=1))]
    if qt.asym:
        pieces.append(_f16_bytes(-np.repeat(np.asarray(parts["mins"], dtype=np.float16), per, axis=1)))
        q = u
    else:
        q = u - qt.zero_point  # signed, centred codes
    if kind == "Q8_0":
        pieces.append(q.astype(np.int8).view(np.uint8))
    elif kind in ("Q4_0", "Q4_1"):
        pieces.append(_nibbles(q if qt.asym else q + 8))
    elif kind in ("Q5_0", "Q5_1"):
        q = q if qt.asym else q + 16
        pieces += [_high_bits(q), _nibbles(q)]
    else:
        raise LowbitError(f"no exact encoder for GGUF type {kind}")
    return np.concatenate(pieces, axis=2).reshape(rows, -1)


def requantize(w: np.ndarray, kind: str) -> np.ndarray:
    """gguf-py's quantization of float32 rows ``w`` into ``kind`` blocks (``uint8 [rows, bytes per row]``)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return np.asarray(quantize(np.ascontiguousarray(w, dtype=np.float32), GGMLQuantizationType[kind]))
