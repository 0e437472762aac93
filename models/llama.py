"""The llama family: Llama 2/3/3.2 (llama3 rope scaling), TinyLlama, SmolLM, Mistral (sliding window as a context
limit), and the blocks other families reuse."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from lowbit.errors import SourceError
from lowbit.kernels import dispatch
from lowbit.models.common import KVCache, check_rope, rope_config, rope_inv_freq, rope_tables

# HF name fragments -> canonical names (llama.cpp-like, so recipes can talk about attn_v, ffn_down, ...)
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    sliding_window: int = 0

    @classmethod
    def from_hf(cls, cfg: dict, **defaults) -> ModelArgs:
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            act = cfg.get("hidden_act", "silu")
            if act != "silu":
                raise SourceError(f"unsupported hidden_act {act!r} for this family (expected silu)")
            check_rope(cfg)
            theta, scaling = rope_config(cfg)
            use_window = cfg.get("use_sliding_window", defaults.get("use_sliding_window", True))
            window = cfg.get("sliding_window") if use_window else None
            args = dict(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate_size=int(cfg["intermediate_size"]),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", defaults.get("tie_word_embeddings", False))),
                sliding_window=int(window or 0),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SourceError(f"config.json is missing or has a bad value for {e}") from None
        if args["num_attention_heads"] % args["num_key_value_heads"]:
            raise SourceError("num_attention_heads must be a multiple of num_key_value_heads")
        return cls(**args)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def args_from_hf(cfg: dict) -> ModelArgs:
    return ModelArgs.from_hf(cfg)


def sanitize(hf_name: str) -> str | None:
    """Canonical tensor name for an HF tensor name, or None for tensors the runtime does not need."""
    if hf_name.endswith(IGNORED_SUFFIXES):
        return None
    base, _, kind = hf_name.rpartition(".")
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers":
        sub = ".".join(parts[3:])
        if sub in LAYER_NAMES:
            return f"blk.{int(parts[2])}.{LAYER_NAMES[sub]}.{kind}"
    raise SourceError(f"unexpected tensor {hf_name!r} in checkpoint")


def expected_tensors(args: ModelArgs) -> list[str]:
    """Canonical names that must be present (biases are optional)."""
    names = ["token_embd.weight", "output_norm.weight"]
    if not args.tie_word_embeddings:
        names.append("output.weight")
    for i in range(args.num_hidden_layers):
        names += [f"blk.{i}.{n}.weight" for n in LAYER_NAMES.values()]
    return names


class Model:
    """Pre-norm decoder: attention (GQA, RoPE) + SwiGLU MLP, RMSNorm."""

    def __init__(self, args: ModelArgs, container, ctx: int):
        self.args = args
        self.ctx = ctx
        c = container

        def w(name: str) -> dispatch.Weight:
            bias = f"{name}.bias"
            b = dispatch.float_tensor(c.tensor(bias)) if bias in c else None
            return dispatch.Weight(c.tensor(f"{name}.weight"), b)

        def norm(name: str) -> np.ndarray:
            return dispatch.float_tensor(c.tensor(f"{name}.weight"))

        self.embed = w("token_embd")
        self.lm_head = self.embed if args.tie_word_embeddings and "output.weight" not in c else w("output")
        self.out_norm = norm("output_norm")
        self.layers = []
        for i in range(args.num_hidden_layers):
            p = f"blk.{i}."
            self.layers.append(
                {
                    "attn_norm": norm(p + "attn_norm"),
                    "ffn_norm": norm(p + "ffn_norm"),
                    **{k: w(p + k) for k in ("attn_q", "attn_k", "attn_v", "attn_output")},
                    **{k: w(p + k) for k in ("ffn_gate", "ffn_up", "ffn_down")},
                }
            )
        inv = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
        self.cos, self.sin = rope_tables(inv, ctx)
        self.scale = 1.0 / float(np.sqrt(args.head_dim))

    def new_cache(self) -> KVCache:
        a = self.args
        return KVCache(a.num_hidden_layers, a.num_key_value_heads, self.ctx, a.head_dim)

    def attention_block(self, x: np.ndarray, layer: dict, li: int, start: int, cache: KVCache) -> np.ndarray:
        a = self.args
        t = x.shape[0]
        h = dispatch.rmsnorm(x, layer["attn_norm"], a.rms_norm_eps)
        q = dispatch.linear(layer["attn_q"], h).reshape(t, a.num_attention_heads, a.head_dim)
        k = dispatch.linear(layer["attn_k"], h).reshape(t, a.num_key_value_heads, a.head_dim)
        v = dispatch.linear(layer["attn_v"], h).reshape(t, a.num_key_value_heads, a.head_dim)
        cos, sin = self.cos[start : start + t], self.sin[start : start + t]
        dispatch.rope_inplace(q, cos, sin)
        dispatch.rope_inplace(k, cos, sin)
        cache.k[li][:, start : start + t, :] = k.transpose(1, 0, 2)
        cache.v[li][:, start : start + t, :] = v.transpose(1, 0, 2)
        o = dispatch.attention(q, cache.k[li], cache.v[li], start, self.scale, a.sliding_window)
        return dispatch.linear(layer["attn_output"], o.reshape(t, -1))

    def mlp_block(self, x: np.ndarray, layer: dict) -> np.ndarray:
        h = dispatch.rmsnorm(x, layer["ffn_norm"], self.args.rms_norm_eps)
        act = dispatch.silu_mul(dispatch.linear(layer["ffn_gate"], h), dispatch.linear(layer["ffn_up"], h))
        return dispatch.linear(layer["ffn_down"], act)

    def forward(self, tokens: np.ndarray, start: int, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Logits [T, vocab] (all_logits) or [1, vocab] for the last position, for tokens at start..start+T-1."""
        x = dispatch.embed(self.embed, np.asarray(tokens, dtype=np.int64))
        for li, layer in enumerate(self.layers):
            x = x + self.attention_block(x, layer, li, start, cache)
            x = x + self.mlp_block(x, layer)
        if not all_logits:
            x = x[-1:]
        x = dispatch.rmsnorm(np.ascontiguousarray(x), self.out_norm, self.args.rms_norm_eps)
        return dispatch.linear(self.lm_head, x)
