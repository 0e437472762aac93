"""Random-weight containers of real model shapes, for speed and memory benchmarks (speed does not depend on values).

The container is written with the ordinary writer, tensor by tensor, with the quant types `lowbit convert` would
choose for the same shape and options; there is no tokenizer inside (benchmarks feed token ids directly).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

import lowbit
from lowbit.convert.converter import ConvertOptions, choose_qtype
from lowbit.errors import LowbitError
from lowbit.formats import scale_codes
from lowbit.formats.qtypes import QType
from lowbit.formats.writer import ContainerWriter, TensorPlan
from lowbit.models import family_for

log = logging.getLogger(__name__)

# HF config.json values of real models (the numbers that determine speed)
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "smollm2-360m": dict(
        model_type="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
        num_attention_heads=15, num_key_value_heads=5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "llama3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        rope_theta=500000.0,
    ),
    "tinyllama-1.1b": dict(
        model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, rope_theta=10000.0, max_position_embeddings=2048,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
}


def tensor_shapes(args) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape for a llama-style model."""
    hd, h = args.head_dim, args.hidden_size
    q, kv = args.num_attention_heads * hd, args.num_key_value_heads * hd
    per_layer = {
        "attn_norm.weight": (h,),
        "ffn_norm.weight": (h,),
        "attn_q.weight": (q, h),
        "attn_k.weight": (kv, h),
        "attn_v.weight": (kv, h),
        "attn_output.weight": (h, q),
        "ffn_gate.weight": (args.intermediate_size, h),
        "ffn_up.weight": (args.intermediate_size, h),
        "ffn_down.weight": (h, args.intermediate_size),
    }
    shapes = {"token_embd.weight": (args.vocab_size, h), "output_norm.weight": (h,)}
    if not args.tie_word_embeddings:
        shapes["output.weight"] = (args.vocab_size, h)
    for i in range(args.num_hidden_layers):
        shapes.update({f"blk.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def random_parts(qt: QType, shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Stored parts with random codes and scales chosen so weights are about ±1/sqrt(cols) (activations stay
    finite through the layers, as in a real model)."""
    if qt.is_float:
        if len(shape) == 1:
            w = np.ones(shape, dtype=np.float32)
        else:
            w = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
        if qt.name == "bf16":
            return {"data": (w.view(np.uint32) >> 16).astype(np.uint16)}
        return {"data": w.astype(np.float16 if qt.name == "f16" else np.float32)}
    if qt.coded_scales:  # the float16 twin's random scales, coded on their grid
        return scale_codes.code_parts(random_parts(qt.f16_twin, shape, rng), qt)
    parts = {}
    span = 2.0 / np.sqrt(shape[1])
    for name, (pshape, _dtype) in qt.part_shapes(shape).items():
        if name == "codes":
            parts[name] = rng.integers(0, 256, size=pshape, dtype=np.uint8)
        elif name == "scales":
            d = span / qt.max_code * rng.uniform(0.5, 1.0, size=pshape)
            parts[name] = d.astype(np.float16)
        else:  # mins: centre the range on zero
            parts[name] = np.full(pshape, span / 2, dtype=np.float16)
    return parts


def build_random_container(shape: str | dict, opts: ConvertOptions, out: Path, seed: int = 0,
                           tokenizer: tuple[dict, dict[str, bytes]] | None = None) -> Path:  # fmt: skip
    """Write a random-weight container of ``shape`` (a name from SHAPES, or an HF config dict) quantized as
    ``opts`` would be; ``tokenizer`` (meta, blobs), e.g. another container's, makes it servable by text (its ids
    must lie within the shape's vocabulary). Returns ``out``."""
    if isinstance(shape, dict):
        cfg, shape = shape, "custom"
    elif shape in SHAPES:
        cfg = SHAPES[shape]
    else:
        raise LowbitError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    opts.validate()
    fam_name, family = family_for(cfg["model_type"])
    args = family.args_from_hf(cfg)
    shapes = tensor_shapes(args)
    plans = [TensorPlan(n, choose_qtype(n, s, "BF16", opts), s) for n, s in shapes.items()]
    meta = {
        "architecture": {"family": fam_name, "model_type": cfg["model_type"], "args": args.to_dict()},
        "hf_config": cfg,
        "generation": {"eos_token_ids": [], "defaults": {}},
        "quantization": {
            "method": "random",
            "bits": opts.bits,
            "group_size": opts.group,
            "asym": opts.is_asym(opts.bits),
            "embed_bits": opts.embedding_bits,
            "recipe": {p.name: p.qtype.name for p in plans},
        },
        "provenance": {"source": f"random:{shape}", "converter": f"lowbit {lowbit.__version__}", "seed": seed},
    }
    blobs: dict[str, bytes] = {}
    if tokenizer is not None:
        meta["tokenizer"], blobs = tokenizer
    rng = np.random.default_rng(seed)
    log.info("writing random %s container to %s", shape, out)
    with ContainerWriter(out, meta, plans, blobs) as w:
        for p in plans:
            w.write_tensor(p.name, random_parts(p.qtype, p.shape, rng))
    return out
