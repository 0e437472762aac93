"""`lowbit convert`: HF checkpoint -> .lowbit container, one tensor at a time."""

from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import lowbit
from lowbit.convert.gguf_plan import plan_gguf
from lowbit.convert.gguf_source import GGUFSource, is_gguf
from lowbit.convert.gguf_tokenizer import gguf_tokenizer
from lowbit.convert.methods import Method, parse_method
from lowbit.convert.progress import stage
from lowbit.convert.quantize import quantize
from lowbit.convert.source import Checkpoint, read_json, resolve_source, to_f32
from lowbit.errors import FormatError, LowbitError, SourceError
from lowbit.formats.qtypes import (
    CODED_MAX_BITS,
    GROUP_SIZES,
    PER_CHANNEL,
    PER_TENSOR,
    QUANT_BITS,
    QType,
    get_qtype,
    quant_type,
)
from lowbit.formats.tokenizer import read_tokenizer_source
from lowbit.formats.writer import ContainerWriter, TensorPlan
from lowbit.kernels.ref import f32_to_bf16
from lowbit.models import family_for

log = logging.getLogger(__name__)

FLOAT_BITS = 16  # --bits 16: keep every weight in its source float type
ST_TO_QTYPE = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f32"}
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")
AUTO_BUDGET_METHOD = "gptq"  # what --method auto uses with --target-bpw/--max-size (measured: see README)
_BITS_CHOICES = ", ".join(map(str, QUANT_BITS))
# defaults chosen on SmolLM2-135M and the toy (README, "Choosing the defaults"): at 4 bits, groups of 32 with 6-bit
# embeddings beat groups of 64 with 8-bit ones at about the same size
# --bits -> the bits of the GGUF block type a --gguf-compatible conversion uses (2- and 3-bit codes would take a
# 4-bit block's room in the GGUF anyway; 6-bit ones Q8_0's)
GGUF_BITS = {2: 4, 3: 4, 4: 4, 5: 5, 6: 8, 8: 8}
DEFAULT_GROUP = {4: 32}  # --bits -> group size where it is not 64
DEFAULT_EMBED_BITS = 6  # embeddings and lm_head: this many bits, or --bits where that is more
EMBED_GROUP = 64  # ... in groups of this many unless --group-size is given


@dataclass(frozen=True)
class ConvertOptions:
    bits: int = 4
    group_size: int | None = None  # None: DEFAULT_GROUP (32 at 4 bits, else 64); EMBED_GROUP for embeddings
    asym: bool | None = None  # None: asymmetric below 8 bits, symmetric at 8
    # 16: float16 group scales/mins; 8: uint8 codes on a per-matrix grid (the ..s8 types, up to CODED_MAX_BITS bits;
    # wider types keep float16 scales); None: 8 with a size budget, else 16
    scale_bits: int | None = None
    embed_bits: int | None = None  # None: DEFAULT_EMBED_BITS or --bits if more (16 with --bits 16)
    # "+"-joined method steps (convert/methods.py): rtn | search | imatrix | awq | gptq | hadamard | lowrank,
    # e.g. "search", "awq+gptq", "hadamard+gptq+lowrank". Steps other than rtn/search need calibration data.
    method: str = "auto"  # auto: "search", or AUTO_BUDGET_METHOD with a size budget
    calib: str | None = None  # calibration text file; None: text sampled from the unquantized model (seed below)
    calib_samples: int = 64  # calibration sequences
    calib_len: int = 256  # tokens per calibration sequence
    seed: int = 0
    lowrank_bpw: float = 0.0  # extra bits per weight spent on low-rank correction (method step "lowrank")
    tune_seconds: float = 600.0  # time budget of the method step "tune"
    target_bpw: float | None = None  # mixed precision: choose per-tensor types to fit this many bits per weight
    max_size: int | None = None  # mixed precision: ... or this many bytes of tensors
    recipe: str | None = None  # a saved recipe (JSON: tensor name -> quant type) to reuse
    # GGUF sources: False keeps every GGUF type lowbit has (convert/gguf_plan.py); True re-quantizes every matrix
    # with the options above (the CLI sets it when any quantization option is given)
    requantize: bool = False
    # the runtime default the container asks for: int8 | exact (runtime/engine.py); None: exact for a GGUF whose
    # weights are kept as they are (int8 activations flip near-tied tokens of such a file: SmolLM2's answer to "What
    # is the capital of France?" became "L'Étoile, la France, la France, …"), int8 otherwise
    kernel_activations: str | None = None
    # only types that `lowbit export` writes to GGUF exactly, at GGUF's own block size (GGUF_BITS, groups of 32)
    gguf_compatible: bool = False
    # --bits 16: the float type of every matrix, "bf16" or "f16" (rounded to nearest even); None: the source's own
    # (float32 sources stay float32)
    float_type: str | None = None

    @property
    def budget(self) -> bool:
        return self.target_bpw is not None or self.max_size is not None

    def resolved_method(self) -> Method:
        if self.method == "auto":
            return parse_method(AUTO_BUDGET_METHOD if self.budget else "search")
        return parse_method(self.method)

    def validate(self) -> None:
        method = self.resolved_method()
        if self.bits == FLOAT_BITS and (method.calibrated or self.target_bpw is not None or self.max_size):
            raise LowbitError(f"--method {self.method} and --target-bpw/--max-size need --bits below 16")
        if self.target_bpw is not None and self.max_size is not None:
            raise LowbitError("give --target-bpw or --max-size, not both")
        if self.target_bpw is not None and not 1.0 < self.target_bpw <= 16.0:
            raise LowbitError(f"--target-bpw {self.target_bpw}: expected a number of bits per weight in (1, 16]")
        if self.max_size is not None and self.max_size <= 0:
            raise LowbitError(f"--max-size {self.max_size}: expected a positive number of bytes")
        if self.kernel_activations not in (None, "int8", "exact"):
            raise LowbitError(f"kernel activations {self.kernel_activations!r}: expected int8 or exact")
        if self.calib_samples < 1 or self.calib_len < 2:
            raise LowbitError("--calib-samples must be at least 1 and --calib-len at least 2")
        if not 0.0 <= self.lowrank_bpw <= 4.0:
            raise LowbitError(f"--lowrank-bpw {self.lowrank_bpw}: expected extra bits per weight in [0, 4]")
        if self.float_type not in (None, "bf16", "f16"):
            raise LowbitError(f"--float-type {self.float_type}: expected bf16 or f16")
        if self.float_type is not None and FLOAT_BITS not in (self.bits, self.embed_bits):
            raise LowbitError("--float-type sets the type of unquantized matrices: it needs --bits 16 (or "
                              "--embed-bits 16)")
        if self.bits not in (*QUANT_BITS, FLOAT_BITS):
            raise LowbitError(f"unsupported --bits {self.bits}; choose one of {_BITS_CHOICES} or 16 (unquantized)")
        if self.embed_bits is not None and self.embed_bits not in (*QUANT_BITS, FLOAT_BITS):
            raise LowbitError(f"unsupported --embed-bits {self.embed_bits}; choose one of {_BITS_CHOICES} or 16")
        if self.group_size is not None and self.group_size not in (PER_CHANNEL, *GROUP_SIZES, PER_TENSOR):
            raise LowbitError(f"unsupported --group-size {self.group_size}; choose 32, 64, 128, 0 (per-channel) or "
                              "-1 (per-tensor)")
        if self.scale_bits not in (None, 8, 16):
            raise LowbitError(f"unsupported --scale-bits {self.scale_bits}; choose 16 or 8")
        if self.scale_bits == 8 and self.group_size in (PER_CHANNEL, PER_TENSOR):
            raise LowbitError("--scale-bits 8 codes group scales; per-channel and per-tensor scales stay float16")
        if self.scale_bits == 8 and not self.budget and self.bits > CODED_MAX_BITS:
            raise LowbitError(f"--scale-bits 8 codes the scales of 2- to {CODED_MAX_BITS}-bit types; --bits "
                              f"{self.bits} keeps float16 scales")
        if self.group_size == PER_TENSOR and self.budget:
            raise LowbitError("--group-size -1 (per-tensor) is not a mixed-precision ladder; give --bits instead")
        if self.gguf_compatible and (method.hadamard or method.lowrank):
            raise LowbitError("--gguf-compatible: the hadamard and lowrank method steps have no llama.cpp counterpart")
        if method.tune and (method.hadamard or method.lowrank):
            raise LowbitError("the tune step does not handle the hadamard or lowrank steps' files yet")
        if method.tune and self.calib is None:
            raise LowbitError("the tune step learns from calibration text: give --calib FILE")
        if method.tune and not 0 < self.tune_seconds <= 86400:
            raise LowbitError(f"tune time budget {self.tune_seconds} s: expected (0, 86400] seconds")

    @property
    def group(self) -> int:
        """The group size: --group-size, else :data:`DEFAULT_GROUP` for --bits."""
        return self.group_size if self.group_size is not None else DEFAULT_GROUP.get(self.bits, 64)

    @property
    def scale_width(self) -> int:
        """Bits per group scale: --scale-bits, else 8 with a size budget (measured better at every budget on
        SmolLM2-135M, README) and 16 without."""
        if self.scale_bits is not None:
            return self.scale_bits
        return 8 if self.budget else 16

    @property
    def embedding_bits(self) -> int:
        if self.embed_bits is not None:
            return self.embed_bits
        return FLOAT_BITS if self.bits == FLOAT_BITS else max(DEFAULT_EMBED_BITS, self.bits)

    def is_asym(self, bits: int) -> bool:
        return (bits < 8) if self.asym is None else self.asym


def choose_qtype(name: str, shape: tuple[int, ...], src_dtype: str, opts: ConvertOptions) -> QType:
    """The storage type for one tensor: norms/biases stay float, embeddings get --embed-bits, the rest --bits.
    A shape the group size does not divide falls back to a smaller group, then per-channel, then float16."""
    if len(shape) != 2:
        return get_qtype("f32")
    bits = opts.embedding_bits if name in EMBEDDING_TENSORS else opts.bits
    if bits == FLOAT_BITS:
        return get_qtype(opts.float_type or ST_TO_QTYPE[src_dtype])
    asym = opts.is_asym(bits)
    embedding = name in EMBEDDING_TENSORS and opts.group_size is None
    group = EMBED_GROUP if embedding else opts.group
    if opts.gguf_compatible:  # the GGUF block that holds these bits exactly: Q4_0/1, Q5_0/1, Q8_0 (no min)
        bits, group = GGUF_BITS[bits], 32
        asym = asym and bits < 8
    groups = [group] + [g for g in sorted(GROUP_SIZES, reverse=True) if g < group]
    if group in (PER_CHANNEL, PER_TENSOR):
        groups = [group]
    for g in [*groups, PER_CHANNEL]:
        coded = opts.scale_width == 8 and g in GROUP_SIZES and bits <= CODED_MAX_BITS
        qt = quant_type(bits, g, asym, 8 if coded else 16)
        if qt.check_shape(shape) is None:
            if g != group:
                log.info("%s %s: group size %d does not fit, using %s", name, shape, group, qt.name)
            return qt
    log.info("%s %s: no quantized layout fits, keeping float16", name, shape)
    return get_qtype("f16")


def encode_tensor(arr: np.ndarray, src_dtype: str, qt: QType, method: str) -> dict[str, np.ndarray]:
    if qt.is_float:
        if qt.name == "bf16" and src_dtype == "BF16":
            return {"data": np.ascontiguousarray(arr)}
        f = to_f32(src_dtype, arr)
        if qt.name == "bf16":
            return {"data": f32_to_bf16(f)}
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


def _convert_then_tune(src: str, out: Path, opts: ConvertOptions, first: str, progress: bool) -> Path:
    """The ``tune`` step: the other steps' file, written hidden beside ``out``, then tuned into ``out`` against the
    float source (convert/tune.py)."""
    from lowbit.convert.tune import TuneOptions, tune

    untuned = out.with_name(f".{out.name}.untuned")
    try:
        convert(src, untuned, replace(opts, method=first), progress)
        tune(untuned, out, TuneOptions(calib=opts.calib, teacher=src, time_budget=opts.tune_seconds), progress)
    finally:
        untuned.unlink(missing_ok=True)
    return out


def convert(src: str, out: str | Path, opts: ConvertOptions, progress: bool = True) -> Path:
    """Convert ``src`` (HF folder, hub repo id or GGUF file) into the container ``out``. Returns the written path."""
    opts.validate()
    out = Path(out)
    if out.exists() and out.is_dir():
        raise LowbitError(f"{out}: is a directory; give a file name such as model.lowbit")
    method = opts.resolved_method()
    if method.tune:
        return _convert_then_tune(src, out, opts, replace(method, tune=False).name, progress)
    gguf, notes, kept = None, None, set()
    if is_gguf(Path(src).expanduser()):
        if opts.budget or opts.recipe or opts.resolved_method().calibrated:
            opts = replace(opts, requantize=True)  # these choose every matrix's type themselves
        gguf = GGUFSource(Path(src).expanduser())
        cfg, gen_cfg, ckpt = gguf.config, {}, gguf
        try:
            tok_meta, tok_blobs = gguf_tokenizer(gguf.fields, str(src))
        except BaseException:
            gguf.close()
            raise
    else:
        folder = resolve_source(src)
        cfg = read_json(folder / "config.json")
        tok_meta, tok_blobs = read_tokenizer_source(folder)
        gen_cfg = read_json(folder / "generation_config.json", required=False) or {}
        ckpt = Checkpoint(folder)
    try:
        fam_name, family = family_for(cfg.get("model_type"))
        args = family.args_from_hf(cfg)
        if gguf is not None:
            plans, hf_of, notes, kept = plan_gguf(gguf, family, args, opts, choose_qtype)
        else:
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
                "method": _method_name(opts, gguf),
                **_uniform_options(opts, gguf),
                "recipe": {p.name: p.qtype.name for p in plans},
                **({"import": notes} if notes is not None else {}),
                **({"gguf_compatible": True} if opts.gguf_compatible else {}),
            },
            "runtime": {"kernel_activations": opts.kernel_activations or ("exact" if kept else "int8")},
            "provenance": {
                "source": str(src),
                "converter": f"lowbit {lowbit.__version__}",
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            },
        }
        t0 = time.perf_counter()
        method = opts.resolved_method()
        if opts.recipe is not None:
            plans = apply_recipe(plans, load_recipe(opts.recipe))
        if method.calibrated or opts.budget:
            from lowbit.convert.calibrated import convert_calibrated
            from lowbit.convert.mixed import check_budget, file_overhead

            if opts.budget:
                check_budget(plans, opts, file_overhead(meta, plans, tok_blobs))
            job = CalibratedJob(ckpt, hf_of, family, args, plans, method, tok_meta, tok_blobs, meta)
            return convert_calibrated(job, opts, out, t0, progress)
        meta["quantization"]["recipe"] = {p.name: p.qtype.name for p in plans}
        with ContainerWriter(out, meta, plans, tok_blobs) as writer:
            bar = stage("convert", len(plans), "tensor", progress, plans)
            for plan in bar:
                bar.set_postfix_str(f"{plan.name} -> {plan.qtype.name}", refresh=False)
                if plan.name in kept:
                    qt, parts = gguf.exact(plan.name)  # the GGUF's own codes and scales
                    if qt is not plan.qtype:
                        raise LowbitError(f"{plan.name}: GGUF import produced {qt.name}, planned {plan.qtype.name}")
                    writer.write_tensor(plan.name, parts)
                    continue
                dtype, arr = ckpt.raw(hf_of[plan.name])
                writer.write_tensor(plan.name, encode_tensor(arr, dtype, plan.qtype, method.rounding))
            writer.meta["provenance"]["convert_seconds"] = round(time.perf_counter() - t0, 2)
    finally:
        ckpt.close()
    return out


@dataclass
class CalibratedJob:
    """What the calibrated path needs from the checkpoint reading above."""

    ckpt: Checkpoint
    hf_of: dict[str, str]
    family: object
    args: object
    plans: list[TensorPlan]
    method: Method
    tok_meta: dict
    tok_blobs: dict[str, bytes]
    meta: dict


def load_recipe(path: str | Path) -> dict[str, str]:
    """A recipe file: JSON object tensor name -> quant type name (what `lowbit inspect --recipe` / a mixed-precision
    conversion saves), or a container header's ``quantization.recipe`` copied out."""
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"--recipe {p}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(f"--recipe {p}: not a JSON file ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("recipe"), dict):
        data = data["recipe"]
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise LowbitError(f"--recipe {p}: expected a JSON object of tensor name -> quant type name")
    return data


def apply_recipe(plans: list[TensorPlan], recipe: dict[str, str]) -> list[TensorPlan]:
    """Plans with the recipe's types; every name must be a tensor of the model and every type must fit it."""
    by_name = {p.name: p for p in plans}
    unknown = [n for n in recipe if n not in by_name]
    if unknown:
        raise LowbitError(f"recipe names {len(unknown)} tensors this model does not have (first: {unknown[0]})")
    out = []
    for p in plans:
        if p.name not in recipe:
            out.append(p)
            continue
        try:
            qt = get_qtype(recipe[p.name])
        except FormatError as e:
            raise LowbitError(f"recipe entry {p.name}: {e}") from None
        why = qt.check_shape(p.shape)
        if why is not None or (not qt.is_float and len(p.shape) != 2):
            raise LowbitError(f"recipe entry {p.name}: {why or 'only matrices can be quantized'}")
        out.append(TensorPlan(p.name, qt, p.shape))
    return out


def _uniform_options(opts: ConvertOptions, gguf) -> dict:
    """The options every tensor was quantized with; a GGUF import keeps the file's own types instead (see recipe)."""
    if gguf is not None and not opts.requantize:
        return {"bits": None, "group_size": None, "asym": None, "embed_bits": None}
    return {"bits": opts.bits, "group_size": opts.group, "asym": opts.is_asym(opts.bits),
            "scale_bits": opts.scale_width, "embed_bits": opts.embedding_bits}


def _method_name(opts: ConvertOptions, gguf) -> str:
    if gguf is not None and not opts.requantize:
        return "gguf-import"
    return opts.resolved_method().name if opts.bits != FLOAT_BITS else "none"


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
