"""The llama family: Llama 2/3/3.2 (llama3 rope scaling), TinyLlama, SmolLM, Mistral (sliding window), and the blocks
other families reuse.

Other families subclass ``ModelArgs`` (models/args.py; extra config fields through ``hf_fields``) and ``Model``
(overriding the structural hooks ``load_layer``, ``setup_rope``, ``rope_for``, ``configure``, ``embed_tokens``,
``project_qkv``, ``act_mul``, ``mlp_block``, ``block``, ``layers_forward``). The model never touches a kernel: every
step computes through ``self.ops``, the backend object it was given (kernels/ops.py: ``CpuOps`` by default,
``CudaOps`` on a GPU), so one model class runs on every backend."""

from __future__ import annotations

import numpy as np

from lowbit.kernels import kv_formats
from lowbit.kernels.dispatch import float_tensor
from lowbit.kernels.ops import CpuOps
from lowbit.models.args import SLIDING, ModelArgs, window_fields
from lowbit.models.common import Segments, cache_for, rope_attention_factor, rope_inv_freq, rope_tables
from lowbit.models.names import make_expected, make_sanitize

__all__ = ["SLIDING", "Model", "ModelArgs", "args_from_hf", "expected_tensors", "sanitize", "window_fields"]

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
sanitize = make_sanitize(LAYER_NAMES)
expected_tensors = make_expected(LAYER_NAMES)


def args_from_hf(cfg: dict) -> ModelArgs:
    return ModelArgs.from_hf(cfg)


class Model:
    """Pre-norm decoder: attention (GQA, RoPE, optional sliding window) + SwiGLU MLP, RMSNorm."""

    NORM_OFFSET = 0.0  # added to every norm weight at load (gemma stores w and multiplies by 1 + w)

    def __init__(self, args: ModelArgs, container, ctx: int, ops=None):
        self.args = args
        self.ctx = ctx
        self.c = container
        self.ops = CpuOps() if ops is None else ops
        self.embed = self.weight("token_embd")
        tied = args.tie_word_embeddings and "output.weight" not in container
        self.lm_head = self.embed if tied else self.weight("output")
        self.out_norm = self.norm_weight("output_norm")
        self.layers = [self.load_layer(f"blk.{i}.") for i in range(args.num_hidden_layers)]
        self.ops.loaded(self.layers[0].values() if self.layers else ())
        self.scale = 1.0 / float(np.sqrt(args.head_dim))
        self.attn_softcap = 0.0  # 0: none
        self.final_softcap = 0.0
        self.kv = kv_formats.DEFAULT  # storage formats of the caches new_cache makes
        self._decode_plan = None  # the backend's plan for one-token passes in fused calls per layer; False: none
        self.setup_rope()
        self.configure()

    # ------------------------------------------------------------------------------------------ loading
    def weight(self, name: str):
        return self.ops.weight(self.c, name)

    def norm_weight(self, name: str):
        w = float_tensor(self.c.tensor(f"{name}.weight"))
        return self.ops.table((w + np.float32(self.NORM_OFFSET)).astype(np.float32) if self.NORM_OFFSET else w)

    def load_layer(self, p: str) -> dict:
        return {
            "attn_norm": self.norm_weight(p + "attn_norm"),
            "ffn_norm": self.norm_weight(p + "ffn_norm"),
            **{k: self.weight(p + k) for k in ("attn_q", "attn_k", "attn_v", "attn_output")},
            **{k: self.weight(p + k) for k in ("ffn_gate", "ffn_up", "ffn_down")},
        }

    def pack_for_batches(self) -> int:
        """Unpack the quantized matrices for decode passes of several sequences (kernels/packed.py); the bytes
        added."""
        weights = [w for layer in self.layers for w in layer.values()] + [self.lm_head]
        return self.ops.pack_for_batches({id(w): w for w in weights}.values())

    def setup_rope(self) -> None:
        a = self.args
        self.rot = a.rotary_dim or a.head_dim
        inv = rope_inv_freq(self.rot, a.rope_theta, a.rope_scaling, self.ctx)
        cos, sin = rope_tables(inv, self.ctx, rope_attention_factor(a.rope_scaling))
        self.cos, self.sin = self.ops.table(cos), self.ops.table(sin)

    def configure(self) -> None:
        """Family-specific settings once the weights are loaded (attention scale, soft-caps, ...)."""

    def rope_for(self, li: int) -> tuple[np.ndarray, np.ndarray]:
        return self.cos, self.sin

    def new_cache(self):
        """An empty cache of the backend in the formats of ``self.kv`` (float16 unless set: kernels/kv_formats.py)."""
        return cache_for(self.args, self.ctx, self.kv, self.ops.new_cache)

    def rope_rows(self, li: int, start: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin rows of positions start..start+t-1 for layer li."""
        cos, sin = self.rope_for(li)
        return cos[start : start + t], sin[start : start + t]

    def shift_cache(self, cache, held: int, keep: int, discard: int) -> None:
        """Context shift (KVCache.shift): drop positions keep..keep+discard-1; the later keys are rotated back by
        ``discard`` positions (RoPE composes: R(p - d) = R(-d) R(p)), each layer with its own tables."""

        def rotate(li: int, keys: np.ndarray) -> np.ndarray:
            cos, sin = self.rope_rows(li, discard, 1)
            c, s = cos[0].astype(np.float64), sin[0].astype(np.float64)
            norm = np.sqrt(c * c + s * s)  # the tables may carry an attention factor (longrope): a pure rotation
            c, s = (c / norm).astype(np.float32), (-s / norm).astype(np.float32)
            half = self.rot // 2
            x1, x2 = keys[..., :half].copy(), keys[..., half : self.rot].copy()
            keys[..., :half] = x1 * c - x2 * s
            keys[..., half : self.rot] = x2 * c + x1 * s
            return keys

        cache.shift(held, keep, discard, rotate)

    # ------------------------------------------------------------------------------------------ blocks
    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return self.ops.rmsnorm(x, w, self.args.rms_norm_eps)

    def head_rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """RMSNorm of each head of x[T, n_heads, head_dim] with one weight[head_dim] (q/k norms)."""
        return self.ops.head_rmsnorm(x, w, self.args.rms_norm_eps)

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self.ops.embedding(self.embed, tokens)

    def project_qkv(self, h: np.ndarray, layer: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q [T, n_heads, hd], k and v [T, n_kv, hd] before RoPE."""
        a = self.args
        t = h.shape[0]
        q, k, v = self.ops.linears([layer["attn_q"], layer["attn_k"], layer["attn_v"]], h)
        q = q.reshape(t, a.num_attention_heads, a.head_dim)
        return q, k.reshape(t, a.num_key_value_heads, a.head_dim), v.reshape(t, a.num_key_value_heads, a.head_dim)

    def rope_and_cache(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, li: int, start: int, cache) -> None:
        """RoPE of q and k at positions start.., then k and v into layer li of the cache."""
        cos, sin = self.rope_for(li)
        if isinstance(cache, Segments):
            if cache.steps:  # one token of each sequence: one call for all
                self.ops.rope_and_cache_steps(q, k, v, cos, sin, self.rot, cache.layers(li), cache.starts)
                return
            for c, s, a, b in cache.parts:
                self.rope_and_cache(q[a:b], k[a:b], v[a:b], li, s, c)
            return
        self.ops.rope_and_cache(q, k, v, cos, sin, self.rot, cache.layer(li), start)

    def attend(self, q: np.ndarray, li: int, start: int, cache) -> np.ndarray:
        if isinstance(cache, Segments):
            if cache.steps:
                return self.ops.attend_steps(q, cache.layers(li), cache.starts, self.scale, self.args.window(li),
                                             self.attn_softcap)  # fmt: skip
            return np.concatenate([self.attend(q[a:b], li, s, c) for c, s, a, b in cache.parts])
        return self.ops.attend(q, cache.layer(li), start, self.scale, self.args.window(li), self.attn_softcap)

    def attention_block(self, h: np.ndarray, layer: dict, li: int, start: int, cache) -> np.ndarray:
        """Attention on the already-normed input h [T, hidden]: projections, RoPE, cache write, attend, output."""
        t = h.shape[0]
        q, k, v = self.project_qkv(h, layer)
        self.rope_and_cache(q, k, v, li, start, cache)
        o = self.attend(q, li, start, cache)
        return self.ops.linear(layer["attn_output"], o.reshape(t, o.size // t))

    def act_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self.ops.silu_mul(gate, up)

    def mlp_block(self, h: np.ndarray, layer: dict) -> np.ndarray:
        """Gated MLP on the already-normed input h [T, hidden]."""
        gate, up = self.ops.linears([layer["ffn_gate"], layer["ffn_up"]], h)
        return self.ops.linear(layer["ffn_down"], self.act_mul(gate, up))

    def block(self, x: np.ndarray, layer: dict, li: int, start: int, cache) -> np.ndarray:
        """One decoder layer on the residual stream x [T, hidden]."""
        a = self.attention_block(self.rmsnorm(x, layer["attn_norm"]), layer, li, start, cache)
        x, h = self.ops.add_norm(x, a, layer["ffn_norm"], self.args.rms_norm_eps)
        return self.ops.add(x, self.mlp_block(h, layer))

    def layers_forward(self, x: np.ndarray, start: int, cache) -> np.ndarray:
        """The layers of :meth:`block`, each residual add fused into the RMSNorm that follows it (the next layer's
        attention norm included): one kernel call where block takes two. A family whose block differs overrides
        this with :meth:`each_block`. One token of one sequence goes through the backend's fused decode layers
        where it has them (:meth:`fused_decode`)."""
        if x.shape[0] == 1 and not isinstance(cache, Segments):
            out = self.fused_decode(x, start, cache)
            if out is not None:
                return out
        eps = self.args.rms_norm_eps
        h = self.rmsnorm(x, self.layers[0]["attn_norm"]) if self.layers else x
        last = len(self.layers) - 1
        for li, layer in enumerate(self.layers):
            a = self.attention_block(h, layer, li, start, cache)
            x, h = self.ops.add_norm(x, a, layer["ffn_norm"], eps)
            m = self.mlp_block(h, layer)
            if li == last:
                x = self.ops.add(x, m)
            else:
                x, h = self.ops.add_norm(x, m, self.layers[li + 1]["attn_norm"], eps)
        return x

    # the structural hooks layers_forward computes with: a family that overrides one computes its own way, so its
    # layers do not take the backend's fused llama layer
    PLAIN_HOOKS = ("rmsnorm", "attention_block", "project_qkv", "rope_and_cache", "attend", "rope_for", "mlp_block",
                   "act_mul")  # fmt: skip

    def fused_decode(self, x: np.ndarray, start: int, cache) -> np.ndarray | None:
        """The residual stream after every layer for one token through the backend's fused decode layers
        (ops.decode_layers: the same numbers as the primitives), or None where the family, the weights or the
        moment do not allow it."""
        plan = self._decode_plan
        if plan is None:
            a = self.args
            plain = all(getattr(type(self), h) is getattr(Model, h) for h in self.PLAIN_HOOKS)
            if plain and self.rot == a.head_dim:
                windows = [a.window(i) for i in range(a.num_hidden_layers)]
                plan = self.ops.decode_plan(self.layers, a.rms_norm_eps, self.scale, self.attn_softcap, windows,
                                            a.num_attention_heads)  # fmt: skip
            plan = self._decode_plan = plan or False
        if plan is False:
            return None
        return self.ops.decode_layers(plan, x, cache, start, self.cos, self.sin)

    def each_block(self, x: np.ndarray, start: int, cache) -> np.ndarray:
        """The layers, one :meth:`block` call each."""
        for li, layer in enumerate(self.layers):
            x = self.block(x, layer, li, start, cache)
        return x

    def head_input(self, x: np.ndarray) -> np.ndarray:
        """The lm_head's input: the final norm of x[T, hidden]."""
        return self.rmsnorm(x, self.out_norm)

    def head(self, x: np.ndarray) -> np.ndarray:
        """Final norm, lm_head and (if the family has one) logit soft-capping: [T, hidden] -> [T, vocab]."""
        logits = self.ops.linear(self.lm_head, self.head_input(x))
        return self.ops.softcap(logits, self.final_softcap) if self.final_softcap > 0 else logits

    def forward(self, tokens: np.ndarray, start: int, cache, all_logits: bool = False,
                prompt: bool = False) -> np.ndarray:
        """Host logits [T, vocab] (all_logits) or [1, vocab] for the last position, for tokens at start..start+T-1.
        With ``cache`` a :class:`Segments` (and ``start`` None), tokens are several sequences' rows and the logits
        are those of each sequence's last row, [S, vocab].
        More tokens than a ring cache takes in one pass (KVCache.max_tokens) run as several passes.
        ``prompt``: a prompt pass, whose keys/values a later prompt may reuse: every product on the prompt kernels,
        so each row is the same number however the prompt was cut into passes (engine.Engine.prefill)."""
        limit = getattr(cache, "max_tokens", None)
        if isinstance(cache, Segments):
            if any(b - a > c.max_tokens for c, _, a, b in cache.parts):
                raise ValueError("a segment is longer than its cache takes in one pass")
        elif limit is not None and len(tokens) > limit:
            parts = [self.forward(tokens[i : i + limit], start + i, cache, all_logits, prompt)
                     for i in range(0, len(tokens), limit)]
            return np.concatenate(parts) if all_logits else parts[-1]
        with self.ops.forward_pass(len(tokens), prompt):
            x = self.layers_forward(self.embed_tokens(tokens), start, cache)
            if isinstance(cache, Segments):
                x = x[cache.last_rows]
            elif not all_logits:
                x = x[x.shape[0] - 1 :]
            logits = self.ops.to_host(self.head(x))
            del x  # before the pass ends (a prompt's activations are released then)
            return logits
