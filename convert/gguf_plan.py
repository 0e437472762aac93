"""What a GGUF import stores per tensor: the GGUF's own type where lowbit has it, else a re-quantization.

Without quantization options (``ConvertOptions.requantize`` false) every matrix whose GGUF type maps onto a lowbit
type (convert/gguf_quants.py) keeps its codes and scales; any other type is dequantized by gguf-py and quantized to
the group-32 type of ``REQUANT_BITS`` (the weighted search). With options, every matrix is re-quantized from its
dequantized values as from a float checkpoint. The header records per tensor what happened
(``quantization.import``, shown by ``lowbit inspect``).
"""

from __future__ import annotations

from dataclasses import replace

from lowbit.convert.gguf_quants import DECODERS, LOWBIT_TYPE, REQUANT_BITS
from lowbit.convert.gguf_source import GGUFSource
from lowbit.errors import SourceError
from lowbit.formats.qtypes import get_qtype
from lowbit.formats.writer import TensorPlan


def plan_gguf(src: GGUFSource, family, args, opts, choose_qtype):
    """(plans, canonical name -> source name (the identity), per-tensor import notes for the header, names of the
    matrices kept in their GGUF type: GGUFSource.exact writes them)."""
    hf_of = {c: c for c in src.names()}
    if args.tie_word_embeddings:
        hf_of.pop("output.weight", None)
    expected = family.expected_tensors(args)
    missing = [n for n in expected if n not in hf_of]
    if missing:
        raise SourceError(f"{src.path}: GGUF file is missing {len(missing)} tensors (first: {missing[0]})")
    known = set(expected) | {n.removesuffix(".weight") + ".bias" for n in expected}
    unknown = [n for n in hf_of if n not in known]
    if unknown:
        raise SourceError(f"{src.path}: unexpected tensor {unknown[0]!r} for architecture {src.arch}")
    plans, notes, kept = [], {}, set()
    for canon in hf_of:
        shape, kind = src.shape(canon), src.gguf_type(canon)
        src.check_readable(canon)
        if len(shape) != 2:
            qt = get_qtype("f32")
            notes[canon] = "exact" if kind == "F32" else f"float32 from {kind}"
        elif opts.requantize:
            qt = choose_qtype(canon, shape, src.dtype(canon), opts)
            notes[canon] = f"re-quantized from {kind}"
        elif kind in LOWBIT_TYPE:
            qt = get_qtype(LOWBIT_TYPE[kind])
            kept.add(canon)
            exact = kind not in DECODERS or DECODERS[kind][1]
            notes[canon] = "exact" if exact else f"fp16 scales from {kind}"
        else:
            bits = REQUANT_BITS.get(kind, 8)
            qt = choose_qtype(canon, shape, "F32", replace(opts, bits=bits, embed_bits=bits, group_size=32))
            notes[canon] = f"re-quantized from {kind}"
        if not qt.is_float and qt.check_shape(shape) is not None:
            raise SourceError(f"{src.path}: {canon} {shape} does not fit {qt.name}")
        plans.append(TensorPlan(canon, qt, shape))
    return plans, hf_of, notes, kept
