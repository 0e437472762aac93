"""The prefill GEMM on Intel AMX tiles (``tdpbusd``: a 16×64 tile of unsigned bytes times a 64×16 tile of signed
bytes into a 16×16 tile of int32 sums in one instruction), written as LLVM IR with the tile instructions as inline
assembly (numba's LLVM target is the host CPU model, which may not name AMX even where the CPU has it).

:func:`amx_block` computes one 16-row × 16-token block of ``y = x @ W.T``:

- A tile: 16 weight rows' unsigned codes, unpacked row-major into ``abuf[16, cols]`` (kernels.ir.gemm_vnni.unpack_row),
  ``K = min(g, 64)`` bytes of each row per tile;
- B tile: 16 tokens' int8 activations for the same K columns, packed once per GEMM by :func:`pack_tokens` in the
  layout ``tdpbusd`` reads (``xb[block][col/4][token][4]``, 64 bytes per four columns);
- per group, the int32 tile (two for the split activations of 8-bit weights: ``x = 256·hi + lo``) is stored and
  each weight row r enters a float accumulator over the 16 tokens:
  ``acc[r] += float(C[r]) · d[r,g] · dx[g,:] − m[r,g] · xs[g,:]`` (two fused multiply-adds per row and group).

The result is written to ``obuf[16 rows, 16 tokens]``; the caller copies the valid part into ``y``. Rows beyond a
matrix's last and tokens beyond the prompt's last are zeros in the buffers (so their products are zero) and never
copied out. Sums cannot overflow (kernels/ir/vnni.py, same bounds).

AMX needs the kernel's permission per process (``arch_prctl(ARCH_REQ_XCOMP_PERM)``): :func:`host_has_amx` asks for
it and is the only way the kernels decide to use these instructions, so they never run where the permission was
refused (an AMX instruction without it kills the process).
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache

import numba as nb
from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from lowbit.kernels.ir.simd import host_cpu_features

log = logging.getLogger(__name__)

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
TILE = 16  # rows of a weight block and tokens of a token block (one tile's 16 rows / 16 int32 columns)
SYS_ARCH_PRCTL = 158  # x86-64
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
NO_AMX_ENV = "LOWBIT_NO_AMX"  # set to 1: never use AMX (compare against the VNNI kernels)


@lru_cache(maxsize=None)
def host_has_amx() -> bool:
    """Whether this process may run the AMX int8 tile instructions: the CPU has them (AMX-TILE, AMX-INT8), the
    kernel granted the process the tile state, and ``LOWBIT_NO_AMX`` is not set. The answer never changes within a
    process (the permission, once granted, lasts until exec)."""
    if os.environ.get(NO_AMX_ENV, "") not in ("", "0"):
        return False
    f = host_cpu_features()
    if not (f.get("amx-tile") and f.get("amx-int8") and f.get("avx512f")):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        granted = libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        granted = False
    if not granted:
        log.info("the CPU has AMX but the kernel did not grant the tile state; prefill uses AVX-512 VNNI")
        return False
    import llvmlite.binding as llvm

    llvm.initialize_native_asmparser()  # inline assembly needs the host's assembler parser (numba does not init it)
    return True


def _asm(builder, text: str, operands: list, constraint: str = "") -> None:
    fnty = ir.FunctionType(ir.VoidType(), [v.type for v in operands])
    cons = ",".join([constraint] * len(operands) + ["~{memory}"]) if operands else "~{memory}"
    builder.call(ir.InlineAsm(fnty, text, cons, side_effect=True), operands)


def _tile_config(builder, k: int, split: bool):
    """A 64-byte palette-1 tile configuration on the stack for the groups in flight: tmm0-3 16×64-byte
    int32 sums (int8: one per group; split: hi and lo of two groups); int8: tmm4-5 16×k weight bytes and tmm6-7 k/4×64
    activation bytes, alternating; split: tmm4 the weights, tmm5-6 the high and low activation bytes."""
    cfg = [0] * 64
    cfg[0] = 1
    shapes = {t: (16, 64) for t in range(4)}
    if split:
        shapes.update({4: (16, k), 5: (k // 4, 64), 6: (k // 4, 64)})
    else:
        shapes.update({4: (16, k), 5: (16, k), 6: (k // 4, 64), 7: (k // 4, 64)})
    for t, (rows, colsb) in shapes.items():
        cfg[16 + 2 * t] = colsb & 0xFF
        cfg[17 + 2 * t] = colsb >> 8
        cfg[48 + t] = rows
    aty = ir.ArrayType(_I8, 64)
    slot = cgutils.alloca_once(builder, aty)
    builder.store(ir.Constant(aty, cfg), slot)
    return builder.ptrtoint(slot, _I64)


def _literals(g, split) -> tuple[int, bool]:
    for v in (g, split):
        if not isinstance(v, (types.IntegerLiteral, types.BooleanLiteral)):
            raise errors.RequireLiteralValue("the AMX intrinsics need a literal group size and split flag")
    if g.literal_value not in (32, 64, 128):
        raise errors.TypingError(f"amx_block: unsupported group size {g.literal_value}")
    return g.literal_value, split.literal_value


@intrinsic
def amx_begin(typingctx, g, split):
    """Load the tile configuration of :func:`amx_tiles` for groups of g (split: int16-precision activations): once
    per thread before a run of amx_tiles calls, then :func:`amx_end`. g and split are literals."""
    glen, is_split = _literals(g, split)

    def codegen(context, builder, signature, args):
        _asm(builder, "ldtilecfg ($0)", [_tile_config(builder, min(glen, 64), is_split)], "r")
        return context.get_dummy_value()

    return types.void(g, split), codegen


@intrinsic
def amx_end(typingctx):
    """Release the tile state (after a run of amx_tiles calls)."""

    def codegen(context, builder, signature, args):
        _asm(builder, "tilerelease", [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def amx_block(typingctx, obuf, abuf, dsc, nmc, xb, xbl, dxT, xsT, tb, g, split):
    """obuf[16·16] (f32, [row][token]) = the 16×16 block of weight rows abuf (u8[16·cols], row-major) times token
    block ``tb`` of the packed activations xb (xbl: the low bytes when split, else unread); dsc, nmc: f32[ng·16] d
    and −m of the block's rows per group (index gi·16 + r); dxT, xsT: f32[ng, tokens padded to 16] (see the module
    docstring). g and split are literals. Loads the tile configuration and releases the tiles itself."""
    return _block(obuf, abuf, dsc, nmc, xb, xbl, dxT, xsT, tb, g, split, configure=True)


@intrinsic
def amx_tiles(typingctx, obuf, abuf, dsc, nmc, xb, xbl, dxT, xsT, tb, g, split):
    """amx_block between :func:`amx_begin` and :func:`amx_end` (the configuration loaded once for many blocks: loading
    it costs more than a block of a few groups)."""
    return _block(obuf, abuf, dsc, nmc, xb, xbl, dxT, xsT, tb, g, split, configure=False)


def _block(obuf, abuf, dsc, nmc, xb, xbl, dxT, xsT, tb, g, split, configure: bool):
    for v in (g, split):
        if not isinstance(v, (types.IntegerLiteral, types.BooleanLiteral)):
            raise errors.RequireLiteralValue("amx_block needs a literal group size and split flag")
    glen, is_split = g.literal_value, split.literal_value
    if glen not in (32, 64, 128):
        raise errors.TypingError(f"amx_block: unsupported group size {glen}")
    sig = types.void(obuf, abuf, dsc, nmc, xb, xbl, dxT, xsT, tb, g, split)
    k = min(glen, 64)

    def codegen(context, builder, signature, args):
        def arr(i):
            return context.make_array(signature.args[i])(context, builder, value=args[i])

        def c64(v):
            return ir.Constant(_I64, v)

        oa, aa, da, ma, xa, xla, dxa, xsa = (arr(i) for i in range(8))
        tblk = args[8] if args[8].type.width == 64 else builder.sext(args[8], _I64)
        ng = builder.udiv(builder.extract_value(da.shape, 0), c64(TILE))
        cols = builder.mul(ng, c64(glen))
        ntok = builder.extract_value(dxa.shape, 1)
        vi = ir.VectorType(_I32, TILE)
        vf = ir.VectorType(_F32, TILE)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf] * 3), "llvm.fma.v16f32")
        zero = ir.Constant(vf, [0.0] * TILE)
        acc = [cgutils.alloca_once_value(builder, zero) for _ in range(TILE)]
        cty = ir.ArrayType(vi, TILE)
        cbuf = [cgutils.alloca_once(builder, cty) for _ in range(4)]  # the four sum tiles, stored
        cptr = [builder.ptrtoint(c, _I64) for c in cbuf]
        stride64 = c64(64)
        if configure:
            _asm(builder, "ldtilecfg ($0)", [_tile_config(builder, k, is_split)], "r")

        def addr(ary, off):
            return builder.ptrtoint(builder.gep(ary.data, [off]), _I64)

        def splat(v):
            one = builder.insert_element(ir.Constant(vf, ir.Undefined), v, ir.Constant(_I32, 0))
            return builder.shuffle_vector(one, one, ir.Constant(vi, [0] * TILE))

        def load_vec(ary, off):
            return builder.load(builder.bitcast(builder.gep(ary.data, [off]), vf.as_pointer()), align=4)

        xblock = builder.mul(tblk, builder.mul(builder.udiv(cols, c64(4)), stride64))  # byte offset of the block
        per = 2 if is_split else 4  # groups in flight: their sum tiles are all busy before the first is stored

        def batch(g0, n):
            """Groups g0..g0+n-1: every tile product first (independent sum tiles, so they pipeline), then the
            float epilogue of each group from the stored sums."""
            for j in range((2 if is_split else 1) * n):
                _asm(builder, f"tilezero %tmm{j}", [])
            step = 0
            for j in range(n):
                gi = builder.add(g0, c64(j))
                for sub in range(glen // k):
                    col = builder.add(builder.mul(gi, c64(glen)), c64(sub * k))
                    boff = builder.add(xblock, builder.mul(builder.udiv(col, c64(4)), stride64))
                    ta, tx = (4, 5) if is_split else (4 + step % 2, 6 + step % 2)
                    step += 1
                    _asm(builder, f"tileloadd ($0,$1,1), %tmm{ta}", [addr(aa, col), cols], "r")
                    _asm(builder, f"tileloadd ($0,$1,1), %tmm{tx}", [addr(xa, boff), stride64], "r")
                    if is_split:
                        _asm(builder, f"tdpbusd %tmm5, %tmm4, %tmm{2 * j}", [])
                        _asm(builder, "tileloadd ($0,$1,1), %tmm6", [addr(xla, boff), stride64], "r")
                        _asm(builder, f"tdpbusd %tmm6, %tmm4, %tmm{2 * j + 1}", [])
                    else:
                        _asm(builder, f"tdpbusd %tmm{tx}, %tmm{ta}, %tmm{j}", [])
            for j in range((2 if is_split else 1) * n):
                _asm(builder, f"tilestored %tmm{j}, ($0,$1,1)", [cptr[j], stride64], "r")
            for j in range(n):
                gi = builder.add(g0, c64(j))
                soff = builder.add(builder.mul(gi, ntok), builder.mul(tblk, c64(TILE)))
                dxv = load_vec(dxa, soff)
                xsv = load_vec(xsa, soff)
                for r in range(TILE):
                    idx = [ir.Constant(_I32, 0), ir.Constant(_I32, r)]
                    if is_split:
                        hi = builder.load(builder.gep(cbuf[2 * j], idx), align=64)
                        lo = builder.load(builder.gep(cbuf[2 * j + 1], idx), align=64)
                        ci = builder.add(builder.shl(hi, ir.Constant(vi, [8] * TILE)), lo)
                    else:
                        ci = builder.load(builder.gep(cbuf[j], idx), align=64)
                    goff = builder.add(builder.mul(gi, c64(TILE)), c64(r))
                    d = splat(builder.load(builder.gep(da.data, [goff])))
                    nm = splat(builder.load(builder.gep(ma.data, [goff])))
                    f = builder.call(fma, [builder.sitofp(ci, vf), builder.fmul(d, dxv), builder.load(acc[r])])
                    builder.store(builder.call(fma, [nm, xsv, f]), acc[r])

        nfull = builder.udiv(ng, c64(per))
        with cgutils.for_range(builder, nfull) as loop:
            batch(builder.mul(loop.index, c64(per)), per)
        with cgutils.for_range(builder, builder.sub(ng, builder.mul(nfull, c64(per)))) as loop:
            batch(builder.add(builder.mul(nfull, c64(per)), loop.index), 1)
        if configure:
            _asm(builder, "tilerelease", [])
        for r in range(TILE):
            out = builder.gep(oa.data, [c64(r * TILE)])
            builder.store(builder.load(acc[r]), builder.bitcast(out, vf.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@nb.njit(cache=True, nogil=True, parallel=True)
def pack_tokens(xb, xh):
    """xb: i8[ceil(T/16) · cols/4 · 64] = xh: i8[T, cols] in the B-tile layout (xb[block][col/4][token][4]), tokens
    beyond T zero; the token blocks in parallel."""
    t_n, cols = xh.shape
    c4 = cols // 4
    nblk = (t_n + TILE - 1) // TILE
    for b in nb.prange(nblk):
        base = b * c4 * 64
        for n in range(TILE):
            t = b * TILE + n
            for j4 in range(c4):
                o = base + j4 * 64 + n * 4
                for i in range(4):
                    xb[o + i] = xh[t, j4 * 4 + i] if t < t_n else 0
