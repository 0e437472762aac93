"""What a container's header promises, checked before a model is built from it: every architecture argument has its
type and a sane range, the tensor table has every tensor the family needs in the shape the arguments imply, and the
header's other sections have the types the runtime reads. Anything else is a FormatError of one line, so a hostile
or damaged header can neither crash the runtime nor make it compute something other than what the file says.

Plain checks rather than a schema library: the rules are ranges and relations between fields (heads divide, shapes
follow from dimensions) more than types, and the families' argument dataclasses are the schema of the types.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from lowbit.errors import FormatError
from lowbit.models.common import SUPPORTED_ROPE

# upper bounds far above any real model and far below what would exhaust memory or time before a tensor is read
LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "intermediate_size": 1 << 20,
    "max_position_embeddings": 1 << 24,
    "sliding_window": 1 << 24,
    "rotary_dim": 1024,
}
POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "max_position_embeddings")
FLOAT_MAX = 1e12  # any float argument (rope theta, scalars, caps)


def load_args(container):
    """(family name, family module, ModelArgs) of a container whose header passed every check here."""
    from lowbit.errors import SourceError
    from lowbit.models import family_for

    path = container.path
    check_meta(container.meta, path)
    arch = container.meta["architecture"]
    try:
        fam_name, family = family_for(arch["model_type"])
    except SourceError as e:
        raise FormatError(f"{path}: {e}") from None
    given = arch["args"]
    need = [f.name for f in dataclasses.fields(family.ModelArgs)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in need if n not in given]
    if missing:
        raise FormatError(f"{path}: corrupt header (architecture.args: missing {', '.join(missing)})")
    args = family.ModelArgs.from_dict(given)
    check_args(args, path)
    check_tensors(args, family, container)
    return fam_name, family, args


def check_args(args, path) -> None:
    """FormatError unless ``args`` (a family's ModelArgs, built from the header) is a model the runtime can run."""

    def fail(msg: str) -> FormatError:
        return FormatError(f"{path}: corrupt header (architecture.args: {msg})")

    hints = typing.get_type_hints(type(args))
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if not _type_ok(value, hints[f.name]):
            raise fail(f"{f.name} = {_short(value)} is not a {_type_name(hints[f.name])}")
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT_MAX):
            raise fail(f"{f.name} = {value} is out of range")
        if isinstance(value, int) and not isinstance(value, bool):
            lo = 1 if f.name in POSITIVE else 0
            if not lo <= value <= LIMITS.get(f.name, 1 << 30):
                raise fail(f"{f.name} = {value} is out of range")
    a = args
    if a.num_attention_heads % a.num_key_value_heads:
        raise fail("num_attention_heads must be a multiple of num_key_value_heads")
    rot = a.rotary_dim or a.head_dim
    if rot % 2 or rot > a.head_dim:
        raise fail(f"the rotated dims ({rot}) must be even and at most head_dim ({a.head_dim})")
    if not 0 < a.rms_norm_eps < 1:
        raise fail(f"rms_norm_eps = {a.rms_norm_eps} is out of range")
    for f in dataclasses.fields(a):  # family fields by kind: RoPE bases, attention scalars, soft-caps
        v = getattr(a, f.name)
        bad = ((f.name.endswith("theta") and not v >= 1) or (f.name.endswith("scalar") and not v > 0)
               or (f.name.endswith("softcapping") and not v >= 0))
        if bad:
            raise fail(f"{f.name} = {v} is out of range")
    for name in ("rope_scaling", "rope_local_scaling"):
        _check_scaling(getattr(a, name, None), name, rot, fail)
    if a.layer_types is not None:
        if len(a.layer_types) != a.num_hidden_layers:
            raise fail(f"layer_types has {len(a.layer_types)} entries for {a.num_hidden_layers} layers")
        if any(t not in ("sliding_attention", "full_attention") for t in a.layer_types):
            raise fail("layer_types entries must be sliding_attention or full_attention")


def _check_scaling(s, name: str, rot: int, fail) -> None:
    if s is None:
        return
    kind = s.get("rope_type")
    if kind not in SUPPORTED_ROPE:
        raise fail(f"{name}.rope_type {_short(kind)} is not one of {', '.join(SUPPORTED_ROPE)}")
    for key, v in s.items():
        if key == "rope_type":
            continue
        vals = v if isinstance(v, list) else [v]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 < x <= FLOAT_MAX
                   for x in vals):
            raise fail(f"{name}.{key} must hold positive finite numbers")
    for key in ("short_factor", "long_factor", "factors"):
        if key in s and (not isinstance(s[key], list) or len(s[key]) != rot // 2):
            raise fail(f"{name}.{key} must have {rot // 2} entries")


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list or hint is list:
        (item,) = typing.get_args(hint) or (object,)
        return isinstance(value, list) and all(item is object or _type_ok(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return True


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def expected_shape(name: str, args) -> tuple[int, ...] | None:
    """The shape a tensor of this name must have for ``args`` (None: a name whose shape no rule here knows)."""
    a = args
    h, hd, nh, nkv, inter = a.hidden_size, a.head_dim, a.num_attention_heads, a.num_key_value_heads, a.intermediate_size
    rows = {
        "attn_q": nh * hd, "attn_k": nkv * hd, "attn_v": nkv * hd, "attn_qkv": (nh + 2 * nkv) * hd,
        "ffn_gate": inter, "ffn_up": inter, "ffn_gate_up": 2 * inter,
    }
    top = {"token_embd.weight": (a.vocab_size, h), "output.weight": (a.vocab_size, h), "output_norm.weight": (h,)}
    if name in top:
        return top[name]
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk":
        return None
    kind, what = parts[2], parts[3]
    if kind in rows:
        return (rows[kind], h) if what == "weight" else (rows[kind],) if what == "bias" else None
    if kind == "attn_output":
        return (h, nh * hd) if what == "weight" else (h,) if what == "bias" else None
    if kind == "ffn_down":
        return (h, inter) if what == "weight" else (h,) if what == "bias" else None
    if kind in ("attn_norm", "ffn_norm", "attn_post_norm", "ffn_post_norm", "ffn_pre_norm"):
        return (h,) if what == "weight" else None
    if kind in ("attn_q_norm", "attn_k_norm"):
        return (hd,) if what == "weight" else None
    return None


def check_tensors(args, family, container) -> None:
    """FormatError unless every tensor the family needs is present and every known tensor has the shape ``args``
    imply (extra tensors of a weight are checked against their weight by the loader)."""
    missing = [n for n in family.expected_tensors(args) if n not in container]
    if missing:
        raise FormatError(f"{container.path}: corrupt header (missing tensor {missing[0]!r}"
                          + (f" and {len(missing) - 1} more)" if len(missing) > 1 else ")"))
    for name in container.tensor_names:
        want = expected_shape(name, args)
        if name.startswith("blk.") and int(name.split(".")[1]) >= args.num_hidden_layers:
            raise FormatError(f"{container.path}: corrupt header (tensor {name} beyond the "
                              f"{args.num_hidden_layers} layers)")
        got = container.tensor_shape(name)
        if want is not None and got != want:
            raise FormatError(f"{container.path}: corrupt header (tensor {name} has shape {list(got)}, the "
                              f"architecture says {list(want)})")


def check_meta(meta: dict, path) -> None:
    """The types of the header sections the runtime reads (architecture, tokenizer, generation, quantization,
    runtime)."""

    def fail(msg: str) -> FormatError:
        return FormatError(f"{path}: corrupt header ({msg})")

    arch = meta.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("model_type"), str) or not isinstance(
            arch.get("args"), dict):
        raise fail("architecture must hold a model_type and args")
    for key in ("tokenizer", "generation", "quantization", "runtime"):
        if key in meta and not isinstance(meta[key], dict):
            raise fail(f"{key} must be an object")
    if not isinstance(meta.get("tokenizer"), dict):
        raise fail("no tokenizer")
    gen = meta.get("generation") or {}
    eos = gen.get("eos_token_ids")
    if eos is not None and not (isinstance(eos, list) and all(_type_ok(e, int) for e in eos)):
        raise fail("generation.eos_token_ids must be a list of token ids")
    if not isinstance(gen.get("defaults", {}), dict):
        raise fail("generation.defaults must be an object")
    for key, value in meta["tokenizer"].items():
        if value is None:
            continue
        if key in _TOKENIZER_FLAGS:
            ok, what = isinstance(value, bool), "true or false"
        elif key.endswith("_id") or key == "vocab_size":
            ok, what = _type_ok(value, int), "a token id"
        elif key in _TOKENIZER_LISTS:
            ok, what = isinstance(value, list), "a list"
        elif key.endswith("_token") or key in ("chat_template", "tokenizer_class"):
            ok, what = isinstance(value, str), "text"
        else:
            continue
        if not ok:
            raise fail(f"tokenizer.{key} must be {what}")
    ids = meta["tokenizer"].get("eos_token_ids")
    if ids is not None and not all(_type_ok(i, int) for i in ids):
        raise fail("tokenizer.eos_token_ids must be token ids")


_TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token", "special_tokens_explicit", "clean_up_tokenization_spaces",
                    "split_special_tokens", "llama_pipeline", "legacy", "add_prefix_space")
_TOKENIZER_LISTS = ("eos_token_ids", "added_tokens", "extra_special_tokens")
