"""``lowbit export MODEL.lowbit -o OUT.gguf``: a .lowbit container as a GGUF file llama.cpp (and Ollama, LM Studio)
loads, written with the ``gguf`` package's writer.

Each matrix keeps lowbit's codes and scales where a GGUF block type computes the same numbers
(convert/gguf_encode.py); the others are re-quantized from lowbit's dequantized weights to Q8_0, and
:class:`ExportReport` says per tensor which happened (``strict`` refuses any that is not exact). What llama.cpp's
own converter does to the weights is done here too: the ``llama`` architecture's q/k rows are permuted so that RoPE
pairs interleave (the inverse of convert/gguf_source.py's un-permutation), llama3 rope scaling becomes the
``rope_freqs`` tensor. Metadata and the tokenizer are written under the keys llama.cpp reads
(convert/gguf_vocab.py).

The file is written streaming, one tensor at a time, into a hidden temporary file beside the output that is fsynced
and renamed into place only when complete; any failure (Ctrl-C included) removes it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowbit.convert.gguf_encode import encode, gguf_type, nbytes, requantize
from lowbit.convert.gguf_source import qk_rows
from lowbit.convert.gguf_vocab import vocab_fields
from lowbit.errors import LowbitError
from lowbit.formats.layout import EXTRA_SUFFIXES
from lowbit.formats.reader import Container
from lowbit.kernels.ref import dequantize

log = logging.getLogger(__name__)

# lowbit family -> llama.cpp architecture (the families whose tensors and keys match llama.cpp's one for one)
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# llama.cpp's general.file_type for the type most weights have
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}


@dataclass
class ExportReport:
    path: Path
    tensors: dict[str, tuple[str, str, bool]] = field(default_factory=dict)  # name -> (lowbit type, GGUF type, exact)
    bytes: int = 0

    @property
    def inexact(self) -> list[str]:
        return [n for n, (_, _, exact) in self.tensors.items() if not exact]

    def lines(self) -> list[str]:
        """One line per (lowbit type -> GGUF type) pair: how many tensors, and whether their numbers are kept."""
        pairs = Counter((lt, gt, ex) for lt, gt, ex in self.tensors.values())
        return [f"{n:4d} x {lt:<9} -> {gt:<5} {'exact' if ex else 're-quantized from the dequantized weights'}"
                for (lt, gt, ex), n in sorted(pairs.items())]  # fmt: skip


def _arch_fields(arch: str, args: dict) -> dict[str, tuple[str, object]]:
    heads, hidden = args["num_attention_heads"], args["hidden_size"]
    head_dim = args.get("head_dim") or hidden // heads
    f: dict[str, tuple[str, object]] = {
        "context_length": ("u32", args["max_position_embeddings"]),
        "embedding_length": ("u32", hidden),
        "block_count": ("u32", args["num_hidden_layers"]),
        "feed_forward_length": ("u32", args["intermediate_size"]),
        "attention.head_count": ("u32", heads),
        "attention.head_count_kv": ("u32", args["num_key_value_heads"]),
        "rope.freq_base": ("f32", float(args["rope_theta"])),
        "attention.layer_norm_rms_epsilon": ("f32", float(args["rms_norm_eps"])),
        "vocab_size": ("u32", args["vocab_size"]),
        "rope.dimension_count": ("u32", args.get("rotary_dim") or head_dim),
    }
    if head_dim != hidden // heads:
        f["attention.key_length"] = ("u32", head_dim)
        f["attention.value_length"] = ("u32", head_dim)
    if args.get("sliding_window"):
        raise LowbitError(f"a sliding attention window ({args['sliding_window']} tokens) has no key in llama.cpp's "
                          f"{arch} architecture; export would change the model's numbers")  # fmt: skip
    scaling = args.get("rope_scaling")
    kind = scaling.get("rope_type") if scaling else None
    if kind == "linear":
        f["rope.scaling.type"] = ("str", "linear")
        f["rope.scaling.factor"] = ("f32", float(scaling["factor"]))
    elif kind not in (None, "default", "llama3", "freq_factors"):
        raise LowbitError(f"rope scaling {kind!r} is not exported (supported: linear, llama3)")
    return {f"{arch}.{k}": v for k, v in f.items()}


def _rope_freqs(args: dict) -> np.ndarray | None:
    """llama3 rope scaling as llama.cpp stores it: the divisor of each inverse frequency (``rope_freqs.weight``)."""
    from lowbit.models.common import rope_inv_freq

    scaling = args.get("rope_scaling")
    if not scaling or scaling.get("rope_type") not in ("llama3", "freq_factors"):
        return None
    rot = args.get("rotary_dim") or args.get("head_dim") or args["hidden_size"] // args["num_attention_heads"]
    plain = rope_inv_freq(rot, args["rope_theta"], None)
    return (plain / rope_inv_freq(rot, args["rope_theta"], scaling)).astype(np.float32)


def _add(writer, key: str, kind: str, value) -> None:
    from gguf import GGUFValueType

    if kind in ("strs", "i32s", "f32s"):
        sub = {"strs": GGUFValueType.STRING, "i32s": GGUFValueType.INT32, "f32s": GGUFValueType.FLOAT32}[kind]
        writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=sub)
        return
    vtype = {"str": GGUFValueType.STRING, "u32": GGUFValueType.UINT32, "f32": GGUFValueType.FLOAT32,
             "bool": GGUFValueType.BOOL}[kind]  # fmt: skip
    writer.add_key_value(key, value, vtype)


def model_tensors(c: Container, target: str) -> list[str]:
    """The container's tensors an export writes: the model's own. Static activation scales are left out (the
    target quantizes activations itself); Hadamard signs and low-rank factors are refused, since the weights
    they belong to compute the model only together with them."""
    for name in c.tensor_names:
        if name.rsplit(".", 1)[-1] in ("had", "lr_a", "lr_b"):
            raise LowbitError(f"{name}: Hadamard-rotated and low-rank-corrected weights have no {target} "
                              "counterpart; convert without the hadamard/lowrank method steps to export")  # fmt: skip
    return [n for n in c.tensor_names if n.rsplit(".", 1)[-1] not in EXTRA_SUFFIXES]


def plan_export(c: Container) -> tuple[str, dict, list[tuple[str, tuple[int, ...], str, bool]]]:
    """(llama.cpp architecture, model args, [(tensor name, shape, GGUF type, exact)]) of a container; LowbitError
    for what llama.cpp cannot hold."""
    arch_meta = c.meta.get("architecture", {})
    family = arch_meta.get("family")
    if family not in ARCHITECTURES:
        raise LowbitError(f"export to GGUF supports the {', '.join(ARCHITECTURES)} families; this model is {family!r}")
    args = arch_meta["args"]
    plan = []
    for name in model_tensors(c, "llama.cpp"):
        shape = c.tensor_shape(name)
        kind, exact = gguf_type(c.tensor(name).qtype, shape)
        plan.append((name, shape, kind, exact))
    return ARCHITECTURES[family], args, plan


def export_gguf(src: str | os.PathLike, out: str | os.PathLike, strict: bool = False) -> ExportReport:
    """Write ``src`` (a .lowbit file) as the GGUF ``out``; ``strict`` refuses tensors that cannot be kept exactly."""
    from gguf import GGMLQuantizationType, GGUFWriter

    out = Path(out)
    with Container(src) as c:
        arch, args, plan = plan_export(c)
        report = ExportReport(out)
        for name, _, kind, exact in plan:
            report.tensors[name] = (c.tensor(name).qtype.name, kind, exact)
        if strict and report.inexact:
            bad = report.inexact
            first = f"{bad[0]}, {report.tensors[bad[0]][0]}"
            raise LowbitError(f"--strict: {len(bad)} tensors have no exact GGUF type (first: {first}); leave out "
                              "--strict to re-quantize them to Q8_0")  # fmt: skip
        fields = _arch_fields(arch, args)
        fields.update(vocab_fields(c.meta.get("tokenizer", {}), c.blobs(), args["vocab_size"]))
        freqs = _rope_freqs(args)
        weights = Counter()
        for _, shape, kind, _ in plan:
            if len(shape) == 2:
                weights[kind] += int(np.prod(shape))
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        writer = GGUFWriter(tmp, arch)
        try:
            writer.add_name(Path(c.meta.get("provenance", {}).get("source") or out.stem).stem)
            writer.add_quantization_version(2)
            writer.add_file_type(FILE_TYPES[weights.most_common(1)[0][0]] if weights else 0)
            for key, (kind, value) in fields.items():
                _add(writer, key, kind, value)
            if freqs is not None:
                writer.add_tensor_info("rope_freqs.weight", freqs.shape, np.float32, freqs.nbytes)
            for name, shape, kind, _ in plan:
                size = nbytes(kind, shape)
                if kind in ("F32", "F16"):
                    writer.add_tensor_info(name, shape, np.dtype({"F32": np.float32, "F16": np.float16}[kind]), size)
                elif kind == "BF16":
                    writer.add_tensor_info(name, shape, np.dtype(np.uint16), size, GGMLQuantizationType.BF16)
                else:  # the writer takes the shape of the bytes: [rows, bytes per row]
                    byte_shape = (*shape[:-1], size // int(np.prod(shape[:-1], dtype=np.int64)))
                    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), size, GGMLQuantizationType[kind])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            if freqs is not None:
                writer.write_tensor_data(freqs)
            for name, shape, kind, exact in plan:
                data = _tensor_data(c, name, shape, kind, exact, arch, args)
                writer.write_tensor_data(data)
                report.bytes += data.nbytes
            writer.close()
            _fsync(tmp)
            os.replace(tmp, out)
        except BaseException as e:
            writer.close()
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise LowbitError(f"{out}: cannot write ({e.strerror or e})") from None
            raise
    return report


def _tensor_data(c: Container, name: str, shape, kind: str, exact: bool, arch: str, args: dict) -> np.ndarray:
    t = c.tensor(name).per_row()  # a per-tensor scale repeats in every block
    rows = qk_rows(name, shape[0], args, interleaved=False) if arch == "llama" else None
    if t.qtype.is_float:
        data = np.asarray(t.parts["data"])
        if kind == "BF16":
            data = data.view(np.uint16)
        return np.ascontiguousarray(data if rows is None else data[rows])
    if exact:
        blocks = encode(t.parts, t.qtype, shape, kind)
    else:
        blocks = requantize(dequantize(t.parts, t.qtype, shape), kind)
    return np.ascontiguousarray(blocks if rows is None else blocks[rows])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
