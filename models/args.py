"""The configuration every family shares: ``ModelArgs`` read from an HF config.json (families add fields through
``hf_fields``), and which layers attend through a sliding window."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from lowbit.errors import SourceError
from lowbit.models.common import check_rope, partial_rotary_factor, rope_config

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
