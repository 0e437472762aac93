"""The llama family: Llama 2/3/3.2 (llama3 rope scaling), TinyLlama, SmolLM, Mistral (sliding window), and the blocks
other families reuse.

Other families subclass ``ModelArgs`` (extra config fields through ``hf_fields``) and ``Model`` (overriding the
structural hooks ``load_layer``, ``setup_rope``, ``rope_for``, ``configure``, ``embed_tokens``, ``project_qkv``,
``act_mul``, ``mlp_block``, ``block``). Hooks compute only through the primitive methods of ``Model`` (``rmsnorm``,
``head_rmsnorm``, ``linear``, ``embedding``, ``columns``, ``apply_rope``, ``cache_write``, ``attend``, ``silu_mul``,
``gelu_tanh_mul``, ``add``, ``scale_by``, ``softcap``, ``resident``), never on the arrays directly, so that
``lowbit.models.device_forward`` runs every family on a GPU by overriding the primitives alone."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields

import numpy as np

from lowbit.errors import SourceError
from lowbit.kernels import blas, dispatch, kv_formats
from lowbit.kernels.heap import release_free_heap
from lowbit.models.common import (
    KVCache,
    Segments,
    cache_for,
    check_rope,
    partial_rotary_factor,
    rope_attention_factor,
    rope_config,
    rope_inv_freq,
    rope_tables,
)

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
SLIDING = "sliding_attention"


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
    sliding_window: int = 0  # 0: full attention everywhere
    layer_types: list[str] | None = None  # per layer "sliding_attention" / "full_attention"; None: all alike
    rotary_dim: int = 0  # dims of each head that RoPE rotates; 0: all of head_dim

    ACTIVATIONS = ("silu",)  # hidden_act values this family runs (a class constant, not a field)

    @classmethod
    def from_hf(cls, cfg: dict, **defaults) -> ModelArgs:
        try:
            args = cls.hf_fields(cfg, defaults)
        except (KeyError, TypeError, ValueError) as e:
            raise SourceError(f"config.json is missing or has a bad value for {e}") from None
        if args["num_attention_heads"] % args["num_key_value_heads"]:
            raise SourceError("num_attention_heads must be a multiple of num_key_value_heads")
        return cls(**args)

    @classmethod
    def hf_fields(cls, cfg: dict, defaults: dict) -> dict:
        """Field values from an HF config.json; ``defaults`` fill in keys the config lacks."""

        def get(key, fallback=None):
            return cfg[key] if cfg.get(key) is not None else defaults.get(key, fallback)

        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or defaults.get("hidden_act", "silu")
        if act not in cls.ACTIVATIONS:
            raise SourceError(
                f"unsupported hidden_act {act!r} for this family (expected {' or '.join(cls.ACTIVATIONS)})"
            )
        check_rope(cfg)
        theta, scaling = rope_config(cfg)
        head_dim = int(get("head_dim") or hidden // heads)
        rotary = int(head_dim * partial_rotary_factor(cfg))
        return dict(
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            head_dim=head_dim,
            intermediate_size=int(get("intermediate_size")),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            rotary_dim=0 if rotary == head_dim else rotary,
            **window_fields(cfg, defaults),
        )

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def window(self, layer: int) -> int:
        """Attention window of a layer (0: full attention)."""
        if not self.sliding_window or (self.layer_types is not None and self.layer_types[layer] != SLIDING):
            return 0
        return self.sliding_window


def window_fields(cfg: dict, defaults: dict) -> dict:
    """sliding_window + layer_types the way transformers 5 reads them: Mistral/Phi3 window every layer when
    sliding_window is set; Qwen2/Qwen3 only with use_sliding_window, on the layers layer_types marks sliding (else
    layers >= max_window_layers); Gemma2/3 on the layers layer_types marks."""
    use = cfg.get("use_sliding_window", defaults.get("use_sliding_window", True))
    window = int((cfg.get("sliding_window") if use else None) or 0)
    if not window or not defaults.get("per_layer_window"):
        return {"sliding_window": window, "layer_types": None}
    n = int(cfg["num_hidden_layers"]) if cfg.get("num_hidden_layers") is not None else defaults["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None and "max_window_layers" in cfg:
        types = [SLIDING if i >= int(cfg["max_window_layers"]) else "full_attention" for i in range(n)]
    if types is not None and len(types) != n:
        raise SourceError(f"layer_types has {len(types)} entries for {n} layers")
    return {"sliding_window": window, "layer_types": None if types is None else list(types)}


def args_from_hf(cfg: dict) -> ModelArgs:
    return ModelArgs.from_hf(cfg)


def make_sanitize(layer_names: dict[str, str], top_names: dict[str, str] = TOP_NAMES, prefixes: tuple = ()):
    """A sanitize(hf_name) for these name maps; ``prefixes`` are (prefix, replacement) pairs applied first (a None
    replacement drops the tensor, e.g. a vision tower)."""

    def sanitize(hf_name: str) -> str | None:
        """Canonical tensor name for an HF tensor name, or None for tensors the runtime does not need."""
        for pre, repl in prefixes:
            if hf_name.startswith(pre):
                if repl is None:
                    return None
                hf_name = repl + hf_name[len(pre) :]
                break
        if hf_name.endswith(IGNORED_SUFFIXES):
            return None
        base, _, kind = hf_name.rpartition(".")
        if base in top_names:
            return f"{top_names[base]}.{kind}"
        parts = base.split(".")
        if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers":
            sub = ".".join(parts[3:])
            if sub in layer_names:
                return f"blk.{int(parts[2])}.{layer_names[sub]}.{kind}"
        raise SourceError(f"unexpected tensor {hf_name!r} in checkpoint")

    return sanitize


sanitize = make_sanitize(LAYER_NAMES)


def make_expected(layer_names: dict[str, str]):
    def expected_tensors(args: ModelArgs) -> list[str]:
        """Canonical names that must be present (biases are optional)."""
        names = ["token_embd.weight", "output_norm.weight"]
        if not args.tie_word_embeddings:
            names.append("output.weight")
        for i in range(args.num_hidden_layers):
            names += [f"blk.{i}.{n}.weight" for n in layer_names.values()]
        return names

    return expected_tensors


expected_tensors = make_expected(LAYER_NAMES)


class Model:
    """Pre-norm decoder: attention (GQA, RoPE, optional sliding window) + SwiGLU MLP, RMSNorm."""

    NORM_OFFSET = 0.0  # added to every norm weight at load (gemma stores w and multiplies by 1 + w)

    def __init__(self, args: ModelArgs, container, ctx: int):
        self.args = args
        self.ctx = ctx
        self.c = container
        self.embed = self.weight("token_embd")
        tied = args.tie_word_embeddings and "output.weight" not in container
        self.lm_head = self.embed if tied else self.weight("output")
        self.out_norm = self.norm_weight("output_norm")
        self.layers = [self.load_layer(f"blk.{i}.") for i in range(args.num_hidden_layers)]
        # quantized layers compute on numba's threads; BLAS (low-rank terms, per-channel types' dequantized tiles)
        # then runs on one thread, since OpenBLAS's own threads spin between calls and would take numba's cores
        self.one_thread_blas = any(isinstance(w, dispatch.Weight) and w.f32 is None for w in self.layers[0].values())
        self.scale = 1.0 / float(np.sqrt(args.head_dim))
        self.attn_softcap = 0.0  # 0: none
        self.final_softcap = 0.0
        self.kv = kv_formats.DEFAULT  # storage formats of the caches new_cache makes
        self.compile_ahead = None  # a kernels.compile_ahead.CompileAhead on a cold start (attend waits for it)
        self.observer = None  # anything with observe(weight name, input): shown every matrix product's input
        # forward(prompt=True) sets this for its pass: every product on the prompt kernels, whose rows do not depend
        # on how many tokens share the pass (dispatch.linear's ``prompt``)
        self.prompt_pass = False
        self.setup_rope()
        self.configure()

    # ------------------------------------------------------------------------------------------ loading
    def weight(self, name: str) -> dispatch.Weight:
        bias = f"{name}.bias"
        b = dispatch.float_tensor(self.c.tensor(bias)) if bias in self.c else None
        return dispatch.Weight(self.c.tensor(f"{name}.weight"), b, **dispatch.weight_extras(self.c, name))

    def resident(self, a: np.ndarray) -> np.ndarray:
        """A float32 table the forward pass reads (norm weight, RoPE cos/sin) where the compute runs: ``a`` itself."""
        return a

    def norm_weight(self, name: str) -> np.ndarray:
        w = dispatch.float_tensor(self.c.tensor(f"{name}.weight"))
        return self.resident((w + np.float32(self.NORM_OFFSET)).astype(np.float32) if self.NORM_OFFSET else w)

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
        weights = [w for layer in self.layers for w in layer.values() if isinstance(w, dispatch.Weight)]
        return sum(dispatch.pack_for_batches(w) for w in {id(w): w for w in [*weights, self.lm_head]}.values())

    def setup_rope(self) -> None:
        a = self.args
        self.rot = a.rotary_dim or a.head_dim
        inv = rope_inv_freq(self.rot, a.rope_theta, a.rope_scaling, self.ctx)
        cos, sin = rope_tables(inv, self.ctx, rope_attention_factor(a.rope_scaling))
        self.cos, self.sin = self.resident(cos), self.resident(sin)

    def configure(self) -> None:
        """Family-specific settings once the weights are loaded (attention scale, soft-caps, ...)."""

    def rope_for(self, li: int) -> tuple[np.ndarray, np.ndarray]:
        return self.cos, self.sin

    def new_cache(self) -> KVCache:
        """An empty cache in the formats of ``self.kv`` (float16 unless set: kernels/kv_formats.py)."""
        return cache_for(self.args, self.ctx, self.kv)

    # ------------------------------------------------------------------------------------------ primitives
    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return dispatch.rmsnorm(x, w, self.args.rms_norm_eps)

    def head_rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """RMSNorm of each head of x[T, n_heads, head_dim] with one weight[head_dim] (q/k norms)."""
        return dispatch.head_rmsnorm(x, w, self.args.rms_norm_eps)

    def linear(self, w: dispatch.Weight, x: np.ndarray) -> np.ndarray:
        """Every matrix product of the forward pass goes through here; ``self.observer`` (calibration) is shown
        each input first."""
        if self.observer is not None:
            self.observer.observe(w.name, x)
        return dispatch.linear(w, x, self.prompt_pass)

    def linears(self, ws: list, x: np.ndarray) -> list[np.ndarray]:
        """Products of one input with several weights (q/k/v, gate/up): fused into one kernel call where the
        weights allow (dispatch.linear_many); one by one through ``linear`` while an observer watches."""
        if self.observer is not None or self.prompt_pass:
            return [self.linear(w, x) for w in ws]
        return dispatch.linear_many(ws, x)

    def embedding(self, w: dispatch.Weight, tokens: np.ndarray) -> np.ndarray:
        """Rows ``tokens`` of an embedding table: [T, cols]."""
        return dispatch.embed(w, np.asarray(tokens, dtype=np.int64))

    def columns(self, x: np.ndarray, lo: int, hi: int, contiguous: bool = True) -> np.ndarray:
        """x[:, lo:hi] of x[T, n] (a part of a fused projection), a contiguous array unless ``contiguous`` is False
        (then the CPU returns a view; a device always returns a new array)."""
        part = x[:, lo:hi]
        return np.ascontiguousarray(part) if contiguous else part

    def rope_rows(self, li: int, start: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin rows of positions start..start+t-1 for layer li."""
        cos, sin = self.rope_for(li)
        return cos[start : start + t], sin[start : start + t]

    def apply_rope(self, x: np.ndarray, li: int, start: int) -> None:
        cos, sin = self.rope_rows(li, start, x.shape[0])
        dispatch.rope_inplace(x if self.rot == x.shape[2] else x[:, :, : self.rot], cos, sin)

    def rope_and_cache(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, li: int, start: int, cache: KVCache) -> None:
        """apply_rope to q and k, then cache_write: one kernel call, unless apply_rope or cache_write is replaced
        (a device)."""
        if isinstance(cache, Segments):
            for c, s, a, b in cache.parts:
                self.rope_and_cache(q[a:b], k[a:b], v[a:b], li, s, c)
            return
        if type(self).apply_rope is not Model.apply_rope or type(self).cache_write is not Model.cache_write:
            self.apply_rope(q, li, start)
            self.apply_rope(k, li, start)
            self.cache_write(cache, li, k, v, start)
            return
        cos, sin = self.rope_rows(li, start, q.shape[0])
        qr = q if self.rot == q.shape[2] else q[:, :, : self.rot]
        dispatch.rope_qk_kv_write(qr, k, v, cos, sin, cache.layer(li), start)

    def add_norm(self, x: np.ndarray, a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x + a, rmsnorm(x + a, w)): one kernel call, unless add or rmsnorm is replaced (a device)."""
        if type(self).add is not Model.add or type(self).rmsnorm is not Model.rmsnorm:
            x = self.add(x, a)
            return x, self.rmsnorm(x, w)
        return dispatch.add_rmsnorm(x, a, w, self.args.rms_norm_eps)

    def shift_cache(self, cache: KVCache, held: int, keep: int, discard: int) -> None:
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

    def cache_write(self, cache: KVCache, li: int, k: np.ndarray, v: np.ndarray, start: int) -> None:
        """Keys and values [T, n_kv, hd] of positions start.. into layer li of the cache."""
        dispatch.kv_write(cache.layer(li), k, v, start)

    def attend(self, q: np.ndarray, li: int, start: int, cache: KVCache) -> np.ndarray:
        if isinstance(cache, Segments):
            return np.concatenate([self.attend(q[a:b], li, s, c) for c, s, a, b in cache.parts])
        w = self.args.window(li)
        ahead = self.compile_ahead
        if ahead is not None and ahead.finished:
            ahead = self.compile_ahead = None
        return dispatch.attention(q, cache.layer(li), start, self.scale, w, self.attn_softcap, ahead,
                                  self.prompt_pass)

    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return dispatch.silu_mul(gate, up, self.prompt_pass)

    def gelu_tanh_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return dispatch.gelu_tanh_mul(gate, up, self.prompt_pass)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a + b (the residual adds), a new array."""
        return a + b

    def scale_by(self, x: np.ndarray, s: float) -> np.ndarray:
        """x * s in float32; a device may scale x in place, so x must be an array nothing else uses."""
        return x * np.float32(s)

    def softcap(self, x: np.ndarray, cap: float) -> np.ndarray:
        return dispatch.softcap(x, cap)

    # ------------------------------------------------------------------------------------------ blocks
    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self.embedding(self.embed, tokens)

    def project_qkv(self, h: np.ndarray, layer: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q [T, n_heads, hd], k and v [T, n_kv, hd] before RoPE."""
        a = self.args
        t = h.shape[0]
        q, k, v = self.linears([layer["attn_q"], layer["attn_k"], layer["attn_v"]], h)
        q = q.reshape(t, a.num_attention_heads, a.head_dim)
        return q, k.reshape(t, a.num_key_value_heads, a.head_dim), v.reshape(t, a.num_key_value_heads, a.head_dim)

    def attention_block(self, h: np.ndarray, layer: dict, li: int, start: int, cache: KVCache) -> np.ndarray:
        """Attention on the already-normed input h [T, hidden]: projections, RoPE, cache write, attend, output."""
        t = h.shape[0]
        q, k, v = self.project_qkv(h, layer)
        self.rope_and_cache(q, k, v, li, start, cache)
        o = self.attend(q, li, start, cache)
        return self.linear(layer["attn_output"], o.reshape(t, o.size // t))

    def act_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self.silu_mul(gate, up)

    def mlp_block(self, h: np.ndarray, layer: dict) -> np.ndarray:
        """Gated MLP on the already-normed input h [T, hidden]."""
        gate, up = self.linears([layer["ffn_gate"], layer["ffn_up"]], h)
        return self.linear(layer["ffn_down"], self.act_mul(gate, up))

    def block(self, x: np.ndarray, layer: dict, li: int, start: int, cache: KVCache) -> np.ndarray:
        a = self.attention_block(self.rmsnorm(x, layer["attn_norm"]), layer, li, start, cache)
        x, h = self.add_norm(x, a, layer["ffn_norm"])
        return self.add(x, self.mlp_block(h, layer))

    def head_input(self, x: np.ndarray) -> np.ndarray:
        """The lm_head's input: the final norm of x[T, hidden]."""
        return self.rmsnorm(np.ascontiguousarray(x), self.out_norm)

    def head(self, x: np.ndarray) -> np.ndarray:
        """Final norm, lm_head and (if the family has one) logit soft-capping: [T, hidden] -> [T, vocab]."""
        logits = self.linear(self.lm_head, self.head_input(x))
        return self.softcap(logits, self.final_softcap) if self.final_softcap > 0 else logits

    def forward(self, tokens: np.ndarray, start: int, cache: KVCache, all_logits: bool = False,
                prompt: bool = False) -> np.ndarray:
        """Logits [T, vocab] (all_logits) or [1, vocab] for the last position, for tokens at start..start+T-1.
        With ``cache`` a :class:`Segments` (and ``start`` None), tokens are several sequences' rows and the logits
        are those of each sequence's last row, [S, vocab].
        More tokens than a ring cache takes in one pass (KVCache.max_tokens) run as several passes.
        ``prompt``: a prompt pass, whose keys/values a later prompt may reuse: every product on the prompt kernels,
        so each row is the same number however the prompt was cut into passes (engine.Engine.prefill)."""
        if prompt and not self.prompt_pass:
            self.prompt_pass = True
            try:
                return self._forward(tokens, start, cache, all_logits)
            finally:
                self.prompt_pass = False
        return self._forward(tokens, start, cache, all_logits)

    def _forward(self, tokens: np.ndarray, start: int, cache: KVCache, all_logits: bool) -> np.ndarray:
        limit = getattr(cache, "max_tokens", None)
        if isinstance(cache, Segments):
            if any(b - a > c.max_tokens for c, _, a, b in cache.parts):
                raise ValueError("a segment is longer than its cache takes in one pass")
        elif limit is not None and len(tokens) > limit:
            parts = [self._forward(tokens[i : i + limit], start + i, cache, all_logits)
                     for i in range(0, len(tokens), limit)]
            return np.concatenate(parts) if all_logits else parts[-1]
        with blas.one_thread() if self.one_thread_blas else contextlib.nullcontext():
            x = self.embed_tokens(tokens)
            if type(self).block is Model.block and type(self).add is Model.add and type(self).rmsnorm is Model.rmsnorm:
                x = self.fused_blocks(x, start, cache)
            else:
                for li, layer in enumerate(self.layers):
                    x = self.block(x, layer, li, start, cache)
            if isinstance(cache, Segments):
                logits = self.head(x[cache.last_rows])
            else:
                logits = self.head(x if all_logits else x[-1:])
        if len(tokens) > dispatch.SMALL_BATCH:  # a prompt's activations are freed: keep them from staying resident
            del x
            release_free_heap()
        return logits

    def fused_blocks(self, x: np.ndarray, start: int, cache: KVCache) -> np.ndarray:
        """The layers of :meth:`block`, with each residual add fused into the RMSNorm that follows it (the next
        layer's attention norm included): one kernel call where block takes two. Used when block, add and rmsnorm
        are not replaced."""
        h = self.rmsnorm(x, self.layers[0]["attn_norm"]) if self.layers else x
        last = len(self.layers) - 1
        for li, layer in enumerate(self.layers):
            a = self.attention_block(h, layer, li, start, cache)
            x, h = self.add_norm(x, a, layer["ffn_norm"])
            m = self.mlp_block(h, layer)
            if li == last:
                x = self.add(x, m)
            else:
                x, h = self.add_norm(x, m, self.layers[li + 1]["attn_norm"])
        return x
