"""Optional timing of kernel calls, for `lowbit bench`'s "time outside kernels" figure.

Dispatch wraps each compiled-kernel call in :func:`kernel_call`; it costs one context-variable lookup when no timer
is active. A :class:`KernelTimer` used as a context manager collects the seconds spent inside kernels (numpy BLAS
calls included) in the current thread/context only.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable

_ACTIVE: contextvars.ContextVar[KernelTimer | None] = contextvars.ContextVar("lowbit_kernel_timer", default=None)


class KernelTimer:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._token: contextvars.Token | None = None

    def __enter__(self) -> KernelTimer:
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        if self._token is not None:
            _ACTIVE.reset(self._token)
            self._token = None


def _interrupted(e: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in e's chain of causes."""
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__cause__ or e.__context__
    return False


def kernel_call(fn: Callable, *args):
    """``fn(*args)``, timed when a KernelTimer is active. A Ctrl-C that lands while numba loads the kernel from its
    cache reaches Python as a SystemError caused by the KeyboardInterrupt; it is raised as the KeyboardInterrupt it
    is, so the REPL stops a reply the same way whenever Ctrl-C comes."""
    timer = _ACTIVE.get()
    t0 = time.perf_counter() if timer is not None else 0.0
    try:
        return fn(*args)
    except SystemError as e:
        if _interrupted(e):
            raise KeyboardInterrupt from e
        raise
    finally:
        if timer is not None:
            timer.seconds += time.perf_counter() - t0
            timer.calls += 1
