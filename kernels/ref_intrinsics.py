"""numpy twins of the LLVM-IR intrinsics: what each one computes, written plainly, so that each is tested on its own
(tests/test_intrinsics.py) rather than only through the kernel built on it.

Arguments mirror the intrinsics' (arrays, offsets, then the compile-time constants); each twin returns what the
intrinsic returns or, for those that write into ``out``, a new array of what they write. Integer results are exact;
float results equal the intrinsic's up to the order of float additions.
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.qtypes import quant_type, unpack_codes

# ---------------------------------------------------------------------------------------------- kernels/ir/simd.py


def codes_of_group(codes: np.ndarray, boff: int, bits: int, g: int) -> np.ndarray:
    """The g unsigned codes (int64) of the group whose packed bytes start at codes[boff] (formats.qtypes planes)."""
    raw = np.ascontiguousarray(codes.reshape(-1)[boff : boff + g * bits // 8]).reshape(1, -1)
    return unpack_codes(raw, quant_type(bits, g, True), g)[0].astype(np.int64)


def group_idot(codes, boff, xq, xoff, bits, g) -> int:
    """int32 Σ_j u_j · xq[xoff + j] over one group (simd.group_idot)."""
    return int(codes_of_group(codes, boff, bits, g) @ xq[xoff : xoff + g].astype(np.int64))


def _group_terms(crow, scales, mins, r, gis, x, dx, xs, bits, g, asym) -> np.ndarray:
    zp = np.float64(1 << (bits - 1))
    out = []
    for gi in gis:
        isum = codes_of_group(crow, gi * g * bits // 8, bits, g) @ x[gi * g : (gi + 1) * g].astype(np.int64)
        d = np.float64(scales[r, gi].view(np.float16))
        m = np.float64(mins[r, gi].view(np.float16)) if asym else d * zp
        out.append(d * np.float64(dx[gi]) * isum - m * np.float64(xs[gi]))
    return np.array(out)


def quad_fdot(crow, scales, mins, r, gi, xq, dx, xs, bits, g, asym) -> float:
    """Σ over groups gi..gi+3 of row r: d · dx · (u · xq) − m · xs, m the stored min (asym) or d · 2**(bits-1)."""
    return float(_group_terms(crow, scales, mins, r, range(gi, gi + 4), xq, dx, xs, bits, g, asym).sum())


def quad_fdot_unpacked(urow, scales, mins, r, gi, xq, dx, xs, bits, g, asym) -> float:
    """quad_fdot with the row's codes unpacked (urow: one unsigned code per element)."""
    zp = np.float64(1 << (bits - 1))
    total = 0.0
    for q in range(gi, gi + 4):
        isum = urow[q * g : (q + 1) * g].astype(np.int64) @ xq[q * g : (q + 1) * g].astype(np.int64)
        d = np.float64(scales[r, q].view(np.float16))
        m = np.float64(mins[r, q].view(np.float16)) if asym else d * zp
        total += d * np.float64(dx[q]) * isum - m * np.float64(xs[q])
    return float(total)


def half_to_float(h) -> np.float32:
    """float16 bits -> float32."""
    return np.float32(np.uint16(h).view(np.float16))


def bits_to_float(i) -> np.float32:
    """The float32 whose bits are the low 32 bits of i."""
    return np.uint32(int(i) & 0xFFFFFFFF).view(np.float32)


# ---------------------------------------------------------------------------------------------- kernels/ir/vnni.py


def split_activations(xh: np.ndarray, xl: np.ndarray | None, split: bool) -> np.ndarray:
    """The integer activations the byte kernels multiply: xh (int8), or 256 · xh + xl when split."""
    x = xh.astype(np.int64)
    return x * 256 + xl.astype(np.int64) if split else x


def row_fdot8(crow, scales, mins, r, xh, xl, dx, xs, bits, g, asym, split) -> float:
    """Row r times one token on the byte dot product: Σ_g d · dx · (u · x) − m · xs (vnni.row_fdot8)."""
    ng = scales.shape[1]
    x = split_activations(xh, xl, split)
    return float(_group_terms(crow, scales, mins, r, range(ng), x, dx, xs, bits, g, asym).sum())


# ---------------------------------------------------------------------------------------------- kernels/ir/gemm_vnni.py


def unpack_row(crow, cols: int, bits: int, g: int) -> np.ndarray:
    """u8[cols]: the unsigned codes of one packed row, in element order."""
    raw = np.ascontiguousarray(crow[: cols * bits // 8]).reshape(1, -1)
    return unpack_codes(raw, quant_type(bits, g, True), cols)[0].astype(np.uint8)


def tile_gemm(y, wb, dsc, nmc, xh, xl, dxT, xsT, r0, t0, bits, g, split, R, T) -> np.ndarray:
    """A copy of y with y[t0:t0+T, r0:r0+R] = the interleaved block wb ([group][chunk of 4][row][4] codes) times
    tokens t0..t0+T-1: Σ_g dsc[g, r] · dxT[g, t] · (u_r · x_t) + nmc[g, r] · xsT[g, t]."""
    ng = dsc.shape[0]
    cols = ng * g
    u = wb[: cols * R].reshape(cols // 4, R, 4).transpose(1, 0, 2).reshape(R, cols).astype(np.int64)
    x = split_activations(xh, xl, split)
    out = y.copy()
    for t in range(t0, t0 + T):
        isum = (u.reshape(R, ng, g) * x[t].reshape(1, ng, g)).sum(axis=2)  # [R, ng]
        val = (dsc.T.astype(np.float64) * dxT[:, t] * isum + nmc.T.astype(np.float64) * xsT[:, t]).sum(axis=1)
        out[t, r0 : r0 + R] = val
    return out


def tile_gemm_kept(y, wb, sc, mult, xh, xl, dxT, xsT, r0, t0, bits, g, split, R, T) -> np.ndarray:
    """tile_gemm on the kept layout (kernels/packed.py, gemm_vnni.kept_layout): up to 4 bits, chunk pair (2k, 2k+1)
    as one R·4-byte run, the even chunk in the low nibbles; 5-6 bits, per quad of chunks two such runs of the low 4
    bits and one run of the high 2 bits (chunk 4q+k in bits 2k, 2k+1); sc u16[ng, 2, R] the float16 d and min (or
    d)."""
    ng = sc.shape[0]
    if bits <= 4:
        runs = wb[: ng * g * R // 2].reshape(-1, R * 4)
        wb = np.stack([runs & 15, runs >> 4], axis=1).reshape(-1)
    elif bits <= 6:
        runs = wb[: ng * g * R * 3 // 4].reshape(-1, 3, R * 4)
        low = np.stack([runs[:, 0] & 15, runs[:, 0] >> 4, runs[:, 1] & 15, runs[:, 1] >> 4], axis=1)
        top = np.stack([(runs[:, 2] >> (2 * k)) & 3 for k in range(4)], axis=1)
        wb = (low | (top << 4)).reshape(-1)
    dsc = sc[:, 0, :].view(np.float16).astype(np.float32)
    nmc = sc[:, 1, :].view(np.float16).astype(np.float32) * np.float32(mult)
    return tile_gemm(y, wb, dsc, nmc, xh, xl, dxT, xsT, r0, t0, bits, g, split, R, T)


# ---------------------------------------------------------------------------------------------- kernels/act8.py


def quantize_row8(x, t, g, split) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(xh, xl, dx, xs) of token t: per group dx = absmax / qmax, q = rint(x · (1/dx)) (0 for an all-zero group),
    xh = q (int8) or, split, xh = (q + 128) >> 8 and xl = q − 256·xh; xs = dx · Σq. float32 throughout, as the
    intrinsic: equal bit for bit."""
    qmax = np.float32(32639.0 if split else 127.0)
    xg = x[t].astype(np.float32).reshape(-1, g)
    d = np.abs(xg).max(axis=1) / qmax
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d > 0)
    q = np.rint(xg * inv[:, None]).astype(np.int64)
    xs = d * q.sum(axis=1).astype(np.float32)
    if not split:
        return q.reshape(-1).astype(np.int8), None, d, xs
    hi = (q + 128) >> 8
    return hi.reshape(-1).astype(np.int8), (q - 256 * hi).reshape(-1).astype(np.int8), d, xs


# ---------------------------------------------------------------------------------------------- kernels/ir/amx.py


def amx_block(abuf, dsc, nmc, xb, xbl, dxT, xsT, tb, g, split, tile: int = 16) -> np.ndarray:
    """f32[16, 16] ([row][token]) = the 16 weight rows abuf (u8[16 · cols], row-major) times token block tb of the
    packed activations xb (xb[block][col/4][token][4]; xbl the low bytes when split)."""
    ng = dsc.shape[0] // tile
    cols = ng * g
    a = abuf[: tile * cols].reshape(tile, cols).astype(np.int64)

    def tokens(packed):
        blk = packed.reshape(-1, cols // 4, tile, 4)[tb]  # [col/4][token][4]
        return blk.transpose(1, 0, 2).reshape(tile, cols).astype(np.int64)  # [token][col]

    x = tokens(xb) * 256 + tokens(xbl) if split else tokens(xb)
    isum = (a.reshape(tile, 1, ng, g) * x.reshape(1, tile, ng, g)).sum(axis=3)  # [row, token, group]
    cols_t = slice(tb * tile, (tb + 1) * tile)
    d = dsc.reshape(ng, tile).T.astype(np.float64)[:, None, :]  # [row, 1, group]
    nm = nmc.reshape(ng, tile).T.astype(np.float64)[:, None, :]
    dx = dxT[:, cols_t].T.astype(np.float64)[None, :, :]  # [1, token, group]
    xs = xsT[:, cols_t].T.astype(np.float64)[None, :, :]
    return (d * dx * isum + nm * xs).sum(axis=2).astype(np.float32)


# ---------------------------------------------------------------------------------------------- kernels/cpu_kv.py


def float_to_half(x) -> np.uint16:
    """float32 -> float16 bits, rounded to nearest even (beyond float16's range: infinity)."""
    with np.errstate(over="ignore"):
        return np.float16(np.float32(x)).view(np.uint16)


def float_bits(x) -> np.int32:
    """The bits of a float32 as an int32."""
    return np.float32(x).view(np.int32)


# ----------------------------------------------------------------------------------------- kernels/cpu_attention.py


def scores8(q, qoff, k, koff, n, scale) -> np.ndarray:
    """f32[8]: scale · (q[qoff : qoff+n] · k[koff + i·n : koff + (i+1)·n]) for i in 0..7."""
    keys = k.reshape(-1)[koff : koff + 8 * n].reshape(8, n).astype(np.float64)
    return (np.float64(scale) * (keys @ q.reshape(-1)[qoff : qoff + n].astype(np.float64))).astype(np.float32)


def values8(out, ooff, p, poff, v, voff, n) -> np.ndarray:
    """A copy of out with out[ooff : ooff+n] += Σ_i p[poff + i] · v[voff + i·n : voff + (i+1)·n], i in 0..7."""
    res = out.copy()
    rows = v.reshape(-1)[voff : voff + 8 * n].reshape(8, n).astype(np.float64)
    flat = res.reshape(-1)
    flat[ooff : ooff + n] = flat[ooff : ooff + n] + p.reshape(-1)[poff : poff + 8].astype(np.float64) @ rows
    return res


# ------------------------------------------------------------------------------------------- kernels/ir/attn16.py


def scores16x4(sc, soff, m, q4, k, koff, scale) -> np.ndarray:
    """A copy of sc with sc[r·m + soff + i] = scale · q4[r] · k_i for r, i in 0..3, k_i the float16 row (uint16 bits)
    at k[koff + 64 i]."""
    res = sc.copy().reshape(-1)
    keys = k.reshape(-1)[koff : koff + 4 * 64].view(np.float16).reshape(4, 64).astype(np.float64)
    dots = np.float64(scale) * (q4.reshape(4, 64).astype(np.float64) @ keys.T)
    for r in range(4):
        res[r * m + soff : r * m + soff + 4] = dots[r]
    return res.reshape(sc.shape)


def values16x4(dst4, p, m, v, voff, n) -> np.ndarray:
    """A copy of dst4 with dst4[r] += Σ_{s<n} p[r·m + s] · v_s for r in 0..3, v_s the float16 row at v[voff + 64 s]."""
    rows = v.reshape(-1)[voff : voff + n * 64].view(np.float16).reshape(n, 64).astype(np.float64)
    wts = np.stack([p.reshape(-1)[r * m : r * m + n] for r in range(4)]).astype(np.float64)
    return (dst4.astype(np.float64) + wts @ rows).astype(np.float32)


def dequant8_q8(src, soff, d) -> np.ndarray:
    """f32[8] = d · src[soff : soff+8] (int8 codes)."""
    return (np.float32(d) * src.reshape(-1)[soff : soff + 8].astype(np.float32)).astype(np.float32)


def dequant8_q4(src, soff, d) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) f32[8]: d · (low nibble − 8) and d · (high nibble − 8) of the eight bytes src[soff : soff+8]."""
    b = src.reshape(-1)[soff : soff + 8].astype(np.int32)
    dd = np.float32(d)
    return (dd * ((b & 15) - 8).astype(np.float32)), (dd * ((b >> 4) - 8).astype(np.float32))


# ---------------------------------------------------------------------------------- kernels/cpu_attention_prompt.py


def score_tile(sc, soff, sstride, q, qoff, qstride, kt, koff, kstride, hd, scale, rows, width) -> np.ndarray:
    """A copy of sc with sc[soff + r·sstride + i] = scale · Σ_j q[qoff + r·qstride + j] · kt[koff + j·kstride + i]
    for r < rows, i < width, j < hd."""
    res = sc.copy()
    flat, qf, kf = res.reshape(-1), q.reshape(-1).astype(np.float64), kt.reshape(-1).astype(np.float64)
    keys = np.stack([kf[koff + j * kstride : koff + j * kstride + width] for j in range(hd)])  # [hd, width]
    for r in range(rows):
        o = soff + r * sstride
        flat[o : o + width] = np.float64(scale) * (qf[qoff + r * qstride : qoff + r * qstride + hd] @ keys)
    return res


def value_tile(dst, doff, dstride, p, poff, pstride, v, voff, vstride, n, rows, cols, width) -> np.ndarray:
    """A copy of dst with dst[doff + r·dstride + c] += Σ_s p[poff + r·pstride + s] · v[voff + s·vstride + c] for
    r < rows, c < cols·width, s < n."""
    res = dst.copy()
    flat, pf, vf = res.reshape(-1), p.reshape(-1).astype(np.float64), v.reshape(-1).astype(np.float64)
    m = cols * width
    vals = np.stack([vf[voff + s * vstride : voff + s * vstride + m] for s in range(n)]) if n else np.zeros((0, m))
    for r in range(rows):
        o = doff + r * dstride
        flat[o : o + m] = flat[o : o + m] + pf[poff + r * pstride : poff + r * pstride + n] @ vals
    return res


# ---------------------------------------------------------------------------------------- kernels/ir/gemm_bf16.py


def tile_bf16(wb, xb, t0, R, T) -> np.ndarray:
    """yt f32[T, R]: yt[t, r] = Σ_k Σ_{h<2} bf16(wb[k·R + r] half h) · bf16(xb[t0 + t, k] half h) (the low half is
    the even column). Products of two bfloat16 are exact in float32; the sum here is float64."""
    kp = xb.shape[1]

    def halves(u):
        u = np.asarray(u, dtype=np.uint32)
        return np.stack([(u << 16).view(np.float32), (u & 0xFFFF0000).view(np.float32)], axis=-1)

    w = halves(wb[: kp * R].reshape(kp, R)).astype(np.float64)  # [kp, R, 2]
    x = halves(xb[t0 : t0 + T]).astype(np.float64)  # [T, kp, 2]
    return np.einsum("krh,tkh->tr", w, x).astype(np.float32)
