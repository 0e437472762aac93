"""Mixed precision: choose each tensor's quant type to fit a size budget (``--target-bpw`` or ``--max-size``).

Sensitivity is measured, not guessed:

1. every quantizable matrix is quantized (imatrix-weighted search) at each type of :data:`LADDER`, and its output
   error on the calibration activations is computed, ``e_t(q) = tr(E H Eᵀ)`` with ``E = W − Ŵ`` and ``H = XᵀX/n`` the
   layer input's second moment (for the token embedding: the squared error of the rows, weighted by how often
   calibration text uses each token);
2. the unquantized model's next-token distributions on a few calibration sequences give each tensor's KL divergence
   ``KL_t`` with only tensor ``t`` quantized at the cheapest type; divided by ``e_t`` at that type, it turns the error
   proxy into a predicted ΔKL at every type, ``ΔKL_t(q) = KL_t / e_t(cheapest) · e_t(q)``. ``KL_t`` is estimated,
   not run tensor by tensor to the logits (that took ~20 min for SmolLM2-135M on two cores): per layer, one forward
   to the logits with all the layer's matrices at their cheapest types gives the KL per squared error of the
   layer's output (the residual stream), ``c_l = KL_l / |δ_l|²``; each tensor alone then needs one pass through its
   own layer, ``KL_t ≈ c_l · |δ_t|²``. The matrices that read the final hidden state (the lm_head, an embedding tied
   to it) are measured directly;
3. a greedy allocation starts every tensor at the cheapest type and repeatedly takes the upgrade with the largest
   predicted ΔKL saved per extra byte that still fits, until none does (predicted ΔKLs are treated as additive).

``--target-bpw`` counts every tensor's bytes (norms and other float tensors included) per weight, as ``lowbit
inspect`` does; ``--max-size`` is the whole file: the tensors get what the preamble, header, tokenizer and alignment
leave (:func:`file_overhead`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lowbit.convert import lowrank
from lowbit.convert.calibration import LayerRecorder, record
from lowbit.convert.progress import stage
from lowbit.convert.quantize import quantize_search
from lowbit.errors import LowbitError
from lowbit.formats.qtypes import PER_CHANNEL, QType, get_qtype, quant_type
from lowbit.formats.reader import StoredTensor
from lowbit.formats.writer import planned_size
from lowbit.kernels import dispatch
from lowbit.kernels.ref import dequantize, log_softmax

log = logging.getLogger(__name__)

# candidate types, cheapest first (bits per weight: 2.25, 2.5, 3.25, 3.5, 4.25, 4.5, 5.5, 6.5, 8.25)
LADDER = ("q2a_g128", "q2a_g64", "q3a_g128", "q3a_g64", "q4a_g128", "q4a_g64", "q5a_g64", "q6a_g64", "q8_g64")
# 8-bit coded scales (the default with a budget): the same bit-widths, groups of 64 and 32 (2.25, 2.5, 3.25, 3.5, 4.25,
# 4.5, 5.5 bits), so a group of 32 costs what a group of 64 did with float16 scales; 6 and 8 bits keep float16 scales
# (6.5, 8.25). On SmolLM2-135M with GPTQ, KL at 4.5 / 3.5 / 2.75 bpw: 0.032 / 0.26 / 0.85 against LADDER's
# 0.087 / 0.375 / 1.085 (README)
S8_LADDER = ("q2a_g64s8", "q2a_g32s8", "q3a_g64s8", "q3a_g32s8", "q4a_g64s8", "q4a_g32s8", "q5a_g32s8", "q6a_g64",
             "q8_g64")
# --gguf-compatible: the types GGUF holds exactly at their own size (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: 4.5 to 8.5 bits)
GGUF_LADDER = ("q4_g32", "q4a_g32", "q5_g32", "q5a_g32", "q8_g32")
# calibration tokens (whole sequences, at least one, spread over the calibration set) for the error proxies and for
# the KL estimates: a quarter and a thirty-second of the default 64 x 256, so that a budgeted conversion of SmolLM2-135M
# takes minutes (the quantization pass that follows uses every sequence)
SENSITIVITY_TOKENS = 4096
KL_TOKENS = 512
# scale candidates per group of the search behind the error proxies (the conversion's own search tries 20)
PROXY_CANDIDATES = 8
# header bytes a tensor's entry may gain when the allocation changes its type (a longer name, a mins part, more
# digits), plus the alignment padding its parts may add: so that the file fits --max-size whatever is chosen
MARGIN_PER_TENSOR = 256


def file_overhead(meta: dict, plans, blobs: dict[str, bytes]) -> int:
    """Bytes of a container beyond its tensor data (preamble, header, tokenizer, alignment) for the tensors of
    ``plans`` at any types: the planned file's, plus :data:`MARGIN_PER_TENSOR` per tensor."""
    data = sum(p.qtype.nbytes(p.shape) for p in plans)
    return planned_size(meta, plans, blobs) - data + MARGIN_PER_TENSOR * len(plans)


def tensor_budget(opts, params: int, overhead: int) -> float:
    """Bytes the tensors may take: --target-bpw of every weight, or --max-size less the file's overhead."""
    return opts.max_size - overhead if opts.max_size is not None else opts.target_bpw * params / 8.0


def extras_size(method, opts, shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(bytes, tensors) of the extra float16 tensors ``method`` stores beside the matrices of ``shapes``: a
    rotation's signs (one per input column) and low-rank factors. The calibrated pipeline makes them for every matrix
    it multiplies with (not for an embedding that is only looked up, unless it doubles as the lm_head)."""
    head = "output.weight" if "output.weight" in shapes else "token_embd.weight"
    size = count = 0
    for n, (rows, cols) in shapes.items():
        if n == "token_embd.weight" and head != n:
            continue
        if method.hadamard:
            size, count = size + 2 * cols, count + 1
        rank = lowrank.rank_for_budget((rows, cols), opts.lowrank_bpw) if method.lowrank else 0
        if rank > 0:
            size, count = size + 2 * rank * (rows + cols), count + 2
    return size, count


def allocate(job, opts, store, tokens: list[np.ndarray], qtypes: dict[str, QType], progress: bool):
    """(new qtypes, info for the header) for the budget in ``opts``."""
    model = job.family.Model(job.args, store, opts.calib_len)
    names = [n for n, qt in qtypes.items() if not qt.is_float and store.arrays[n].ndim == 2]
    if opts.recipe is not None:
        log.info("--recipe given with a budget: the recipe's types are replaced by the allocation")
    ladder = ladder_names(opts)
    ladders = {n: ladder_for(store.arrays[n].shape, ladder) for n in names}
    errors, cheapest = _errors(model, store, spread(tokens, SENSITIVITY_TOKENS), ladders, opts.seed, progress)
    kl = _kl_at_cheapest(model, cheapest, spread(tokens, KL_TOKENS), progress)
    fixed = sum(qt.nbytes(store.arrays[n].shape) for n, qt in qtypes.items() if n not in ladders)
    params = sum(int(a.size) for a in store.arrays.values())
    overhead = file_overhead(job.meta, job.plans, job.tok_blobs)
    extra, n_extra = extras_size(job.method, opts, {n: store.arrays[n].shape for n in names})
    budget = tensor_budget(opts, params, overhead + MARGIN_PER_TENSOR * n_extra)
    fixed += extra  # the method's extra tensors (rotation signs, low-rank factors) come out of the budget too
    chosen = _greedy(ladders, errors, kl, {n: store.arrays[n].shape for n in names}, budget - fixed)
    out = dict(qtypes)
    out.update(chosen)
    total = fixed + sum(out[n].nbytes(store.arrays[n].shape) for n in names)
    info = {
        "budget_bytes": int(budget),  # of tensor data
        **({"max_size": int(opts.max_size)} if opts.max_size is not None else {"target_bpw": opts.target_bpw}),
        "bytes": int(total),
        "bpw": round(total * 8 / params, 4),
        "predicted_kl": round(float(sum(_pred(kl, errors, n, ladders[n].index(out[n])) for n in names)), 6),
        "ladder": list(ladder),
    }
    log.info("mixed precision: %.4f bits/weight (budget %.4f), predicted KL %.5f", info["bpw"],
             budget * 8 / params, info["predicted_kl"])
    if log.isEnabledFor(logging.INFO):  # -v: the largest predicted contributors
        pred = {n: _pred(kl, errors, n, ladders[n].index(out[n])) for n in names}
        for n in sorted(pred, key=pred.get, reverse=True)[:8]:
            log.info("  %s %s: predicted KL %.5f (at each type: %s)", n, out[n].name, pred[n],
                      " ".join(f"{q.name}={_pred(kl, errors, n, i):.4f}" for i, q in enumerate(ladders[n])))
    return out, info


def spread(tokens: list[np.ndarray], n_tokens: int) -> list[np.ndarray]:
    """Whole sequences of ``tokens``, evenly spaced, about ``n_tokens`` tokens in all (at least one sequence)."""
    n = min(len(tokens), max(1, n_tokens // max(1, len(tokens[0]))))
    return [tokens[i] for i in np.linspace(0, len(tokens) - 1, n).round().astype(int)]


def check_budget(plans, opts, overhead: int = 0) -> None:
    """Refuse at once a budget that even the cheapest candidate types cannot meet (before any calibration);
    ``overhead``: the file's bytes beyond its tensors (:func:`file_overhead`)."""
    params = sum(int(np.prod(p.shape, dtype=np.int64)) for p in plans)
    budget = tensor_budget(opts, params, overhead)
    least = 0
    for p in plans:
        matrix = not p.qtype.is_float and len(p.shape) == 2
        cheapest = ladder_for(p.shape, ladder_names(opts))[0] if matrix else p.qtype
        least += cheapest.nbytes(p.shape)
    if least > budget:
        if opts.max_size is not None:
            raise LowbitError(f"--max-size {opts.max_size}: a file this small cannot be made; with the cheapest types "
                              f"it takes {least + overhead:,} bytes ({least:,} of tensors, {overhead:,} of header, "
                              f"tokenizer and alignment)")
        raise LowbitError(f"--target-bpw {opts.target_bpw}: the budget of {budget:,.0f} bytes of tensors cannot be "
                          f"met; the cheapest types need {least:,} bytes ({least * 8 / params:.3f} bits per weight)")


def ladder_names(opts) -> tuple[str, ...]:
    """The candidate types for the options: :data:`GGUF_LADDER`, :data:`S8_LADDER` or :data:`LADDER`."""
    if opts.gguf_compatible:
        return GGUF_LADDER
    return S8_LADDER if opts.scale_width == 8 else LADDER


def ladder_for(shape: tuple[int, ...], ladder: tuple[str, ...] = LADDER) -> list[QType]:
    """The ``ladder`` (:data:`LADDER` or :data:`GGUF_LADDER`) for a matrix of ``shape``: a group size the columns do
    not divide falls back to the next smaller one (then per-channel), as plain conversion does; cheapest first,
    without repeats."""
    out: dict[str, QType] = {}
    for name in ladder:
        qt = get_qtype(name)
        for g in [g for g in (128, 64, 32) if g <= qt.group_size] + [PER_CHANNEL]:
            cand = quant_type(qt.bits, g, qt.asym, qt.scale_bits if g != PER_CHANNEL else 16)
            if cand.check_shape(shape) is None:
                out.setdefault(cand.name, cand)
                break
    if not out:
        raise LowbitError(f"no candidate type fits a matrix of shape {tuple(shape)}")
    return sorted(out.values(), key=lambda q: q.nbytes(shape))


def _pred(kl: dict, errors: dict, name: str, i: int) -> float:
    e0 = errors[name][0]
    return 0.0 if e0 <= 0 else kl[name] * errors[name][i] / e0


def _greedy(ladders, errors, kl, shapes, budget: float) -> dict[str, QType]:
    level = {n: 0 for n in ladders}
    cost = {n: [qt.nbytes(shapes[n]) for qt in lad] for n, lad in ladders.items()}
    used = sum(cost[n][0] for n in ladders)
    if used > budget:
        raise LowbitError(
            f"the budget is too small: the cheapest types need {used + 0:.0f} bytes for the matrices, "
            f"{budget:.0f} are left after the float tensors"
        )
    while True:
        best = None
        for n, lad in ladders.items():
            i = level[n]
            now = _pred(kl, errors, n, i)
            for j in range(i + 1, len(lad)):
                extra = cost[n][j] - cost[n][i]
                if used + extra > budget or extra <= 0:
                    continue
                gain = (now - _pred(kl, errors, n, j)) / extra
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, n, j, extra)
        if best is None:
            break
        _, n, j, extra = best
        level[n] = j
        used += extra
    return {n: ladders[n][level[n]] for n in ladders}


def _errors(model, store, tokens, ladders, seed: int, progress: bool):
    """(e_t(q) for every tensor and ladder type, each tensor at its cheapest type as stored), layer by layer on the
    unquantized model's activations. The quantizations of a layer run on a pool of threads (numpy's work releases
    the GIL)."""
    errors: dict[str, list[float]] = {}
    cheapest: dict[str, StoredTensor] = {}
    cache = model.new_cache()
    hidden = [model.embed_tokens(t) for t in tokens]
    rec = LayerRecorder(seed, len(tokens))
    n_layers = len(model.layers)
    bar = stage("sensitivity", n_layers + 2, "layer", progress)

    def measure(pool, jobs: dict[str, tuple]) -> None:
        """jobs: name -> (error function, its second argument); every type of each name's ladder, in the pool."""
        futures = {(n, i): pool.submit(fn, store.arrays[n], arg, qt)
                   for n, (fn, arg) in jobs.items() for i, qt in enumerate(ladders[n])}
        for n in jobs:
            errors[n] = [futures[n, i].result()[0] for i in range(len(ladders[n]))]
            w = store.arrays[n]
            cheapest[n] = StoredTensor(n, ladders[n][0], tuple(w.shape), futures[n, 0].result()[1])

    try:
        with ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
            for li in range(n_layers):
                # one pass records the layer's inputs and computes the next layer's (the float model does not change)
                hidden = record(model, rec, hidden, lambda h, li=li: model.block(h, model.layers[li], li, 0, cache),
                                True)
                measure(pool, {n: (_tensor_error, rec.hessian(n)) for n in ladders if n.startswith(f"blk.{li}.")})
                bar.update(1)
            record(model, rec, hidden, model.head)
            head = model.lm_head.name
            if head in ladders:
                measure(pool, {head: (_tensor_error, rec.hessian(head))})
            bar.update(1)
            emb = "token_embd.weight"
            if emb in ladders and emb not in errors:
                counts = np.bincount(np.concatenate(tokens), minlength=store.arrays[emb].shape[0]).astype(np.float64)
                measure(pool, {emb: (_row_error, counts / max(counts.sum(), 1.0))})
            bar.update(1)
    finally:
        bar.close()
    return errors, cheapest


def _tensor_error(w: np.ndarray, h: np.ndarray, qt: QType) -> tuple[float, dict]:
    """(tr(E H Eᵀ), the parts) for w quantized to qt by the search weighted by H's diagonal."""
    parts = quantize_search(w, qt, importance=np.diag(h).astype(np.float32), n_candidates=PROXY_CANDIDATES)
    e = (w - dequantize(parts, qt, w.shape)).astype(np.float32)
    # float32 products: half the time of float64, and the ratios need no more
    return float(np.einsum("ij,ij->", e @ h.astype(np.float32), e, dtype=np.float64)), parts


def _row_error(w: np.ndarray, freq: np.ndarray, qt: QType) -> tuple[float, dict]:
    """(the squared error of the rows weighted by how often each is looked up, the parts) for an embedding."""
    parts = quantize_search(w, qt, n_candidates=PROXY_CANDIDATES)
    e = (w - dequantize(parts, qt, w.shape)).astype(np.float64)
    return float(freq @ np.einsum("ij,ij->i", e, e)), parts


def _kl_at_cheapest(model, cheapest: dict[str, StoredTensor], tokens, progress: bool) -> dict[str, float]:
    """Estimated mean KL(float ‖ model with only tensor t at its cheapest type, ``cheapest[t]``) over the scored
    positions of ``tokens`` (module docstring, step 2)."""
    cache = model.new_cache()
    n_layers = len(model.layers)
    # inputs of every layer for the unquantized model: a tensor of layer i only changes what follows layer i
    inputs = [[model.embed_tokens(t) for t in tokens]]
    for li in range(n_layers):
        inputs.append([model.block(h, model.layers[li], li, 0, cache) for h in inputs[-1]])
    ref = [log_softmax(model.head(h).astype(np.float64)) for h in inputs[-1]]

    def kl_from(first: int, hidden: list[np.ndarray]) -> float:
        kls = []
        for k, h in enumerate(hidden):
            for li in range(first, n_layers):
                h = model.block(h, model.layers[li], li, 0, cache)
            q = log_softmax(model.head(h).astype(np.float64))
            kls.append(np.sum(np.exp(ref[k]) * (ref[k] - q), axis=1))
        return float(np.mean(np.concatenate(kls)))

    def layer_out(li: int) -> list[np.ndarray]:
        return [model.block(h, model.layers[li], li, 0, cache) for h in inputs[li]]

    def sq_error(outs: list[np.ndarray], li: int) -> float:
        return float(sum(np.sum(np.square(o - r, dtype=np.float64)) for o, r in zip(outs, inputs[li + 1])))

    by_layer: dict[int, list[str]] = {}
    for n in cheapest:
        if n.startswith("blk."):
            by_layer.setdefault(int(n.split(".")[1]), []).append(n)
    out: dict[str, float] = {}
    bar = stage("sensitivity KL", len(cheapest), "tensor", progress)
    try:
        for li, names in sorted(by_layer.items()):
            stored = {n: cheapest[n] for n in names}
            with _swapped(model, stored):
                outs = layer_out(li)
                kl_layer, err_layer = kl_from(li + 1, outs), sq_error(outs, li)
            per_err = kl_layer / err_layer if err_layer > 0 else 0.0
            for n in names:
                with _swapped(model, {n: stored[n]}):
                    out[n] = per_err * sq_error(layer_out(li), li)
            bar.update(len(names))
        for n in [n for n in cheapest if not n.startswith("blk.")]:  # lm_head, embeddings: measured directly
            with _swapped(model, {n: cheapest[n]}):
                if n == "token_embd.weight":
                    out[n] = kl_from(0, [model.embed_tokens(t) for t in tokens])
                else:
                    out[n] = kl_from(n_layers, inputs[-1])
            bar.update(1)
    finally:
        bar.close()
    return out


class _swapped:
    """Temporarily replace weights of the model (every place each is used) by quantized ones: name -> stored."""

    def __init__(self, model, stored: dict[str, StoredTensor]):
        self.model, self.stored = model, stored
        self.saved: list[tuple[object, str, dispatch.Weight]] = []

    def __enter__(self):
        for holder, key, w in _weight_slots(self.model):
            st = self.stored.get(w.name)
            if st is not None:
                self.saved.append((holder, key, w))
                new = dispatch.exact_activations(dispatch.Weight(st, w.bias))  # host-independent choice
                if isinstance(holder, dict):
                    holder[key] = new
                else:
                    setattr(holder, key, new)
        return self

    def __exit__(self, *exc):
        for holder, key, w in self.saved:
            if isinstance(holder, dict):
                holder[key] = w
            else:
                setattr(holder, key, w)


def _weight_slots(model):
    for attr in ("embed", "lm_head"):
        yield model, attr, getattr(model, attr)
    for layer in model.layers:
        for k, v in layer.items():
            if isinstance(v, dispatch.Weight):
                yield layer, k, v
