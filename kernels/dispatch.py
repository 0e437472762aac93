"""The CPU kernels behind kernels/ops.py's CpuOps: a Weight with the product kernels it records once (Paths), and one
function per primitive that allocates the output and calls the numba kernel. Models never call these directly."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from lowbit.errors import FormatError
from lowbit.formats.layout import EXTRA_SUFFIXES
from lowbit.formats.qtypes import PLANES
from lowbit.formats.reader import StoredTensor
from lowbit.kernels import (
    act_quant,
    cpu,
    cpu_attention,
    cpu_attention_batch,
    cpu_attention_prompt,
    cpu_half,
    cpu_kv,
    cpu_quant,
    hadamard,
    packed,
)
from lowbit.kernels.ir import gemm_bf16
from lowbit.kernels.ref import dequantize
from lowbit.kernels.timing import kernel_call

DECODE_CHUNK = 128  # one-token attention over more cached positions than this is split into chunks of this many
SMALL_BATCH = 8  # up to this many tokens: fused dequantize-and-dot; beyond: the integer GEMM where the CPU has
# the byte dot product (kernels/ir/gemm_vnni.py), else dequantized tiles + BLAS
PARALLEL_ROWS = 16  # element-wise kernels run their rows in parallel from this many tokens on (prompts)
TILE_ELEMS = 1 << 21  # elements of one dequantized prefill tile (8 MiB of float32)
# optional tensors stored next to `<name>.weight` (formats/SPEC.md, "Extra tensors of a weight")
EXTRA_KWARGS = ("had_signs", "lr_a", "lr_b", "act_scale")  # the Weight keyword each suffix is passed as


class Weight:
    """A linear/embedding weight ``W[rows, cols]`` (optionally with a float bias) as the kernels want it.

    Optional extras (formats/SPEC.md): ``had_signs[cols]`` (±1) means the stored matrix is ``W' = W Rᵀ`` for the
    random-sign block Hadamard transform R of :mod:`lowbit.kernels.hadamard`, so products use ``x' = R x``;
    ``lr_a[r, cols]`` and ``lr_b[rows, r]`` add the rank-r correction ``lr_b @ lr_a`` to the stored matrix, in the
    same (stored, i.e. rotated when ``had_signs`` is set) basis: ``y = Ŵ' x' + lr_b (lr_a x') (+ bias)``.
    ``act_scale[1]`` is the static int8 activation scale of the input (used only by ``--act-quant static``);
    ``act_q`` is the instance's activation-quantization mode, set by :func:`lowbit.kernels.act_quant.apply`."""

    def __init__(
        self,
        st: StoredTensor,
        bias: np.ndarray | None = None,
        *,
        had_signs: np.ndarray | None = None,
        lr_a: np.ndarray | None = None,
        lr_b: np.ndarray | None = None,
        act_scale: np.ndarray | None = None,
    ):
        st = st.per_row()  # per-tensor types run as their per-channel twins
        self.name = st.name
        self.qtype = st.qtype
        if len(st.shape) != 2:
            raise FormatError(f"tensor {st.name} must be 2-D, got shape {st.shape}")
        self.rows, self.cols = st.shape
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        self.nbytes = st.nbytes
        self._set_extras(had_signs, lr_a, lr_b)
        self.act_q = None  # activation quantization: None off, 0.0 dynamic per token, s > 0 static scale
        self.act_scale = None if act_scale is None else _act_scale(act_scale, self.name)
        self.int_kernels = None  # (matvec, small-batch matmul, prompt GEMM or None) on integer activations
        self.act_mode = None  # their activation mode (kernels/cpu_quant.py ACT_MODES)
        self.packed = None  # (wb, sc, matmul): blocks kept for batched decoding (pack_for_batches)
        self.is_float = st.qtype.is_float
        # float16 / bfloat16 matrices stay 16-bit (their bits as uint16; kernels/cpu_half.py), float32 ones as they are
        self.h16 = self.f32 = None
        self.bf16 = st.qtype.name == "bf16"
        self.bf16_dot = False  # bfloat16 weights: prompts on the bfloat16 pair dot product (set_bf16_dot)
        if st.qtype.is_float and st.qtype.bits == 16:
            self.h16 = np.ascontiguousarray(st.parts["data"]).view(np.uint16)
            self.set_bf16_dot(True)
            return
        if st.qtype.is_float:
            self.f32 = np.ascontiguousarray(dequantize(st.parts, st.qtype, st.shape))
            self.paths = choose_paths(self)
            return
        qt = st.qtype
        self.codes = st.parts["codes"]
        self.scales = st.parts["scales"].view(np.uint16)
        self.mins = st.parts["mins"].view(np.uint16) if qt.asym else np.zeros((1, 1), dtype=np.uint16)
        self.planes = np.array(PLANES[qt.bits], dtype=np.int32)
        self.g = qt.layout_group(self.cols)
        self.bits = qt.bits
        self.asym = qt.asym
        self.zp = np.float32(qt.zero_point)
        if cpu_quant.specialised(qt.bits, self.g):
            self.act_mode = cpu_quant.activation_mode(qt.bits)
            self.int_kernels = cpu_quant.make_kernels(qt.bits, self.g, self.act_mode)
        self.paths = choose_paths(self)

    def set_activation_mode(self, mode: str | None) -> None:
        """Activation mode of this weight's integer kernels (``cpu_quant.ACT_MODES``; None: the default for its
        bit-width). No effect on weights without integer kernels (float, per-channel)."""
        if self.int_kernels is None:
            return
        self.act_mode = cpu_quant.activation_mode(self.bits) if mode is None else mode
        self.int_kernels = cpu_quant.make_kernels(self.bits, self.g, self.act_mode)
        repack = self.packed is not None  # packed for the old mode's kernels
        self.packed = None
        self.paths = choose_paths(self)
        if repack:
            pack_for_batches(self)

    def set_bf16_dot(self, on: bool) -> None:
        """bfloat16 weights: whether products round the activations to bfloat16 for the CPU's pair dot product
        (kernels/ir/gemm_bf16.py: prompts about twice as fast as float32 tiles and BLAS, decode steps ~1.2× the
        float32 row kernel); off: float32 activations, exact. On only where the CPU has it and the rows have an
        even length; no effect on other weights."""
        self.bf16_dot = bool(on and self.bf16 and self.h16 is not None and self.cols % 2 == 0
                             and gemm_bf16.host_has_bf16_dot())
        self.paths = choose_paths(self)

    def _set_extras(self, had_signs, lr_a, lr_b) -> None:
        base = self.name.removesuffix(".weight")
        self.had_signs = self.had_d = None
        if had_signs is not None:
            self.had_signs = hadamard.check_signs(had_signs, self.cols, f"tensor {base}.had")
            self.had_d = hadamard.scaled_signs(self.had_signs)
            self.had_block = hadamard.block_size(self.cols)
        self.lr_a = self.lr_b = None
        if (lr_a is None) != (lr_b is None):
            have, miss = ("lr_a", "lr_b") if lr_b is None else ("lr_b", "lr_a")
            raise FormatError(f"tensor {base}.{have} has no matching {base}.{miss}")
        if lr_a is None:
            return
        a, b = np.asarray(lr_a), np.asarray(lr_b)
        if a.ndim != 2 or a.shape[1] != self.cols or a.shape[0] < 1:
            raise FormatError(f"tensor {base}.lr_a: expected shape [rank, {self.cols}], got {list(a.shape)}")
        if b.shape != (self.rows, a.shape[0]):
            raise FormatError(f"tensor {base}.lr_b: expected shape [{self.rows}, {a.shape[0]}], got {list(b.shape)}")
        self.lr_a = np.ascontiguousarray(a, dtype=np.float32)
        self.lr_b = np.ascontiguousarray(b, dtype=np.float32)
        if not (np.isfinite(self.lr_a).all() and np.isfinite(self.lr_b).all()):
            raise FormatError(f"tensors {base}.lr_a/lr_b contain NaN or infinite values")
        self.nbytes += a.nbytes + b.nbytes

    def _qargs(self):
        return self.codes, self.scales, self.mins

    def _rest(self):
        return self.planes, self.g, self.bits, self.asym, self.zp


def exact_activations(w: Weight) -> Weight:
    """``w`` with int16-precision kernel activations: the float product's numbers on every CPU (int8 activations
    are the default only where the CPU has the byte dot product). For conversion, whose output must not depend on
    the host. Returns ``w``."""
    if w.int_kernels is not None:
        w.set_activation_mode(cpu_quant.activation_mode(w.bits, exact=True))
    if w.bf16_dot:
        w.set_bf16_dot(False)
    return w


def _act_scale(a, name: str) -> np.float32:
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    if a.size != 1 or not np.isfinite(a[0]) or a[0] <= 0:
        raise FormatError(f"tensor {name.removesuffix('.weight')}.act_scale must be one finite positive number")
    return np.float32(a[0])


def float_tensor(st: StoredTensor) -> np.ndarray:
    """A small float tensor (norm weight, bias) as contiguous float32."""
    if not st.qtype.is_float:
        raise FormatError(f"tensor {st.name} must be stored as a float type, not {st.qtype.name}")
    return np.ascontiguousarray(dequantize(st.parts, st.qtype, st.shape))


def weight_extras(container, name: str) -> dict[str, np.ndarray]:
    """The optional extras of weight ``name`` (``<name>.had``, ``<name>.lr_a``, ``<name>.lr_b``,
    ``<name>.act_scale``) present in ``container``, as keyword arguments for :class:`Weight`."""
    out = {}
    for sfx, kw in zip(EXTRA_SUFFIXES, EXTRA_KWARGS, strict=True):
        if f"{name}.{sfx}" in container:
            out[kw] = float_tensor(container.tensor(f"{name}.{sfx}"))
    return out


def linear(w: Weight, x: np.ndarray, prompt: bool = False) -> np.ndarray:
    """y[T, rows] = x[T, cols] @ W.T (+ bias); with extras, x is first rotated (one float32 copy) and the low-rank
    term ``(x' @ lr_a.T) @ lr_b.T`` is added. With an activation-quantization mode (``w.act_q``), the input the
    product consumes (after any rotation) is first rounded to int8 levels (kernels/act_quant.py). ``prompt``: the
    prompt GEMM for any T where the weight has one (its rows do not depend on T; the one-token and few-token
    kernels sum in another order)."""
    if w.had_d is not None:
        xr = np.array(x, dtype=np.float32, order="C", copy=True)
        kernel_call(hadamard.fwht_rows, xr, w.had_d, w.had_block, False)
        x = xr
    if w.act_q is not None:
        x = act_quant.fake_quant(x, w.act_q)
    y = _product(w, x, prompt)
    if w.lr_a is not None:
        y += kernel_call(np.matmul, kernel_call(np.matmul, x, w.lr_a.T), w.lr_b.T)
    if w.bias is not None:
        y += w.bias
    return y


def pack_for_batches(w: Weight) -> int:
    """Keep ``w``'s row blocks unpacked (kernels/packed.py), so that products of 2..SMALL_BATCH tokens (a decode pass
    of several sequences) run as the prompt GEMM does. Weights on byte-dot-product kernels only; returns the bytes
    added (0 where nothing was packed)."""
    if w.packed is not None:
        return sum(a.nbytes for a in w.packed[:2])
    k = w.int_kernels
    if w.f32 is not None or k is None or k.gemm is None or w.act_mode not in ("int8", "split"):
        return 0
    prepack, matmul = packed.packed_kernels(w.bits, w.g, w.act_mode == "split")
    wb, sc = kernel_call(prepack, w.codes, w.scales, w.mins, w.asym)
    w.packed = (wb, sc, matmul)
    w.paths = choose_paths(w)
    return wb.nbytes + sc.nbytes


def linear_many(ws: list[Weight], x: np.ndarray) -> list[np.ndarray]:
    """[linear(w, x) for w in ws] for two or three weights sharing the input (q/k/v, gate/up). One token through
    weights of one quant type without extras or an activation-quantization mode takes one fused kernel call
    (``Kernels.matvec3``): the activations are quantized once and the dispatch cost is paid once."""
    k = ws[0].int_kernels
    if 2 <= x.shape[0] <= SMALL_BATCH and packed.kept_together(ws):
        return packed.kept_many(ws, x)
    if x.shape[0] != 1 or k is None or k.matvec3 is None or not 2 <= len(ws) <= 3:
        return [linear(w, x) for w in ws]
    for w in ws:
        if w.int_kernels is not k or w.had_d is not None or w.lr_a is not None or w.act_q is not None:
            return [linear(w, x) for w in ws]
    w1, w2 = ws[0], ws[1]
    y1 = np.empty((1, w1.rows), dtype=np.float32)
    y2 = np.empty((1, w2.rows), dtype=np.float32)
    if len(ws) == 3:
        w3 = ws[2]
        y3 = np.empty((1, w3.rows), dtype=np.float32)
        ys = [y1, y2, y3]
        third = (y3[0], w3.codes, w3.scales, w3.mins)
    else:
        ys = [y1, y2]
        third = (_NO_ROWS_Y, _NO_ROWS_CODES, _NO_ROWS_SCALES, _NO_ROWS_SCALES)
    kernel_call(k.matvec3, y1[0], w1.codes, w1.scales, w1.mins, y2[0], w2.codes, w2.scales, w2.mins, *third,
                np.ascontiguousarray(x), w1.asym)
    for w, y in zip(ws, ys):
        if w.bias is not None:
            y += w.bias
    return ys


# the empty third matrix of a two-matrix fused call (read-only: nothing is ever written to 0 rows)
_NO_ROWS_Y = np.empty(0, dtype=np.float32)
_NO_SCALES = np.empty((0, 0, 0), dtype=np.uint16)  # a float cache's scales


def cache_arrays(layer: tuple) -> tuple:
    """A layer's (key data, key scales, value data, value scales); a float32 pair (keys, values) gets empty scales."""
    return (layer[0], _NO_SCALES, layer[1], _NO_SCALES) if len(layer) == 2 else tuple(layer)
_NO_ROWS_CODES = np.empty((0, 1), dtype=np.uint8)
_NO_ROWS_SCALES = np.empty((0, 1), dtype=np.uint16)


class Paths(NamedTuple):
    """The product kernels one weight uses, chosen once (at load, and again when its activation mode or packing
    changes): each a function (w, x[T, cols]) -> y[T, rows]. ``prompt`` is None where a prompt pass takes the
    kernel of its token count."""

    one: Callable  # T = 1 (decode)
    few: Callable  # 2 <= T <= SMALL_BATCH (a decode pass of several sequences)
    many: Callable  # T > SMALL_BATCH (a prompt)
    prompt: Callable | None  # every T of a prompt pass

    def names(self) -> dict[str, str | None]:
        return {k: None if f is None else f.__name__.lstrip("_") for k, f in self._asdict().items()}


def choose_paths(w: Weight) -> Paths:
    if w.f32 is not None:
        return Paths(_float, _float, _float, None)
    if w.h16 is not None:  # a prompt pass widens tiles for BLAS whatever its length, as float32 weights take BLAS
        if w.bf16_dot:
            return Paths(_bf16_small, _bf16_small, _bf16_gemm, _bf16_gemm)
        return Paths(_half_matvec, _half_small, _half_tiles, _half_tiles)
    k = w.int_kernels
    if k is None:  # no integer kernels for this bits/group (per-channel types): generic numba kernels and BLAS
        return Paths(_generic_matvec, _generic_small, _dequantized_tiles, None)
    few = _packed_small if w.packed is not None else _int_small
    many = _int_gemm if k.gemm is not None else _dequantized_tiles
    return Paths(_int_matvec, few, many, _int_gemm if k.gemm is not None else None)


def _product(w: Weight, x: np.ndarray, prompt: bool = False) -> np.ndarray:
    """x[T, cols] @ W.T for the stored matrix alone (``prompt``: see :func:`linear`): a lookup in ``w.paths``."""
    p = w.paths
    if prompt and p.prompt is not None:
        return p.prompt(w, x)
    t = x.shape[0]
    return (p.one if t == 1 else p.few if t <= SMALL_BATCH else p.many)(w, x)


def _float(w: Weight, x: np.ndarray) -> np.ndarray:
    return kernel_call(np.matmul, x, w.f32.T)


def _half_matvec(w: Weight, x: np.ndarray) -> np.ndarray:
    y = np.empty((1, w.rows), dtype=np.float32)
    kernel_call(cpu_half.kernels()[0], y, w.h16, np.ascontiguousarray(x), w.bf16)
    return y


def _half_small(w: Weight, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], w.rows), dtype=np.float32)
    kernel_call(cpu_half.kernels()[1], y, w.h16, np.ascontiguousarray(x), w.bf16)
    return y


def _half_tiles(w: Weight, x: np.ndarray) -> np.ndarray:
    widen = cpu_half.kernels()[2]
    return _tiles(w, x, lambda buf, r0: kernel_call(widen, buf, w.h16, r0, w.bf16))


def _bf16_small(w: Weight, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], w.rows), dtype=np.float32)
    xb = kernel_call(cpu_half.round_pairs, x, False)
    kernel_call(cpu_half.bf16_kernels()[2], y, w.h16.view(np.uint32), xb)
    return y


def _bf16_gemm(w: Weight, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], w.rows), dtype=np.float32)
    xb = kernel_call(cpu_half.round_pairs, x)
    kernel_call(cpu_half.bf16_kernels()[1], y, w.h16.view(np.uint32), xb)
    return y


def _int_gemm(w: Weight, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], w.rows), dtype=np.float32)
    kernel_call(w.int_kernels.gemm, y, *w._qargs(), np.ascontiguousarray(x), w.asym)
    return y


def _packed_small(w: Weight, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], w.rows), dtype=np.float32)
    wb, sc, matmul = w.packed
    kernel_call(matmul, y, wb, sc, *w._qargs(), np.ascontiguousarray(x), w.asym)
    return y


def _int_matvec(w: Weight, x: np.ndarray) -> np.ndarray:
    y = np.empty((1, w.rows), dtype=np.float32)
    kernel_call(w.int_kernels.matvec, y[0], *w._qargs(), np.ascontiguousarray(x), w.asym)
    return y


def _int_small(w: Weight, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], w.rows), dtype=np.float32)
    kernel_call(w.int_kernels.matmul_small, y, *w._qargs(), np.ascontiguousarray(x), w.asym)
    return y


def _generic_matvec(w: Weight, x: np.ndarray) -> np.ndarray:
    y = np.empty((1, w.rows), dtype=np.float32)
    kernel_call(cpu.qmatvec, y[0], *w._qargs(), x[0], *w._rest())
    return y


def _generic_small(w: Weight, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], w.rows), dtype=np.float32)
    kernel_call(cpu.qmatmul_small, y, *w._qargs(), x, *w._rest())
    return y


def _dequantized_tiles(w: Weight, x: np.ndarray) -> np.ndarray:
    def fill(buf, r0):
        ids = np.arange(r0, r0 + buf.shape[0], dtype=np.int64)
        kernel_call(cpu.dequant_rows, buf, *w._qargs(), ids, *w._rest())

    return _tiles(w, x, fill)


def _tiles(w: Weight, x: np.ndarray, fill) -> np.ndarray:
    """x @ W.T through float32 tiles of W's rows (``fill(buf, r0)`` writes rows r0.. into buf) and BLAS."""
    y = np.empty((x.shape[0], w.rows), dtype=np.float32)
    step = max(1, TILE_ELEMS // w.cols)
    tile = np.empty((min(step, w.rows), w.cols), dtype=np.float32)
    for r0 in range(0, w.rows, step):
        buf = tile[: min(w.rows, r0 + step) - r0]
        fill(buf, r0)
        kernel_call(np.matmul, x, buf.T, y[:, r0 : r0 + buf.shape[0]])
    return y


def embed(w: Weight, ids: np.ndarray) -> np.ndarray:
    """Rows of an embedding table: [T, cols] (with extras: stored rows + low-rank rows, rotated back by Rᵀ)."""
    if w.f32 is not None:
        out = w.f32[ids]
    elif w.h16 is not None:
        rows = w.h16[np.asarray(ids, dtype=np.int64)]
        out = (rows.astype(np.uint32) << 16).view(np.float32) if w.bf16 else rows.view(np.float16).astype(np.float32)
    else:  # numpy: a few rows per pass, and a kernel less to compile on a cold start (~1 s of its first token)
        ids = np.asarray(ids, dtype=np.int64)
        parts = {"codes": w.codes[ids], "scales": w.scales[ids].view(np.float16)}
        if w.asym:
            parts["mins"] = w.mins[ids].view(np.float16)
        out = dequantize(parts, w.qtype, (len(ids), w.cols))
    if w.lr_a is not None:
        out += w.lr_b[ids] @ w.lr_a
    if w.had_d is not None:
        out = np.ascontiguousarray(out)
        kernel_call(hadamard.fwht_rows, out, w.had_d, w.had_block, True)
    return out


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    out = np.empty_like(x)
    kernel_call(cpu.rmsnorm, out, x, w, np.float32(eps))
    return out


def _room(layer, end: int) -> tuple:
    """A layer's four arrays, with room for positions up to end − 1: a LayerCache grows first (its reserve); the
    kernels would wrap a position beyond an array's rows around to row p % rows."""
    reserve = getattr(layer, "reserve", None)
    if reserve is not None:
        reserve(end)
    return tuple(layer)


def kv_write(layer, k: np.ndarray, v: np.ndarray, start: int) -> None:
    """Keys and values k, v [T, n_kv, hd] into positions start.. of one layer's cache: ``layer`` is a
    kernels.kv_cache.LayerCache or its (key data, key scales, value data, value scales) in their storage formats
    (kernels/kv_formats.py; KVCache.layer)."""
    kernel_call(cpu_kv.kv_write, *_room(layer, start + k.shape[0]), k, v, start)


def add_rmsnorm(x: np.ndarray, a: np.ndarray, w: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(x + a, rmsnorm(x + a) * w) in one kernel call."""
    xo = np.empty_like(x)
    ho = np.empty_like(x)
    kernel_call(cpu.add_rmsnorm, xo, ho, x, a, w, np.float32(eps))
    return xo, ho


def rope_qk_kv_write(q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray, layer,
                     start: int) -> None:
    """RoPE of q and of k[..., :rot] (rot = q.shape[2]; q may be the rotated part of each head) and kv_write of k, v
    into positions start.. of one layer's cache (as in kv_write), in one kernel call."""
    kernel_call(cpu_kv.rope2_kv_write, q, k, v, cos, sin, *_room(layer, start + k.shape[0]), start)


def rope_inplace(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    kernel_call(cpu.rope_inplace, x, cos, sin)


def attention(
    q: np.ndarray,
    layer: tuple,
    start: int,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    ahead=None,
    prompt: bool = False,
) -> np.ndarray:
    """Causal GQA attention over one layer's cache (as in kv_write; a pair of float32 arrays [n_kv, ctx, hd] is a
    float32 cache); window > 0 limits each query to the last ``window`` keys, softcap > 0 soft-caps the scaled
    scores (cap * tanh(s / cap)). ``ahead``: a kernels.compile_ahead.CompileAhead compiling the kernel elsewhere,
    waited for before the first call. A prompt pass (``prompt``: each query's numbers must not depend on how many
    share the pass) and any pass of several queries take the blocked prompt kernel (cpu_attention_prompt); one
    query (a decode step) the split kernel deep in the cache, else ``cpu_attention.attention``."""
    q = np.ascontiguousarray(q, dtype=np.float32)  # the kernels' SIMD loads need C-contiguous rows
    out = np.empty_like(q)
    args = (out, q, *cache_arrays(layer), start, np.float32(scale), window, np.float32(softcap))
    if prompt or q.shape[0] > 1:
        if ahead is not None:
            ahead.wait("attention_prompt")
        kernel_call(cpu_attention_prompt.kernels()[0], *args)
    elif start + 1 > DECODE_CHUNK:
        if ahead is not None:
            ahead.wait("attention_decode")
        kernel_call(cpu_attention.attention_decode, *args, DECODE_CHUNK)
    else:
        if ahead is not None:
            ahead.wait("attention")
        kernel_call(cpu_attention.attention, *args)
    return out


def _padded_layers(layers: list[tuple]) -> tuple[tuple, ...]:
    """The layers' four arrays as four tuples of SMALL_BATCH entries (cpu_attention_batch: one kernel per cache
    format whatever the batch size; the padding repeats the first layer and is not read)."""
    if not 0 < len(layers) <= SMALL_BATCH:
        raise ValueError(f"a decode pass takes 1..{SMALL_BATCH} sequences, got {len(layers)}")
    layers = [cache_arrays(lay) for lay in layers]
    layers += [layers[0]] * (SMALL_BATCH - len(layers))
    return tuple(zip(*layers))


def rope_qk_kv_write_steps(q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                           layers: list, starts: list[int]) -> None:
    """rope_qk_kv_write of row b of q, k, v at position starts[b] into layers[b] (each as in kv_write; cos and
    sin the whole tables), for every row: one decode step of several sequences in one kernel call."""
    kds, kss, vds, vss = _padded_layers([_room(layer, s + 1) for layer, s in zip(layers, starts)])
    kernel = cpu_attention_batch.kernels()[0]
    kernel_call(kernel, q, k, v, cos, sin, kds, kss, vds, vss, np.asarray(starts, dtype=np.int64), len(layers))


def attention_steps(q: np.ndarray, layers: list[tuple], starts: list[int], scale: float, window: int = 0,
                    softcap: float = 0.0) -> np.ndarray:
    """attention of row b of q [S, n_heads, hd] at position starts[b] over layers[b], for every row, in one
    kernel call; each row's numbers are a lone decode step's (cpu_attention_batch)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty_like(q)
    kds, kss, vds, vss = _padded_layers(layers)
    kernel = cpu_attention_batch.kernels()[1]
    kernel_call(kernel, out, q, kds, kss, vds, vss, np.asarray(starts, dtype=np.int64), len(layers),
                np.float32(scale), window, np.float32(softcap), DECODE_CHUNK)  # fmt: skip
    return out


def head_rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of each head of x[T, n_heads, head_dim] with one weight[head_dim] shared by the heads (q/k norm)."""
    t, nh, hd = x.shape
    return rmsnorm(np.ascontiguousarray(x).reshape(t * nh, hd), w, eps).reshape(t, nh, hd)


def silu_mul(gate: np.ndarray, up: np.ndarray, prompt: bool = False) -> np.ndarray:
    """silu(gate) * up; rows in parallel from PARALLEL_ROWS rows on, or always in a prompt pass (the two kernels
    compile the same row to different instructions: a prompt's rows must not depend on how many share the pass)."""
    out = np.empty_like(gate)
    kernel_call(cpu.silu_mul_par if prompt or gate.shape[0] >= PARALLEL_ROWS else cpu.silu_mul, out, gate, up)
    return out


def gelu_tanh_mul(gate: np.ndarray, up: np.ndarray, prompt: bool = False) -> np.ndarray:
    """gelu_tanh(gate) * up; ``prompt`` as in :func:`silu_mul`."""
    out = np.empty_like(gate)
    par = prompt or gate.shape[0] >= PARALLEL_ROWS
    kernel_call(cpu.gelu_tanh_mul_par if par else cpu.gelu_tanh_mul, out, gate, up)
    return out


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap) for x[T, n]."""
    out = np.empty_like(x)
    kernel_call(cpu.softcap, out, x, np.float32(cap))
    return out
