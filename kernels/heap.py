"""Hand freed heap memory back to the system after a prompt-sized forward pass; commit long-lived buffers up front.

A prefill allocates activations of tens of MB per layer. glibc serves them from mmap at first, then raises its
mmap threshold (up to 32 MB) after each one is freed, so later ones come from the heap, and a heap keeps freed
pages resident: decoding afterwards would carry the prefill's peak. ``malloc_trim(0)`` returns every whole free
page (llama.cpp keeps one reusable compute buffer instead; numpy allocates per call). A no-op off glibc.

Within a pass the opposite is wanted: :func:`keep_freed_heap` (the engine calls it) serves arrays of up to 1 GiB
from the heap and lets freed memory stay there until the trim, so the next layer reuses the pages the last one
freed instead of mapping (and faulting in) fresh ones. A 512-token SmolLM2 prefill took ~69,000 minor page faults
and ~410 ms with glibc's defaults, ~6,000 and ~307 ms with these settings (same host, same process layout).

:func:`commit` is the other side of lazily mapped memory: an array written a little at a time in many places (a KV
cache: a region per key/value head) faults its pages in one by one. On the 2-core VMs these numbers come from, a
fault in memory the process had not touched cost 20-400 us (copying a 40-token prefix into a fresh whole-context
Llama-3.2-1B-shaped cache: 60-1,150 ms), while faulting in all of that cache's 134 MB in one call took 5-70 ms.
kernels/kv_cache.py commits each cache array it allocates (and allocates them for the positions in use).
"""

from __future__ import annotations

import ctypes
import functools
import logging

import numpy as np

log = logging.getLogger(__name__)


M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # arrays below this come from the heap; free memory up to this stays there until a trim


@functools.cache
def _mallopt():
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def keep_freed_heap() -> bool:
    """Let forward passes reuse the memory they free (module docstring); True if the C library took the settings
    (glibc's mallopt). Process-wide; release_free_heap still returns the free pages after a prompt-sized pass."""
    fn = _mallopt()
    if fn is None:
        return False
    return bool(fn(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(fn(M_TRIM_THRESHOLD, KEEP_BYTES))


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


MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault in a range's pages for writing, in one call
PAGE = 4096


@functools.cache
def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def commit(arrays) -> None:
    """Fault in every page of ``arrays`` (C-contiguous numpy arrays) now rather than at first write, leaving their
    contents as they are: one ``madvise(MADV_POPULATE_WRITE)`` per array where the kernel has it, else one write of
    each page's own first byte."""
    fn = _madvise()
    for a in arrays:
        if a.nbytes == 0:
            continue
        addr = a.ctypes.data
        start = addr // PAGE * PAGE
        if fn is not None and fn(ctypes.c_void_p(start), addr + a.nbytes - start, MADV_POPULATE_WRITE) == 0:
            continue
        flat = a.reshape(-1).view(np.uint8)
        first = (-addr) % PAGE  # the first byte of each page the array covers (and its own first byte)
        for part in (flat[:1], flat[first::PAGE]):
            part |= 0  # a write to each (numpy skips assigning a view to itself)
