"""The CRC-32 of the container's header and data parts (zlib's polynomial, formats/SPEC.md), computed by ISA-L where
its wheel is installed: the same value at ~5x zlib's speed on one core (carry-less multiply folding), with the GIL
released, so verifying a file on its first load costs little beside reading it. zlib otherwise."""

from __future__ import annotations

import zlib

try:
    from isal.isal_zlib import crc32 as _isal_crc32
except ImportError:  # no ISA-L wheel for this platform
    _isal_crc32 = None

crc32 = _isal_crc32 if _isal_crc32 is not None else zlib.crc32
BACKEND = "isal" if _isal_crc32 is not None else "zlib"
