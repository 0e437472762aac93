"""What a cold start shows while numba compiles the kernels a model needs.

The first run on a machine (and the first run of each new weight type or KV cache format) compiles the numba kernels
its forward passes call: seconds of silence otherwise. numba then caches them on disk, so later runs load them in
milliseconds and this shows nothing. :class:`CompileNotice` listens to numba's compile events: at the first one it
writes "compiling kernels for <types> (once per machine)", on a terminal a live count with the kernel in hand, and
when the forward pass that compiled returns (:meth:`CompileNotice.settle`) how many kernels took how long.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TextIO

from numba.core import event


def kernel_label(container, kv_label: str) -> str:
    """The weight types of a container's matrices and the KV cache format, as the notice names them:
    "q4a_g32 ×210, q8_g32 ×1, f16 cache"."""
    counts = Counter(container.tensor(n).qtype.name for n in container.tensor_names)
    kinds = [f"{name} ×{k}" for name, k in counts.most_common() if not name.startswith(("f32", "f16", "bf16"))]
    return ", ".join([*kinds, f"{kv_label} cache"])


class CompileNotice(event.Listener):
    """A numba compile-event listener that tells the user what is being compiled (install it with
    :func:`numba.core.event.install_listener` around forward passes; Engine does when given one)."""

    def __init__(self, label: str, stream: TextIO | None = None, live: bool | None = None):
        self.label = label
        # the reply's text has the terminal's current line (:meth:`saw`): a burst of compiles starting then stays
        # silent, as a notice would cut into the text
        self.mid_line = False
        self.silent = False
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty()) if live is None else live  # rewrite one line with the progress
        self.depth = 0  # nested compiles (a kernel's callees) count as part of their kernel
        self.kernels = 0  # kernels compiled since the notice last settled
        self.total = 0
        self.t0 = 0.0
        self.current = ""

    def on_start(self, ev: event.Event) -> None:
        if self.depth == 0:
            if self.kernels == 0:
                self.t0 = time.perf_counter()
                self.silent = self.mid_line
            if self.kernels == 0 and not self.silent:
                self.stream.write(f"compiling kernels for {self.label} (once per machine; numba caches them)")
                self.stream.write("\n" if not self.live else "")
            dispatcher = (ev.data or {}).get("dispatcher")
            self.current = getattr(getattr(dispatcher, "py_func", None), "__name__", "kernel")
            self._show()
        self.depth += 1

    def on_end(self, ev: event.Event) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.kernels += 1
            self.current = ""
            self._show()

    @classmethod
    def for_engine(cls, engine, **kw) -> CompileNotice:
        """A notice naming ``engine``'s weight types and cache format."""
        return cls(kernel_label(engine.container, engine.kv.label), **kw)

    def saw(self, text: str) -> None:
        """Told each piece of reply text written to the terminal, so that a notice never cuts into a line."""
        if text:
            self.mid_line = not text.endswith("\n")

    def _show(self) -> None:
        if not self.live or self.silent:
            return
        now = f", now {self.current}" if self.current else ""
        self.stream.write(f"\r\033[Kcompiling kernels for {self.label}: {self.kernels} done{now}, "
                          f"{time.perf_counter() - self.t0:.1f} s")
        self.stream.flush()

    def settle(self) -> None:
        """After a forward pass: if it compiled kernels, end the notice with their count and time."""
        if self.kernels == 0:
            return
        if self.silent:
            self.total += self.kernels
            self.kernels = 0
            return
        lead = "\r\033[K" if self.live else ""
        self.stream.write(f"{lead}compiled {self.kernels} kernels for {self.label} in "
                          f"{time.perf_counter() - self.t0:.1f} s (cached for the next run)\n")
        self.stream.flush()
        self.total += self.kernels
        self.kernels = 0
