"""`lowbit convert`: HF checkpoint -> .lowbit container, one tensor at a time."""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import lowbit
from lowbit.convert.quantize import quantize
from lowbit.convert.source import Checkpoint, read_json, resolve_source, to_f32
from lowbit.errors import LowbitError, SourceError
from lowbit.formats.qtypes import GROUP_SIZES, PER_CHANNEL, QUANT_BITS, QType, get_qtype, quant_type
from lowbit.formats.writer import ContainerWriter, TensorPlan
from lowbit.models import family_for
from lowbit.runtime.tokenizer import read_tokenizer_source

log = logging.getLogger(__name__)

FLOAT_BITS = 16  # --bits 16: keep every weight in its source float type
ST_TO_QTYPE = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f32"}
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")
_BITS_CHOICES = ", ".join(map(str, QUANT_BITS))


@dataclass(frozen=True)
class ConvertOptions:
    bits: int = 4
    group_size: int = 64
    asym: bool | None = None  # None: asymmetric below 8 bits, symmetric at 8
    embed_bits: int | None = None  # None: 8, or 16 when --bits 16
    # "+"-joined method steps (convert/methods.py): rtn | search | imatrix | awq | gptq | hadamard | lowrank,
    # e.g. "search", "awq+gptq", "hadamard+gptq+lowrank". Steps other than rtn/search need calibration data.
    method: str = "search"
    calib: str | None = None  # calibration text file; None: text sampled from the unquantized model (seed below)
    calib_samples: int = 64  # calibration sequences
    calib_len: int = 256  # tokens per calibration sequence
    seed: int = 0
    lowrank_bpw: float = 0.0  # extra bits per weight spent on low-rank correction (method step "lowrank")
    target_bpw: float | None = None  # mixed precision: choose per-tensor types to fit this many bits per weight
    max_size: int | None = None  # mixed precision: ... or this many bytes of tensors
    recipe: str | None = None  # a saved recipe (JSON: tensor name -> quant type) to reuse

    def validate(self) -> None:
        if self.bits not in (*QUANT_BITS, FLOAT_BITS):
            raise LowbitError(f"unsupported --bits {self.bits}; choose one of {_BITS_CHOICES} or 16 (unquantized)")
        if self.embed_bits is not None and self.embed_bits not in (*QUANT_BITS, FLOAT_BITS):
            raise LowbitError(f"unsupported --embed-bits {self.embed_bits}; choose one of {_BITS_CHOICES} or 16")
        if self.group_size not in (PER_CHANNEL, *GROUP_SIZES):
            raise LowbitError(f"unsupported --group-size {self.group_size}; choose 32, 64, 128 or 0 (per-channel)")

    @property
    def embedding_bits(self) -> int:
        if self.embed_bits is not None:
            return self.embed_bits
        return FLOAT_BITS if self.bits == FLOAT_BITS else 8

    def is_asym(self, bits: int) -> bool:
        return (bits < 8) if self.asym is None else self.asym


def choose_qtype(name: str, shape: tuple[int, ...], src_dtype: str, opts: ConvertOptions) -> QType:
    """The storage type for one tensor: norms/biases stay float, embeddings get --embed-bits, the rest --bits.
    A shape the group size does not divide falls back to a smaller group, then per-channel, then float16."""
    if len(shape) != 2:
        return get_qtype("f32")
    bits = opts.embedding_bits if name in EMBEDDING_TENSORS else opts.bits
    if bits == FLOAT_BITS:
        return get_qtype(ST_TO_QTYPE[src_dtype])
    asym = opts.is_asym(bits)
    groups = [opts.group_size] + [g for g in sorted(GROUP_SIZES, reverse=True) if g < opts.group_size]
    if opts.group_size == PER_CHANNEL:
        groups = [PER_CHANNEL]
    for g in [*groups, PER_CHANNEL]:
        qt = quant_type(bits, g, asym)
        if qt.check_shape(shape) is None:
            if g != opts.group_size:
                log.info("%s %s: group size %d does not fit, using %s", name, shape, opts.group_size, qt.name)
            return qt
    log.info("%s %s: no quantized layout fits, keeping float16", name, shape)
    return get_qtype("f16")


def encode_tensor(arr: np.ndarray, src_dtype: str, qt: QType, method: str) -> dict[str, np.ndarray]:
    if qt.is_float:
        if qt.name == "bf16" and src_dtype == "BF16":
            return {"data": np.ascontiguousarray(arr)}
        f = to_f32(src_dtype, arr)
        if qt.name == "bf16":
            raise LowbitError("bf16 output is only kept from bf16 sources")
        return {"data": f.astype(np.float16 if qt.name == "f16" else np.float32)}
    return quantize(to_f32(src_dtype, arr), qt, method=method)


def plan_conversion(ckpt: Checkpoint, family, args, opts: ConvertOptions) -> tuple[list[TensorPlan], dict[str, str]]:
    """(plans in checkpoint order, canonical name -> HF name)."""
    hf_of: dict[str, str] = {}
    for hf in ckpt.names():
        canon = family.sanitize(hf)
        if canon is not None:
            hf_of[canon] = hf
    if args.tie_word_embeddings:
        hf_of.pop("output.weight", None)  # the runtime reuses token_embd
    missing = [n for n in family.expected_tensors(args) if n not in hf_of]
    if missing:
        raise SourceError(f"checkpoint is missing {len(missing)} tensors (first: {missing[0]})")
    plans = []
    for canon, hf in hf_of.items():
        shape = tuple(ckpt.shape(hf))
        plans.append(TensorPlan(canon, choose_qtype(canon, shape, ckpt.dtype(hf), opts), shape))
    return plans, hf_of


def convert(src: str, out: str | Path, opts: ConvertOptions, progress: bool = True) -> Path:
    """Convert ``src`` (HF folder or hub repo id) into the container ``out``. Returns the written path."""
    opts.validate()
    out = Path(out)
    if out.exists() and out.is_dir():
        raise LowbitError(f"{out}: is a directory; give a file name such as model.lowbit")
    folder = resolve_source(src)
    cfg = read_json(folder / "config.json")
    fam_name, family = family_for(cfg.get("model_type"))
    args = family.args_from_hf(cfg)
    tok_meta, tok_blobs = read_tokenizer_source(folder)
    gen_cfg = read_json(folder / "generation_config.json", required=False) or {}
    ckpt = Checkpoint(folder)
    try:
        if "output.weight" not in {family.sanitize(n) for n in ckpt.names()} and not args.tie_word_embeddings:
            args.tie_word_embeddings = True  # no lm_head stored: the checkpoint ties it
        plans, hf_of = plan_conversion(ckpt, family, args, opts)
        adapt = getattr(family, "adapt_to_checkpoint", None)
        if adapt is not None:  # e.g. gemma's embedding normalizer follows the stored embedding dtype
            adapt(args, {canon: ckpt.dtype(hf) for canon, hf in hf_of.items()})
        meta = {
            "architecture": {"family": fam_name, "model_type": cfg.get("model_type"), "args": args.to_dict()},
            "hf_config": cfg,
            "tokenizer": tok_meta,
            "generation": _generation_meta(gen_cfg, tok_meta),
            "quantization": {
                "method": opts.method if opts.bits != FLOAT_BITS else "none",
                "bits": opts.bits,
                "group_size": opts.group_size,
                "asym": opts.is_asym(opts.bits),
                "embed_bits": opts.embedding_bits,
                "recipe": {p.name: p.qtype.name for p in plans},
            },
            "provenance": {
                "source": str(src),
                "converter": f"lowbit {lowbit.__version__}",
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            },
        }
        t0 = time.perf_counter()
        with ContainerWriter(out, meta, plans, tok_blobs) as writer:
            bar = tqdm(plans, desc="convert", unit="tensor", disable=not progress, dynamic_ncols=True)
            for plan in bar:
                bar.set_postfix_str(f"{plan.name} -> {plan.qtype.name}", refresh=False)
                dtype, arr = ckpt.raw(hf_of[plan.name])
                writer.write_tensor(plan.name, encode_tensor(arr, dtype, plan.qtype, opts.method))
            writer.meta["provenance"]["convert_seconds"] = round(time.perf_counter() - t0, 2)
    finally:
        ckpt.close()
    return out


def _generation_meta(gen_cfg: dict, tok_meta: dict) -> dict:
    eos = set(tok_meta.get("eos_token_ids") or [])
    g_eos = gen_cfg.get("eos_token_id")
    if isinstance(g_eos, int):
        eos.add(g_eos)
    elif isinstance(g_eos, list):
        eos.update(int(e) for e in g_eos)
    keep = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample")
    return {
        "eos_token_ids": sorted(eos),
        "bos_token_id": gen_cfg.get("bos_token_id", tok_meta.get("bos_token_id")),
        "defaults": {k: gen_cfg[k] for k in keep if k in gen_cfg},
    }
