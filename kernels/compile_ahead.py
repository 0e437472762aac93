"""Cold starts on two cores: the attention kernels compiled by a helper process while this one compiles the rest.

numba compiles one function at a time per process (a global compiler lock), and a model's first prompt compiles its
kernels in the order the forward pass reaches them: the projections' integer GEMM, RoPE and the cache write, then
attention — the largest (about 5 s of SmolLM2's 11 on this project's host). When attention is not in numba's
on-disk cache yet, :func:`start` runs ``python -m lowbit.kernels.compile_ahead`` with the cache's formats: it
compiles ``attention_prompt`` (prompts: kernels/cpu_attention_prompt.py), ``attention`` (short-context decode) then
``attention_decode`` (one token over a long context) into the same on-disk cache and prints each name as it is
done. The forward pass, on reaching attention, waits for
that line (:meth:`CompileAhead.wait`) and numba loads the kernel from disk instead of compiling it again. If the
helper cannot start or dies, waiting ends and this process compiles as before.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import numpy as np

from lowbit.kernels import cpu_attention, cpu_attention_prompt
from lowbit.kernels.kv_formats import KVSpec

log = logging.getLogger(__name__)

KERNELS = ("attention_prompt", "attention", "attention_decode")
WAIT_SECONDS = 300.0  # longest wait for the helper's kernel before compiling it here


def _arguments(spec: KVSpec, name: str) -> tuple:
    """Small arguments of the types the runtime passes ``name`` for a cache in ``spec``'s formats (the types make
    numba's cache key; the values only have to be valid)."""
    hd = 32
    kd, ks = spec.k.shapes((1, 8), hd)
    vd, vs = spec.v.shapes((1, 8), hd)
    layer = (np.zeros(kd, spec.k.dtype), np.zeros(ks, np.uint16), np.zeros(vd, spec.v.dtype), np.zeros(vs, np.uint16))
    q = np.zeros((1, 1, hd), dtype=np.float32)
    args = (np.empty_like(q), q, *layer, 0, np.float32(0.125), 0, np.float32(0.0))
    return (*args, 8) if name == "attention_decode" else args


def kernel(name: str):
    """The attention kernel called ``name`` (one of :data:`KERNELS`)."""
    return cpu_attention_prompt.kernels()[0] if name == "attention_prompt" else getattr(cpu_attention, name)


def cached(spec: KVSpec) -> bool:
    """Whether numba's on-disk cache holds ``attention_prompt`` (a model's first attention) for caches in
    ``spec``'s formats."""
    kernel_ = kernel("attention_prompt")
    try:
        sig = tuple(kernel_.typeof_pyval(a) for a in _arguments(spec, "attention_prompt"))
    except Exception:  # numba internals moved: say cached, so nothing is started (logged)
        log.debug("cannot type the kernel's arguments", exc_info=True)
        return True
    return load_cached(kernel_, sig, otherwise=True)


def load_cached(dispatcher, sig: tuple, otherwise: bool = False) -> bool:
    """Load ``dispatcher``'s code for argument types ``sig`` from numba's on-disk cache into it (then calls do not
    look again); whether it was there. ``otherwise``: the answer where numba's internals cannot be asked (logged)."""
    try:
        cres = dispatcher._cache.load_overload(sig, dispatcher.targetctx)
        if cres is None:
            return False
        dispatcher.add_overload(cres)
        return True
    except Exception:
        log.debug("cannot look into numba's cache", exc_info=True)
        return otherwise


class CompileAhead:
    """The helper process and what it has reported compiled."""

    def __init__(self, spec: KVSpec):
        cmd = [sys.executable, "-m", "lowbit.kernels.compile_ahead", str(spec.k.bits), str(spec.v.bits)]
        self._done = {name: threading.Event() for name in KERNELS}
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, name="lowbit-compile-ahead", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            event = self._done.get(line.strip())
            if event is not None:
                event.set()
        self._proc.wait()
        for event in self._done.values():  # ended (or died): nobody waits any longer
            event.set()

    def wait(self, name: str) -> None:
        """Block until the helper has ``name`` in numba's cache (or has ended)."""
        event = self._done.get(name)
        if event is not None and not event.wait(WAIT_SECONDS):
            log.warning("the kernel compile helper did not finish %s in %.0f s; compiling it here", name, WAIT_SECONDS)

    @property
    def finished(self) -> bool:
        return all(e.is_set() for e in self._done.values())


def start(spec: KVSpec) -> CompileAhead | None:
    """A helper compiling the attention kernels for ``spec``'s formats, or None when they are cached already or no
    helper can start."""
    if cached(spec):
        return None
    try:
        return CompileAhead(spec)
    except OSError as e:
        log.debug("no kernel compile helper: %s", e)
        return None


def main(argv: list[str]) -> int:
    spec = KVSpec.parse(f"k{argv[0]},v{argv[1]}" if argv[0] != argv[1] else argv[0])
    for name in KERNELS:
        kernel(name)(*_arguments(spec, name))
        print(name, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
