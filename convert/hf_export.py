"""``lowbit export MODEL.lowbit -o DIR --format compressed-tensors``: a Hugging Face checkpoint that vLLM and
transformers load, its linear layers in compressed-tensors' ``pack-quantized`` format.

A symmetric 4- or 8-bit lowbit matrix keeps its codes and scales: compressed-tensors dequantizes ``(q - 0) * scale``
with signed ``q``, and packs ``q + 2**(bits-1)`` — lowbit's unsigned code — little-endian into int32 words
(eight 4-bit or four 8-bit codes per word), which is lowbit's number exactly. Scales are stored as float32 (the
float16 values, widened): compressed-tensors dequantizes in the scale's dtype, and float16 products would round.
Groups of 32/64/128 are the ``group`` strategy, per-channel rows the ``channel`` one. Everything that is not a
linear layer of the blocks (embeddings, lm_head, norms, biases) is written dequantized in float32, and lm_head is in
the config's ``ignore`` list. Other lowbit types (asymmetric groups — compressed-tensors' zero points are integers
— and 2/3/5/6 bits) are refused: convert with ``--sym --bits 4`` (or 8) to export this way.

The folder is written beside its destination under a hidden temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from lowbit.convert.gguf_export import model_tensors
from lowbit.errors import LowbitError
from lowbit.formats.qtypes import PER_CHANNEL, QType
from lowbit.formats.reader import Container
from lowbit.kernels.ref import dequantize

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}  # fmt: skip
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _hf_names(family: str) -> tuple[dict[str, str], dict[str, str]]:
    """(canonical layer name -> HF module path inside a layer, canonical top name -> HF module path)."""
    from lowbit.models import FAMILIES, llama
    from lowbit.models.names import TOP_NAMES

    layer = getattr(FAMILIES[family], "LAYER_NAMES", llama.LAYER_NAMES)
    return {v: k for k, v in layer.items()}, {v: k for k, v in TOP_NAMES.items()}


def hf_name(canon: str, family: str) -> str:
    layer, top = _hf_names(family)
    base, _, kind = canon.rpartition(".")
    if base in top:
        return f"{top[base]}.{kind}"
    _, index, short = base.split(".")
    return f"model.layers.{index}.{layer[short]}.{kind}"


def _scheme(qt: QType) -> dict:
    strategy = "channel" if qt.group_size == PER_CHANNEL else "group"
    return {"num_bits": qt.bits, "type": "int", "symmetric": True, "strategy": strategy,
            "group_size": None if strategy == "channel" else qt.group_size, "dynamic": False,
            "observer": "minmax"}  # fmt: skip


def _packed(parts: dict[str, np.ndarray], qt: QType, shape: tuple[int, int]) -> np.ndarray:
    """lowbit's codes as compressed-tensors' int32 words: code j of a row at bit ``j * bits`` of the row."""
    from lowbit.formats.qtypes import unpack_codes

    u = unpack_codes(np.asarray(parts["codes"]), qt, shape[1]).astype(np.uint8)
    if qt.bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return np.ascontiguousarray(u).view("<i4")


def plan_hf(c: Container) -> tuple[str, dict[str, QType]]:
    """(family, the quantized linear layers and their types); LowbitError for what this format cannot hold."""
    family = c.meta.get("architecture", {}).get("family")
    if family not in ("llama", "qwen2", "qwen3"):
        raise LowbitError(f"export to compressed-tensors supports the llama, qwen2 and qwen3 families; this model is "
                          f"{family!r}")  # fmt: skip
    linears = {}
    for name in model_tensors(c, "compressed-tensors"):
        qt = c.tensor(name).per_row().qtype  # a per-tensor scale is written per channel, repeated
        if name.split(".")[-2] in LINEARS and name.endswith(".weight") and not qt.is_float:
            if qt.asym or qt.bits not in (4, 8):
                raise LowbitError(f"{name} is {qt.name}: compressed-tensors export holds symmetric 4- and 8-bit "
                                  "groups only (convert with --sym --bits 4 or --bits 8)")  # fmt: skip
            linears[name] = qt
    return family, linears


def export_hf(src: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> dict[str, int]:
    """Write ``src`` as a compressed-tensors checkpoint folder ``out``. Returns {"packed": n, "dense": n, "bytes"}."""
    from safetensors.numpy import save_file

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with Container(src) as c:
        family, linears = plan_hf(c)
        tensors: dict[str, np.ndarray] = {}
        groups: dict[str, dict] = {}
        for name in model_tensors(c, "compressed-tensors"):
            t = c.tensor(name).per_row()
            hf = hf_name(name, family)
            if name in linears:
                module = hf.removesuffix(".weight")
                tensors[f"{module}.weight_packed"] = _packed(t.parts, t.qtype, t.shape)
                tensors[f"{module}.weight_scale"] = np.asarray(t.parts["scales"], dtype=np.float32)
                tensors[f"{module}.weight_shape"] = np.asarray(t.shape, dtype=np.int64)
                groups.setdefault(t.qtype.name, {"targets": [], "weights": _scheme(t.qtype)})["targets"].append(module)
            else:
                tensors[hf] = dequantize(t.parts, t.qtype, t.shape)  # float tensors as float32 too
        config = _config(c.meta, family, groups)
        try:
            tmp.mkdir(parents=False)
        except FileNotFoundError:
            raise LowbitError(f"{out.parent}: no such folder") from None
        try:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            os.chmod(tmp / "model.safetensors", 0o644)  # safetensors creates it owner-only
            _write_json(tmp / "config.json", config)
            _write_tokenizer(tmp, c.meta, c.blobs())
            _replace_folder(tmp, out, force)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise LowbitError(f"{out}: cannot write ({e.strerror or e})") from None
            raise
    return {"packed": len(linears), "dense": len(tensors) - 3 * len(linears),
            "bytes": sum(a.nbytes for a in tensors.values())}  # fmt: skip


def _config(meta: dict, family: str, groups: dict[str, dict]) -> dict:
    cfg = {k: v for k, v in meta.get("hf_config", {}).items() if k not in ("quantization_config", "torch_dtype")}
    model_type = cfg.get("model_type") or meta["architecture"].get("model_type") or family
    cfg["model_type"] = model_type
    cfg.setdefault("architectures", [ARCHITECTURES.get(model_type, ARCHITECTURES[family])])
    cfg["dtype"] = "float32"
    gen = meta.get("generation", {})
    if gen.get("bos_token_id") is not None:
        cfg["bos_token_id"] = gen["bos_token_id"]
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": {**g, "input_activations": None, "output_activations": None}
                          for i, g in enumerate(groups.values())},  # fmt: skip
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }
    return cfg


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(folder: Path, meta: dict, blobs: dict[str, bytes]) -> None:
    for name in ("tokenizer.json", "tokenizer.model"):
        if name in blobs:
            (folder / name).write_bytes(blobs[name])
    tok = meta.get("tokenizer", {})
    cfg = {k: tok.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token",
                                   "add_eos_token", "clean_up_tokenization_spaces", "chat_template")}  # fmt: skip
    cfg["tokenizer_class"] = tok.get("tokenizer_class") or "PreTrainedTokenizerFast"
    if tok.get("llama_pipeline"):
        cfg["legacy"] = bool(tok.get("legacy"))
        cfg["add_prefix_space"] = tok.get("add_prefix_space")
    cfg["added_tokens_decoder"] = {str(e["id"]): {k: e.get(k, False) for k in ("content", "special", "lstrip",
                                                                               "rstrip", "normalized", "single_word")}
                                   for e in tok.get("added_tokens", []) if isinstance(e.get("id"), int)}  # fmt: skip
    _write_json(folder / "tokenizer_config.json", {k: v for k, v in cfg.items() if v is not None})
    gen = meta.get("generation", {})
    _write_json(folder / "generation_config.json", {
        **({"bos_token_id": gen["bos_token_id"]} if gen.get("bos_token_id") is not None else {}),
        "eos_token_id": gen.get("eos_token_ids") or tok.get("eos_token_ids") or [],
    })  # fmt: skip


def _replace_folder(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise LowbitError(f"-o {out}: exists; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)
