"""Byte-level constants of the .lowbit container shared by the writer and the reader (see formats/SPEC.md)."""

from __future__ import annotations

import struct

MAGIC = b"LOWBIT\x00\x1a"
VERSION_MAJOR = 2  # the newest major version this lowbit reads; it writes 1 unless a file needs 2
VERSION_MINOR = 0
# tensors "<weight>.<suffix>" that change how their weight must be applied (SPEC.md, "Extra tensors of a weight"): a
# reader that ignored them would compute wrong results, so a file holding any is written as major version 2, which
# readers from before them refuse
EXTRA_SUFFIXES = ("had", "lr_a", "lr_b", "act_scale")
ALIGN = 64
# magic, major, minor, header_len, header_crc32, flags, reserved
PREAMBLE = struct.Struct("<8sHHQII4x")


def major_version_for(tensor_names) -> int:
    return 2 if any(n.rsplit(".", 1)[-1] in EXTRA_SUFFIXES for n in tensor_names) else 1


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def data_start(header_len: int) -> int:
    return align_up(PREAMBLE.size + header_len)
