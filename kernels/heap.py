"""Hand freed heap memory back to the system after a prompt-sized forward pass.

A prefill allocates activations of tens of MB per layer. glibc serves them from mmap at first, then raises its
mmap threshold (up to 32 MB) after each one is freed, so later ones come from the heap, and a heap keeps freed
pages resident: decoding afterwards would carry the prefill's peak. ``malloc_trim(0)`` returns every whole free
page (llama.cpp keeps one reusable compute buffer instead; numpy allocates per call). A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        log.debug("no malloc_trim in this C library; freed heap pages stay with the process")
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_free_heap() -> bool:
    """Return the heap's free pages to the system; True if the C library could (glibc's malloc_trim)."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
