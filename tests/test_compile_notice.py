"""The notice a cold start shows while numba compiles kernels (runtime/compile_notice.py), on real compile events."""

from __future__ import annotations

import io

import numba as nb
import numpy as np
from lbtest import TOY_MODEL
from numba.core import event

from lowbit.runtime.compile_notice import CompileNotice, kernel_label
from lowbit.runtime.engine import Engine


def _fresh_kernels():
    """Two jitted functions, one calling the other, never compiled before (not cached): a compile burst."""

    @nb.njit
    def inner(x):
        return x * 2.0

    @nb.njit
    def outer(x):
        return inner(x) + 1.0

    return outer


def test_notice_names_the_types_counts_kernels_and_ends_its_line():
    out = io.StringIO()
    notice = CompileNotice("q4a_g32 ×3, f16 cache", stream=out, live=False)
    outer = _fresh_kernels()
    with event.install_listener("numba:compile", notice):
        assert outer(np.float64(1.5)) == 4.0
    notice.settle()
    lines = out.getvalue().splitlines()
    assert lines[0] == "compiling kernels for q4a_g32 ×3, f16 cache (once per machine; numba caches them)"
    # the callee compiles inside its caller: one kernel, not two
    assert lines[1].startswith("compiled 1 kernels for q4a_g32 ×3, f16 cache in ") and len(lines) == 2
    with event.install_listener("numba:compile", notice):  # compiled already: nothing more is said
        outer(np.float64(2.0))
    notice.settle()
    assert len(out.getvalue().splitlines()) == 2 and notice.total == 1


def test_live_notice_rewrites_one_line_and_stays_quiet_mid_reply():
    out = io.StringIO()
    notice = CompileNotice("x", stream=out, live=True)
    with event.install_listener("numba:compile", notice):
        _fresh_kernels()(np.float64(1.0))
    notice.settle()
    text = out.getvalue()
    assert "\r\033[Kcompiling kernels for x: 0 done, now outer" in text and "1 done" in text
    assert text.endswith("(cached for the next run)\n")
    notice.saw("The")  # the reply's text is on the current line: a burst now is not shown
    with event.install_listener("numba:compile", notice):
        _fresh_kernels()(np.float64(1.0))
    notice.settle()
    assert out.getvalue() == text and notice.total == 2


def test_warm_up_leaves_the_conversation_cache_alone_and_label_names_types():
    engine = Engine(TOY_MODEL, threads=1)
    ids = engine.tokenizer.encode("Hello there, how are you?")
    engine.prefill(ids)
    keys = engine.cache.layer(0).k.copy()
    engine.compile_notice = CompileNotice("x", stream=io.StringIO(), live=False)
    engine.warm_up()  # its own small cache: positions 0.. of the conversation's are not touched
    assert engine.cached == ids and np.array_equal(engine.cache.layer(0).k, keys)
    after = engine.step(7)  # continues the conversation as if no warm-up had run
    engine.reset()
    # a step and a prefill agree to rounding: bit for bit where the CPU has the byte dot product (both int8), to the
    # int16 activations' rounding elsewhere (the step's int16 products against the prompt's BLAS); a disturbed
    # cache would differ by whole units
    np.testing.assert_allclose(after, engine.prefill([*ids, 7]), rtol=1e-4, atol=1e-3)
    label = kernel_label(engine.container, engine.kv.label)
    assert label == "q4a_g64 ×42, q8_g64 ×2, f16 cache"
