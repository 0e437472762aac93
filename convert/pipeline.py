"""Calibrated conversion: quantize a model layer by layer on its own activations.

The unquantized model runs in memory (:class:`calibration.FloatStore`). For each layer in turn:

1. the calibration sequences' hidden states go through the layer while :class:`calibration.LayerRecorder` records the
   input of every matrix product (``XᵀX`` per distinct input and a row sample);
2. with ``awq``, per-input-channel scales are searched on those rows and folded into the norm (or linear) that feeds
   the input, so the runtime needs nothing new;
3. each matrix is rotated (``hadamard``), rounded (``rtn``/``search``/``imatrix``/``gptq``, the Hessian rotated and
   rescaled along with the weight) and corrected (``lowrank``);
4. the quantized layer replaces the float one, and the hidden states for the next layer are computed through it, so
   later layers calibrate on the errors of earlier ones (GPTQ's sequential scheme).

The final norm and lm_head are handled the same way; the token embedding is rounded without data (its rows are
looked up, not multiplied), unless it doubles as the lm_head. Memory: the float model, the calibration hidden states
(samples × length × hidden floats), one layer's Hessians and row samples.
"""

from __future__ import annotations

import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from lowbit.convert import awq, lowrank, rotation, smoothquant
from lowbit.convert.calibration import FloatStore, LayerRecorder, record
from lowbit.convert.gptq import gptq_quantize
from lowbit.convert.hessian import PreparedHessian, prepare_hessian
from lowbit.convert.methods import Method
from lowbit.convert.progress import stage
from lowbit.convert.quantize import matrix_grid, quantize
from lowbit.formats.qtypes import QType
from lowbit.formats.reader import StoredTensor
from lowbit.kernels import blas, dispatch
from lowbit.kernels.ref import dequantize

log = logging.getLogger(__name__)

# AWQ input groups inside a layer: (what feeds the input, the linears that consume it)
NORM_GROUPS = (("attn_norm", ("attn_q", "attn_k", "attn_v")), ("attn_norm", ("attn_qkv",)),
               ("ffn_norm", ("ffn_gate", "ffn_up")), ("ffn_norm", ("ffn_gate_up",)))


# AWQ's searches score candidates on at most 2048 input rows, quantized the way they will be stored (the weighted
# search). Measured on refsmall, 4-bit g128: KL 0.00349 (70 s) against 0.00408 (30 s) when scored with
# round-to-nearest as the AWQ reference does
AWQ_SEARCH = {"max_rows": 2048}


@dataclass
class Encoded:
    """One quantized matrix: its type, stored parts, and extra float tensors (suffix -> array) stored beside it."""

    qtype: QType
    parts: dict[str, np.ndarray]
    extras: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Job:
    """One matrix on its way to the file: the weight as it will be rounded, its input statistics, its parts."""

    name: str
    qt: QType
    w: np.ndarray
    h: np.ndarray | None  # the input Hessian (rotated/rescaled with the weight), GPTQ and Hadamard only
    imp: np.ndarray | None  # per-input-column importance
    extras: dict[str, np.ndarray]
    hkey: str  # jobs with one key have one Hessian (a shared input, neither rescaled nor rotated)
    parts: dict[str, np.ndarray] | None = None


GPTQ_BLOCK_ROWS = (128, 4096)  # GPTQ row blocks: fewest rows (products stay efficient), most rows (memory)


def row_blocks(shapes: list[tuple[int, int]], workers: int,
               whole: list[bool] | None = None) -> list[tuple[int, int, int]]:
    """GPTQ work of matrices ``shapes`` as row blocks ``(matrix index, first row, end row)``, costliest first.

    A row costs ~cols^2 (every product is a row block times the Hessian); blocks aim at a third of one worker's
    share of the total, within :data:`GPTQ_BLOCK_ROWS`, so largest-first scheduling leaves the pool balanced.
    ``whole[i]``: matrix ``i`` stays one block (a per-tensor type: its one scale is chosen from every row)."""
    total = sum(r * c * c for r, c in shapes)
    target = total / (3 * max(1, workers))
    lo, hi = GPTQ_BLOCK_ROWS
    out = []
    for i, (rows, cols) in enumerate(shapes):
        step = rows if whole and whole[i] else min(hi, max(lo, -(-int(target) // (cols * cols))))
        out += [(i, r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    return sorted(out, key=lambda b: -(b[2] - b[1]) * shapes[b[0]][1] ** 2)


@dataclass
class PipelineResult:
    encoded: dict[str, Encoded]  # canonical tensor name ("blk.0.attn_q.weight") -> encoding
    floats: dict[str, np.ndarray]  # float tensors the methods changed (AWQ-folded norms), canonical name -> array
    notes: dict  # what was done, for the container header
    act_scales: dict[str, float] = field(default_factory=dict)  # smoothquant: weight name -> static int8 input scale


class Pipeline:
    def __init__(self, family, args, store: FloatStore, qtypes: dict[str, QType], method: Method, opts,
                 progress: bool = True):
        self.family = family
        self.args = args
        self.store = store
        self.qtypes = qtypes
        self.method = method
        self.opts = opts
        self.progress = progress
        self.model = family.Model(args, store, opts.calib_len)
        self.encoded: dict[str, Encoded] = {}
        self.floats: dict[str, np.ndarray] = {}
        self.awq_alphas: dict[str, float] = {}
        self.act_scales: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ driver
    def run(self, tokens: list[np.ndarray]) -> PipelineResult:
        model = self.model
        cache = model.new_cache()
        hidden = [model.embed_tokens(t) for t in tokens]
        recorder = smoothquant.ChannelMaxRecorder if self.method.smoothquant else LayerRecorder
        rec = recorder(self.opts.seed, len(tokens), full=self.method.rounding == "gptq" or self.method.hadamard)
        n = self.args.num_hidden_layers
        bar = stage("calibrate", n + 1, "layer", self.progress)
        try:
            for li in range(n):
                prefix = f"blk.{li}."
                record(model, rec, hidden, lambda h, li=li: model.block(h, model.layers[li], li, 0, cache))
                self._quantize_layer(prefix, rec)
                model.layers[li] = self._runtime_layer(prefix)
                hidden = [model.block(h, model.layers[li], li, 0, cache) for h in hidden]
                bar.update(1)
            self._quantize_head(rec, hidden)
            bar.update(1)
        finally:
            bar.close()
        self._quantize_embedding()
        notes = {"method": self.method.name}
        if self.awq_alphas:
            notes["awq_alpha"] = self.awq_alphas
        if self.method.smoothquant:
            notes["smoothquant_alpha"] = smoothquant.ALPHA
        return PipelineResult(self.encoded, self.floats, notes, self.act_scales)

    # ------------------------------------------------------------------------------------------ layers
    def _linear_names(self, prefix: str) -> list[str]:
        layer = self.model.layers[int(prefix.split(".")[1])]
        return [k for k, v in layer.items() if isinstance(v, dispatch.Weight)]

    def _quantize_layer(self, prefix: str, rec: LayerRecorder) -> None:
        names = self._linear_names(prefix)
        scales: dict[str, np.ndarray] = {}  # linear -> input scale s (its input became x / s)
        if self.method.awq:
            scales = self._awq_layer(prefix, names, rec)
        elif self.method.smoothquant:
            scales = smoothquant.migrate_layer(self, prefix, names, rec, NORM_GROUPS)
        self._encode_all([(f"{prefix}{short}.weight", scales.get(short)) for short in names], rec)

    def _awq_layer(self, prefix: str, names: list[str], rec: LayerRecorder) -> dict[str, np.ndarray]:
        """Search AWQ scales for each input group of the layer, fold them, return linear -> s."""
        found: dict[str, np.ndarray] = {}
        groups = [(src, [c for c in cons if c in names]) for src, cons in NORM_GROUPS]
        groups = [(src, cons) for src, cons in groups if cons and all(c in names for c in cons)]
        if "ffn_up" in names and "ffn_down" in names:
            groups.append(("ffn_up", ["ffn_down"]))
        a = self.args
        heads = dict(n_heads=a.num_attention_heads, n_kv_heads=a.num_key_value_heads, head_dim=a.head_dim)
        if "attn_v" in names and "attn_output" in names:
            groups.append(("attn_v", ["attn_output"]))
        for src, cons in groups:
            ws = [self.store.arrays[f"{prefix}{c}.weight"] for c in cons]
            qt = self.qtypes[f"{prefix}{cons[0]}.weight"]
            if qt.is_float:
                continue
            # o_proj's input channels can only be scaled as v's output channels are (GQA: shared by query heads)
            tie = partial(awq.tie_gqa, **heads) if src == "attn_v" else None
            s, alpha, _ = awq.awq_scales(ws, rec.rows(f"{prefix}{cons[0]}.weight"), qt, tie=tie, **AWQ_SEARCH)
            self.awq_alphas[f"{prefix}{cons[0]}"] = round(float(alpha), 3)
            src_name = f"{prefix}{src}.weight"
            if src == "attn_v":
                bias_name = f"{prefix}attn_v.bias"
                fold = awq.fold_v_into_o(self.store.arrays[src_name], s, v_bias=self.store.arrays.get(bias_name),
                                         **heads)
                self.store.arrays[src_name] = fold.v_weight.astype(np.float32)
                if fold.v_bias is not None:
                    self.floats[bias_name] = self.store.arrays[bias_name] = fold.v_bias.astype(np.float32)
                s = fold.o_scale
            elif src.endswith("norm"):
                new = awq.fold_into_norm(self.store.arrays[src_name], s, offset=self.model.NORM_OFFSET)
                self.floats[src_name] = self.store.arrays[src_name] = new.astype(np.float32)
            else:
                bias_name = f"{prefix}{src}.bias"
                w, b = awq.fold_into_rows(self.store.arrays[src_name], s, self.store.arrays.get(bias_name))
                self.store.arrays[src_name] = w.astype(np.float32)
                if b is not None:
                    self.floats[bias_name] = self.store.arrays[bias_name] = b.astype(np.float32)
            for c in cons:
                cname = f"{prefix}{c}.weight"
                self.store.arrays[cname] = awq.scale_columns(self.store.arrays[cname], s).astype(np.float32)
                found[c] = s
        return found

    def _runtime_layer(self, prefix: str) -> dict:
        """The layer's runtime dict with the quantized weights (and any folded norms) in place."""
        layer = self.model.load_layer(prefix)  # floats (norms, biases) as they are now in the store
        for short, w in list(layer.items()):
            if isinstance(w, dispatch.Weight):
                layer[short] = self._runtime_weight(f"{prefix}{short}.weight", w.bias)
        return layer

    def _runtime_weight(self, name: str, bias: np.ndarray | None) -> dispatch.Weight:
        enc = self.encoded[name]
        shape = tuple(self.store.arrays[name].shape)
        w = dispatch.Weight(StoredTensor(name, enc.qtype, shape, enc.parts), bias, **_weight_extras(enc.extras))
        return dispatch.exact_activations(w)  # the same file from every CPU

    # ------------------------------------------------------------------------------------------ matrices
    def _encode_all(self, items: list[tuple[str, np.ndarray | None]], rec: LayerRecorder | None) -> None:
        """Encode the matrices ``[(name, AWQ input scale or None)]`` on a pool of threads, BLAS on one thread each
        (numpy's, BLAS's and the numba sweep's work release the GIL). GPTQ's work is cut into row blocks of similar
        cost, largest first, so the pool stays busy to the end (a layer's ffn_down alone is ~60% of it); matrices
        reading the same input (q/k/v, gate/up) share one :class:`PreparedHessian`, whose O(cols^3) factorisation
        runs before, on every BLAS thread."""
        workers = max(1, len(os.sched_getaffinity(0)))
        with ThreadPoolExecutor(max_workers=workers) as pool, blas.one_thread():
            jobs = [j for j in pool.map(lambda it: self._job(it[0], rec, it[1]), items) if j is not None]
        gptq = [j for j in jobs if j.h is not None and self.method.rounding == "gptq"]
        prepared: dict[str, PreparedHessian] = {}
        for j in gptq:
            if j.hkey not in prepared:
                prepared[j.hkey] = prepare_hessian(j.h)
            j.h = None
        blocks = row_blocks([j.w.shape for j in gptq], workers, [j.qt.per_tensor for j in gptq])
        # a coded-scale type's blocks share the whole matrix's scale grid
        grids = [matrix_grid(j.w, j.qt) if j.qt.coded_scales else None for j in gptq]
        with ThreadPoolExecutor(max_workers=workers) as pool, blas.one_thread():
            done = pool.map(lambda b: gptq_quantize(gptq[b[0]].w[b[1]:b[2]], prepared[gptq[b[0]].hkey], gptq[b[0]].qt,
                                                    importance=gptq[b[0]].imp, grid=grids[b[0]]), blocks)
            by_job: dict[int, list] = {}
            for (i, _, _), parts in sorted(zip(blocks, done), key=lambda bp: bp[0][:2]):
                by_job.setdefault(i, []).append(parts)
            for i, j in enumerate(gptq):
                j.parts = {k: np.concatenate([p[k] for p in by_job[i]]) for k in by_job[i][0] if k != "grid"}
                if grids[i] is not None:
                    j.parts["grid"] = grids[i]
            prepared.clear()
            list(pool.map(self._finish, jobs))

    def _job(self, name: str, rec: LayerRecorder | None, awq_scale: np.ndarray | None) -> _Job | None:
        """The weight as it will be rounded (rotated with ``hadamard``) and its input statistics."""
        qt = self.qtypes[name]
        w = self.store.arrays[name]
        if qt.is_float:
            return None
        m = self.method
        h = imp = None
        hkey = name
        if rec is not None and m.calibrated:
            inv = None if awq_scale is None else 1.0 / awq_scale.astype(np.float64)  # the input is now x / s
            if rec.full:
                h = rec.hessian(name)
                if inv is not None:
                    h = h * inv[:, None] * inv[None, :]
                else:
                    hkey = rec.key(name)  # the same input's Hessian, as it was recorded
            else:
                imp = rec.importance(name) * (1.0 if inv is None else inv * inv)
        extras: dict[str, np.ndarray] = {}
        if m.hadamard and h is not None:
            w, signs = rotation.rotate_weight(w, _tensor_seed(self.opts.seed, name))
            h = rotation.rotate_hessian(h, signs)
            extras["had"] = signs
            hkey = name
        if h is not None:
            imp = np.diag(h)
        if imp is not None:
            imp = imp.astype(np.float32)
        if m.awq and awq_scale is not None and m.rounding != "gptq":
            w = awq.awq_clip(w, rec.rows(name) / awq_scale, qt, **AWQ_SEARCH)
        return _Job(name, qt, w, h, imp, extras, hkey)

    def _finish(self, job: _Job) -> None:
        """Round (unless GPTQ's row blocks did), add the low-rank correction, store the encoding."""
        m, qt, w, imp = self.method, job.qt, job.w, job.imp
        parts = job.parts
        if parts is None and m.rounding == "imatrix" and imp is not None:
            parts = quantize(w, qt, "search", importance=imp)
        elif parts is None:
            parts = quantize(w, qt, "rtn" if m.rounding == "rtn" else "search")
        if m.lowrank and imp is not None and self.opts.lowrank_bpw > 0:
            w_hat = dequantize(parts, qt, w.shape)
            act = np.sqrt(np.maximum(imp, 0.0)).astype(np.float32)
            rank = lowrank.rank_for_budget(w.shape, self.opts.lowrank_bpw)
            if rank > 0:
                a, b = lowrank.lowrank_correction(w, w_hat, rank=rank, act_scale=act)
                job.extras["lr_a"], job.extras["lr_b"] = a, b
        self.encoded[job.name] = Encoded(qt, parts, job.extras)

    # ------------------------------------------------------------------------------------------ head, embedding
    def _quantize_head(self, rec: LayerRecorder, hidden: list[np.ndarray]) -> None:
        model = self.model
        name = "output.weight" if "output.weight" in self.store else "token_embd.weight"
        # the head's input is all calibration needs: no logits (a 1B model's would be ~9 TFLOP of the conversion)
        record(model, rec, hidden, lambda h: rec.observe(model.lm_head.name, model.head_input(h)))
        scale = None
        if self.method.awq and name == "output.weight" and not self.qtypes[name].is_float:
            s, alpha, _ = awq.awq_scales([self.store.arrays[name]], rec.rows(name), self.qtypes[name], **AWQ_SEARCH)
            self.awq_alphas["output"] = round(float(alpha), 3)
            new = awq.fold_into_norm(self.store.arrays["output_norm.weight"], s, offset=model.NORM_OFFSET)
            self.floats["output_norm.weight"] = self.store.arrays["output_norm.weight"] = new.astype(np.float32)
            self.store.arrays[name] = awq.scale_columns(self.store.arrays[name], s).astype(np.float32)
            scale = s
        elif self.method.smoothquant:
            scale = smoothquant.migrate_head(self, name, rec)
        self._encode_all([(name, scale)], rec)

    def _quantize_embedding(self) -> None:
        name = "token_embd.weight"
        if name in self.encoded or self.qtypes[name].is_float:
            return
        rounding = "rtn" if self.method.rounding == "rtn" else "search"
        self.encoded[name] = Encoded(self.qtypes[name], quantize(self.store.arrays[name], self.qtypes[name], rounding))


def _tensor_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF


def _weight_extras(extras: dict[str, np.ndarray]) -> dict:
    out = {}
    if "had" in extras:
        out["had_signs"] = extras["had"]
    if "lr_a" in extras:
        out["lr_a"], out["lr_b"] = extras["lr_a"], extras["lr_b"]
    return out
