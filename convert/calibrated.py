"""The calibrated conversion path: load the model as float, pick calibration text, (mixed precision: choose each
tensor's type), run :class:`pipeline.Pipeline`, write the container with the methods' extra tensors."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from lowbit.convert import converter
from lowbit.convert.calibration import FloatStore, file_tokens, sampled_tokens
from lowbit.convert.pipeline import Pipeline
from lowbit.convert.progress import stage
from lowbit.convert.source import to_f32
from lowbit.errors import LowbitError
from lowbit.formats.qtypes import get_qtype
from lowbit.formats.tokenizer import Tokenizer
from lowbit.formats.writer import ContainerWriter, TensorPlan

log = logging.getLogger(__name__)

EXTRA_QTYPE = "f16"  # low-rank factors and rotation signs are stored as float16 tensors


def extra_name(weight_name: str, suffix: str) -> str:
    """``blk.0.attn_q.weight`` + ``lr_a`` -> ``blk.0.attn_q.lr_a``."""
    return f"{weight_name.removesuffix('.weight')}.{suffix}"


def load_store(job) -> FloatStore:
    return FloatStore({canon: to_f32(*job.ckpt.raw(hf)) for canon, hf in job.hf_of.items()})


def calibration_tokens(job, opts, store: FloatStore) -> tuple[list[np.ndarray], dict]:
    tok = Tokenizer(job.tok_meta, job.tok_blobs)
    if opts.calib is not None:
        tokens = file_tokens(opts.calib, tok, opts.calib_samples, opts.calib_len)
        info = {"source": Path(opts.calib).name, "samples": len(tokens), "length": opts.calib_len}
        log.info("calibration: %d sequences of %d tokens from %s", len(tokens), opts.calib_len, opts.calib)
    else:
        model = job.family.Model(job.args, store, opts.calib_len)
        tokens = sampled_tokens(model, tok, opts.calib_samples, opts.calib_len, opts.seed)
        info = {"source": "sampled from the unquantized model", "samples": len(tokens), "length": opts.calib_len,
                "seed": opts.seed}
        log.info("calibration: %d sequences of %d tokens sampled from the unquantized model (seed %d)",
                 len(tokens), opts.calib_len, opts.seed)
    return tokens, info


def convert_calibrated(job, opts, out: Path, t0: float, progress: bool) -> Path:
    store = load_store(job)
    tokens, calib_info = calibration_tokens(job, opts, store)
    qtypes = {p.name: p.qtype for p in job.plans}
    quant = job.meta["quantization"]
    if opts.target_bpw is not None or opts.max_size is not None:
        from lowbit.convert.mixed import allocate

        qtypes, mixed_info = allocate(job, opts, store, tokens, qtypes, progress)
        quant["mixed"] = mixed_info
    if all(qt.is_float for name, qt in qtypes.items() if name in store and store.arrays[name].ndim == 2):
        raise LowbitError("nothing to quantize: every matrix is kept as float")
    result = Pipeline(job.family, job.args, store, qtypes, job.method, opts, progress).run(tokens)
    plans: list[TensorPlan] = []
    for p in job.plans:
        enc = result.encoded.get(p.name)
        plans.append(TensorPlan(p.name, enc.qtype if enc is not None else qtypes[p.name], p.shape))
        if enc is not None:
            for suffix, arr in enc.extras.items():
                plans.append(TensorPlan(extra_name(p.name, suffix), get_qtype(EXTRA_QTYPE), tuple(arr.shape)))
    for name in result.act_scales:  # smoothquant's static activation scales: one float32 each
        plans.append(TensorPlan(extra_name(name, "act_scale"), get_qtype("f32"), (1,)))
    quant["method"] = job.method.name
    quant["calibration"] = calib_info
    quant.update({k: v for k, v in result.notes.items() if k != "method"})
    recipe = {p.name: qtypes[p.name].name for p in job.plans}  # the model's tensors; extras are not in recipes
    recipe.update({name: enc.qtype.name for name, enc in result.encoded.items()})
    quant["recipe"] = recipe
    with ContainerWriter(out, job.meta, plans, job.tok_blobs) as writer:
        bar = stage("write", len(job.plans), "tensor", progress, job.plans)
        for p in bar:
            enc = result.encoded.get(p.name)
            if enc is None:
                arr = result.floats.get(p.name)
                if arr is not None:
                    writer.write_tensor(p.name, _float_parts(arr, qtypes[p.name]))
                else:
                    dtype, raw = job.ckpt.raw(job.hf_of[p.name])
                    writer.write_tensor(p.name, converter.encode_tensor(raw, dtype, qtypes[p.name], "rtn"))
                continue
            writer.write_tensor(p.name, enc.parts)
            for suffix, arr in enc.extras.items():
                writer.write_tensor(extra_name(p.name, suffix), {"data": np.asarray(arr, dtype=np.float16)})
        for name, scale in result.act_scales.items():
            writer.write_tensor(extra_name(name, "act_scale"), {"data": np.array([scale], dtype=np.float32)})
        writer.meta["provenance"]["convert_seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _float_parts(arr: np.ndarray, qt) -> dict[str, np.ndarray]:
    """A float tensor changed by a method (e.g. an AWQ-folded norm), in its planned float type (bf16 -> f32)."""
    if qt.name == "f16":
        return {"data": arr.astype(np.float16)}
    if qt.name == "bf16":
        raise LowbitError("internal: a changed tensor cannot be written back as bf16")
    return {"data": arr.astype(np.float32)}
