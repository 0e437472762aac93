"""GGUF (llama.cpp) quantized blocks -> lowbit group types, without re-rounding.

Each decoder takes the raw blocks of a matrix (``uint8 [rows, bytes per row]``, as ``gguf.GGUFReader`` maps them)
and returns lowbit's stored parts (``codes``, ``scales``, ``mins``; formats/qtypes.py) for the type it names:

==========  ===========================  =================================================================
GGUF type   lowbit type                  dequantization, and why it is the same number
==========  ===========================  =================================================================
Q4_0        q4_g32  (symmetric)          ``d * (q - 8)``: lowbit's zero point is 8 at 4 bits
Q4_1        q4a_g32 (min)                ``d * q + m``: lowbit stores ``-m`` (``x = d * u - min``)
Q5_0        q5_g32                       ``d * (q - 16)``, the fifth bit moved from ``qh`` into lowbit's 1-bit plane
Q5_1        q5a_g32                      ``d * q + m``
Q8_0        q8_g32                       ``d * q`` with signed ``q``: ``u = q + 128``, zero point 128
Q4_K        q4a_g32                      ``d * sc_j * q - dmin * m_j`` per 32-element sub-block: the products
Q5_K        q5a_g32                      ``d * sc_j`` and ``dmin * m_j`` are rounded to float16 (``fp16`` rows)
==========  ===========================  =================================================================

The first five are bit-exact: lowbit's float32 dequantization of the result equals gguf-py's, element for element
(fp16 times a small integer is exact in float32). The k-quants carry their 6-bit sub-block scales to fp16 precision.
Every other GGUF type is dequantized by gguf-py and re-quantized (convert/gguf_source.py).
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.qtypes import QType, get_qtype, pack_codes

BLOCK = 32  # elements per block of the legacy types, and per sub-block of Q4_K/Q5_K
SUPER = 256  # elements per k-quant super-block


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    """The float16 stored at byte ``at`` of every block: ``raw`` is ``[rows, n_blocks, block bytes]``."""
    return np.ascontiguousarray(raw[:, :, at : at + 2]).view(np.float16)[:, :, 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[rows, nb, 16]`` bytes -> ``[rows, nb, 32]`` codes: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.int32)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """``[rows, nb, 4]`` bytes of a little-endian uint32 -> ``[rows, nb, 32]`` bits (bit j = element j)."""
    return np.unpackbits(qh, axis=2, bitorder="little").astype(np.int32)


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    rows = raw.shape[0]
    return np.asarray(raw, dtype=np.uint8).reshape(rows, -1, block_bytes)


def _parts(u: np.ndarray, d: np.ndarray, m: np.ndarray | None, qt: QType) -> dict[str, np.ndarray]:
    rows = u.shape[0]
    parts = {"codes": pack_codes(u.reshape(rows, -1), qt), "scales": np.ascontiguousarray(d, dtype=np.float16)}
    if m is not None:
        parts["mins"] = np.ascontiguousarray(m, dtype=np.float16)
    return parts


def q4_0(raw: np.ndarray) -> tuple[QType, dict[str, np.ndarray]]:
    b = _blocks(raw, 18)
    qt = get_qtype("q4_g32")
    return qt, _parts(_nibbles(b[:, :, 2:18]), _f16(b, 0), None, qt)


def q4_1(raw: np.ndarray) -> tuple[QType, dict[str, np.ndarray]]:
    b = _blocks(raw, 20)
    qt = get_qtype("q4a_g32")
    return qt, _parts(_nibbles(b[:, :, 4:20]), _f16(b, 0), -_f16(b, 2), qt)


def q5_0(raw: np.ndarray) -> tuple[QType, dict[str, np.ndarray]]:
    b = _blocks(raw, 22)
    qt = get_qtype("q5_g32")
    u = _nibbles(b[:, :, 6:22]) | (_high_bits(b[:, :, 2:6]) << 4)
    return qt, _parts(u, _f16(b, 0), None, qt)


def q5_1(raw: np.ndarray) -> tuple[QType, dict[str, np.ndarray]]:
    b = _blocks(raw, 24)
    qt = get_qtype("q5a_g32")
    u = _nibbles(b[:, :, 8:24]) | (_high_bits(b[:, :, 4:8]) << 4)
    return qt, _parts(u, _f16(b, 0), -_f16(b, 2), qt)


def q8_0(raw: np.ndarray) -> tuple[QType, dict[str, np.ndarray]]:
    b = _blocks(raw, 34)
    qt = get_qtype("q8_g32")
    u = b[:, :, 2:34].view(np.int8).astype(np.int32) + 128
    return qt, _parts(u, _f16(b, 0), None, qt)


def _k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of a Q4_K/Q5_K super-block -> (scales, mins) ``[rows, nb, 8]`` 6-bit ints."""
    sc = sc.astype(np.int32)
    lo_s, lo_m = sc[:, :, 0:4] & 63, sc[:, :, 4:8] & 63
    hi_s = (sc[:, :, 8:12] & 0x0F) | ((sc[:, :, 0:4] >> 6) << 4)
    hi_m = (sc[:, :, 8:12] >> 4) | ((sc[:, :, 4:8] >> 6) << 4)
    return np.concatenate([lo_s, hi_s], axis=2), np.concatenate([lo_m, hi_m], axis=2)


def _k_codes(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K low nibbles ``[rows, nb, 128]`` -> codes ``[rows, nb, 8, 32]``: each 32-byte chunk holds two
    sub-blocks (low nibbles the first, high nibbles the second)."""
    rows, nb = qs.shape[:2]
    c = qs.reshape(rows, nb, 4, 1, 32)
    return np.concatenate([c & 0x0F, c >> 4], axis=3).astype(np.int32).reshape(rows, nb, 8, 32)


def _k_parts(u, d, dmin, scales, mins, qt):
    rows = u.shape[0]
    ds = (d.astype(np.float32)[:, :, None] * scales).reshape(rows, -1)
    ms = (dmin.astype(np.float32)[:, :, None] * mins).reshape(rows, -1)
    return qt, _parts(u.reshape(rows, -1), ds, ms, qt)


def q4_k(raw: np.ndarray) -> tuple[QType, dict[str, np.ndarray]]:
    b = _blocks(raw, 144)
    scales, mins = _k_scales(b[:, :, 4:16])
    return _k_parts(_k_codes(b[:, :, 16:144]), _f16(b, 0), _f16(b, 2), scales, mins, get_qtype("q4a_g32"))


def q5_k(raw: np.ndarray) -> tuple[QType, dict[str, np.ndarray]]:
    b = _blocks(raw, 176)
    scales, mins = _k_scales(b[:, :, 4:16])
    u = _k_codes(b[:, :, 48:176])
    bits = np.unpackbits(b[:, :, 16:48], axis=2, bitorder="little").reshape(*b.shape[:2], 32, 8)
    u |= np.moveaxis(bits, 3, 2).astype(np.int32) << 4  # sub-block j's fifth bits: bit j of qh[l]
    return _k_parts(u, _f16(b, 0), _f16(b, 2), scales, mins, get_qtype("q5a_g32"))


# GGUF type name -> (decoder, bit-exact?)
DECODERS = {
    "Q4_0": (q4_0, True),
    "Q4_1": (q4_1, True),
    "Q5_0": (q5_0, True),
    "Q5_1": (q5_1, True),
    "Q8_0": (q8_0, True),
    "Q4_K": (q4_k, False),
    "Q5_K": (q5_k, False),
}

# GGUF type name -> the lowbit type its decoder produces (float types are kept as they are)
LOWBIT_TYPE = {"Q4_0": "q4_g32", "Q4_1": "q4a_g32", "Q5_0": "q5_g32", "Q5_1": "q5a_g32", "Q8_0": "q8_g32",
               "Q4_K": "q4a_g32", "Q5_K": "q5a_g32",
               "F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f32"}  # fmt: skip
# GGUF types without a lowbit layout -> bits of the group-32 type they are re-quantized to when no --bits is given:
# at least the source's own precision, so that the import does not lose more than the GGUF already did
REQUANT_BITS = {"Q2_K": 3, "Q3_K": 4, "Q6_K": 8, "Q8_1": 8, "Q8_K": 8, "IQ1_S": 3, "IQ1_M": 3, "IQ2_XXS": 3,
                "IQ2_XS": 3, "IQ2_S": 3, "IQ3_XXS": 4, "IQ3_S": 4, "IQ4_NL": 5, "IQ4_XS": 5, "TQ1_0": 3, "TQ2_0": 3,
                "MXFP4": 5, "NVFP4": 5}  # fmt: skip
