"""Byte-level constants of the .lowbit container shared by the writer and the reader (see formats/SPEC.md)."""

from __future__ import annotations

import struct

MAGIC = b"LOWBIT\x00\x1a"
VERSION_MAJOR = 1
VERSION_MINOR = 0
ALIGN = 64
# magic, major, minor, header_len, header_crc32, flags, reserved
PREAMBLE = struct.Struct("<8sHHQII4x")


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def data_start(header_len: int) -> int:
    return align_up(PREAMBLE.size + header_len)
