"""Activations rounded to bytes for the byte dot product (kernels/cpu_quant.py, kernels/packed.py), a group at a time
in vector registers.

``quantize_row8`` (an LLVM IR intrinsic) is :func:`quantize_activations8` for one token: per group of g values,
dx = absmax / qmax, q = rint(x · (1/dx)) (0 for an all-zero group), the bytes of q (int8; split: the high and low
bytes of the int16 q) and xs = dx · Σq. The scalar loop it replaces did this an element at a time (~1.3 ns a value:
6 µs for eight tokens of 576, a tenth of a batched decode pass of a small matrix; 0.4 ms of every 512-token
projection of SmolLM2); here a group is one <g x float> load, a vector absmax (a tree of maxima, exact in any
order), one multiply, ``llvm.rint`` (round half to even, as ``np.rint``), one conversion, one integer sum.
Same bytes and floats as the scalar code (tests/test_intrinsics.py compares them), provided the caller compiles
without fast math (``ROUND_JIT``): numba marks every float instruction of a fast-math function, and a division
turned into a multiplication by the reciprocal would change dx. The functions that call it live in this file so that
numba's on-disk cache, which checks only a function's own source file, recompiles them when it changes.

Layouts: x f32[T, cols]; xh, xl i8[T, cols] (xl unwritten unless split); dx, xs f32[T, cols / g].
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import literally, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from lowbit.kernels.cpu import JIT, PRANGE

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
QMAX_INT8 = 127.0
QMAX_SPLIT = 32639.0  # 127 * 256 + 127: the high byte of q + 128 stays a signed byte
# activation rounding without fast math: q = rint(x · (1/dx)) then rounds the same in every caller and in
# kernels.ref.round_activations (fast math lets LLVM rewrite 1/(amax/qmax) differently per call site, which moves
# near-ties to the next level)
ROUND_JIT = dict(JIT, fastmath=False)


def _absmax(builder, a):
    """The largest lane of a (>= 0 or NaN lanes), NaN lanes counted as 0 as the scalar ``if a > amax`` loop does: a
    tree of ``select(a > b, a, b)`` (one ``vmaxps`` a level). ``llvm.vector.reduce.fmax`` keeps NaN semantics by
    going lane by lane (a chain of 31 compares for a group of 32: most of the time of a group)."""
    n = a.type.count
    a = builder.select(builder.fcmp_ordered("ord", a, a), a, ir.Constant(a.type, [0.0] * n))
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(a, a, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(a, a, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
        a = builder.select(builder.fcmp_ordered(">", lo, hi), lo, hi)
    return builder.extract_element(a, ir.Constant(_I32, 0))


@intrinsic
def quantize_row8(typingctx, xh, xl, dx, xs, x, t, g, split):
    """Token t of x into xh (and xl), dx, xs; see the module docstring. g and split are literals."""
    for v in (g, split):
        if not isinstance(v, (types.IntegerLiteral, types.BooleanLiteral)):
            raise errors.RequireLiteralValue("quantize_row8 needs a literal group size and split flag")
    glen, is_split = g.literal_value, split.literal_value
    if glen not in (8, 16, 32, 64, 128, 256):
        raise errors.TypingError(f"quantize_row8: unsupported group of {glen}")
    sig = types.void(xh, xl, dx, xs, x, t, g, split)
    qmax = QMAX_SPLIT if is_split else QMAX_INT8

    def codegen(context, builder, signature, args):
        def arr(i):
            return context.make_array(signature.args[i])(context, builder, value=args[i])

        ha, la, da, sa, xa = (arr(i) for i in range(5))
        tok = args[5] if args[5].type.width == 64 else builder.sext(args[5], _I64)
        cols = builder.extract_value(xa.shape, 1)
        ng = builder.udiv(cols, ir.Constant(_I64, glen))
        vf = ir.VectorType(_F32, glen)
        vi = ir.VectorType(_I32, glen)
        vb = ir.VectorType(_I8, glen)

        def fn(name, ret, *argtys):
            return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, list(argtys)), name)

        fabs = fn(f"llvm.fabs.v{glen}f32", vf, vf)
        rint = fn(f"llvm.rint.v{glen}f32", vf, vf)
        isum = fn(f"llvm.vector.reduce.add.v{glen}i32", _I32, vi)
        zero = ir.Constant(_F32, 0.0)
        row = builder.mul(tok, cols)
        with cgutils.for_range(builder, ng) as loop:
            gi = loop.index
            off = builder.add(row, builder.mul(gi, ir.Constant(_I64, glen)))
            v = builder.load(builder.bitcast(builder.gep(xa.data, [off]), vf.as_pointer()), align=4)
            d = builder.fdiv(_absmax(builder, builder.call(fabs, [v])), ir.Constant(_F32, qmax))
            inv = builder.select(builder.fcmp_ordered(">", d, zero), builder.fdiv(ir.Constant(_F32, 1.0), d), zero)
            one = builder.insert_element(ir.Constant(vf, ir.Undefined), inv, ir.Constant(_I32, 0))
            q = builder.fptosi(builder.call(rint, [builder.fmul(v, builder.shuffle_vector(
                one, one, ir.Constant(vi, [0] * glen)))]), vi)
            if is_split:
                hi = builder.ashr(builder.add(q, ir.Constant(vi, [128] * glen)), ir.Constant(vi, [8] * glen))
                lo = builder.sub(q, builder.shl(hi, ir.Constant(vi, [8] * glen)))
                builder.store(builder.trunc(hi, vb), builder.bitcast(builder.gep(ha.data, [off]), vb.as_pointer()),
                              align=1)
                builder.store(builder.trunc(lo, vb), builder.bitcast(builder.gep(la.data, [off]), vb.as_pointer()),
                              align=1)
            else:
                builder.store(builder.trunc(q, vb), builder.bitcast(builder.gep(ha.data, [off]), vb.as_pointer()),
                              align=1)
            soff = builder.add(builder.mul(tok, ng), gi)
            builder.store(d, builder.gep(da.data, [soff]))
            builder.store(builder.fmul(d, builder.sitofp(builder.call(isum, [q]), _F32)), builder.gep(sa.data, [soff]))
        return context.get_dummy_value()

    return sig, codegen


@nb.njit(inline="always", **ROUND_JIT)
def _quantize_token8(xh, xl, dx, xs, x, g, split, t):
    """Token t of quantize_activations8, a group at a time in vector registers (quantize_row8 above): every caller
    inlines the same code, so a token's bytes do not depend on which function or thread quantized it."""
    quantize_row8(xh, xl, dx, xs, x, t, g, split)


@nb.njit(**ROUND_JIT)
def quantize_activations8(xh, xl, dx, xs, x, g, split):
    """Activations for the byte dot product. Not split: xh: i8[T, cols] = round(x / dx) with dx = absmax / 127.
    Split: q = round(x / dx) with dx = absmax / 32639, stored as xh = (q + 128) >> 8 and xl = q - 256 * xh (both
    signed bytes). dx: f32[T, ng] scale per group; xs: f32[T, ng] the sum of the group's *rounded* activations
    (dx · Σq), so that rows compute W · x̂ for the rounded x̂ exactly (with the exact sum instead, the min term
    would not cancel the rounding error the codes, all >= 0, pick up); x: f32[T, cols]. g and split are compiled in
    (literals, also when called from Python)."""
    literally(g)
    literally(split)
    for t in range(x.shape[0]):
        _quantize_token8(xh, xl, dx, xs, x, g, split, t)


@nb.njit(parallel=PRANGE, **ROUND_JIT)
def quantize_activations8_par(xh, xl, dx, xs, x, g, split):
    """quantize_activations8 with the tokens in parallel (prompts: for SmolLM2's widths, quantizing a 512-token
    prompt's activations on one thread took half of the GEMM's time). The same bytes (no fast math: each token's
    arithmetic is IEEE-exact whatever the thread)."""
    literally(g)
    literally(split)
    for t in nb.prange(x.shape[0]):
        _quantize_token8(xh, xl, dx, xs, x, g, split, t)


@nb.njit(**JIT)
def quantize8(x, g, split, par=False):
    """(xh, xl, dx, xs) of quantize_activations8 for x: f32[T, cols], freshly allocated (xl is [T, 1] unless split);
    ``par``: the tokens in parallel (prompts)."""
    t_n, cols = x.shape
    ng = cols // g
    xh = np.empty(x.shape, dtype=np.int8)
    xl = np.empty((t_n, cols if split else 1), dtype=np.int8)
    dx = np.empty((t_n, ng), dtype=np.float32)
    xs = np.empty((t_n, ng), dtype=np.float32)
    if par:
        quantize_activations8_par(xh, xl, dx, xs, x, g, split)
    else:
        quantize_activations8(xh, xl, dx, xs, x, g, split)
    return xh, xl, dx, xs
