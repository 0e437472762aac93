"""Tiny GGUF files for the tests, written with the `gguf` package's writer from a tiny transformers checkpoint the way
llama.cpp's convert_hf_to_gguf.py lays them out: its tensor names, q/k rows permuted for the llama architecture
(RoPE pairs interleaved), gemma's norms stored as 1 + w, phi3's gate/up fused under ffn_up with its longrope factors
as tensors, llama3 rope scaling as a rope_freqs tensor, and the SentencePiece vocabulary of the checkpoint's
tokenizer.model as tokens/scores/types."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# HF config model_type -> GGUF architecture
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
        "gemma3_text": "gemma3", "phi3": "phi3"}  # fmt: skip
LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
}  # fmt: skip
SANDWICH = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
            "post_feedforward_layernorm": "post_ffw_norm"}  # fmt: skip
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's two rotary halves interleaved row by row."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(rope: dict, head_dim: int) -> np.ndarray:
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def spm_vocab(tokenizer_model: Path) -> tuple[list[str], list[float], list[int]]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
                     5 if sp.is_unused(i) else 1)  # fmt: skip
    return tokens, scores, types


def write_gguf(folder: Path, out: Path, qtype: str = "F32") -> Path:
    """``folder`` (a tiny HF checkpoint with a sentencepiece tokenizer.model) as a GGUF at ``out``; matrices stored as
    ``qtype`` (F32, or a type gguf-py can quantize: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)."""
    import gguf
    from gguf.quants import quantize
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    mt = cfg["model_type"]
    arch = ARCH[mt]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = cfg.get("rope_parameters") or {}
    if mt == "gemma3_text":
        rope = rope.get("full_attention", rope)
    w.add_rope_freq_base(float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0))
    rot = int(head_dim * float(rope.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0))
    w.add_rope_dimension_count(rot)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if cfg.get("sliding_window") and mt in ("phi3", "gemma2", "gemma3_text"):
        w.add_sliding_window(cfg["sliding_window"])
    if mt in ("gemma2", "gemma3_text"):
        for key, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                         ("final_logit_softcapping", w.add_final_logit_softcapping)):  # fmt: skip
            if cfg.get(key):
                add(cfg[key])
    tokens, scores, types = spm_vocab(folder / "tokenizer.model")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(mt not in ("gemma", "gemma2", "gemma3_text"))
    template = folder / "chat_template.jinja"
    if template.is_file():
        w.add_chat_template(template.read_text())

    tensors = load_file(str(folder / "model.safetensors"))
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_factors(rope, head_dim))
    if rope.get("rope_type") == "longrope":
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
        w.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])
    for name, arr in tensors.items():
        arr = arr.astype(np.float32)
        base, _, kind = name.rpartition(".")
        if base in TOP:
            gname = f"{TOP[base]}.{kind}"
        else:
            parts = base.split(".")
            sub = ".".join(parts[3:])
            post = "ffn_norm" if sub == "post_attention_layernorm" and mt not in ("gemma2", "gemma3_text") else None
            gname = f"blk.{parts[2]}.{post or LAYER.get(sub) or SANDWICH[sub]}.{kind}"
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            arr = _permute(arr, heads if ".attn_q." in gname else kv)
        if arch.startswith("gemma") and gname.endswith("norm.weight"):
            arr = arr + 1.0
        if arr.ndim == 2 and qtype != "F32" and gname != "token_embd.weight":
            kind_q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gname, quantize(arr, kind_q), raw_dtype=kind_q)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
