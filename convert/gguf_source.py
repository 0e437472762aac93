"""A GGUF file (llama.cpp, Ollama, LM Studio) as a conversion source, read with llama.cpp's own Python reader.

:class:`GGUFSource` turns the metadata into what an HF folder gives the converter — an HF-style config for the
family (``model_type`` and config.json keys), the tokenizer (convert/gguf_tokenizer.py) — and maps the tensors to
lowbit's canonical names (which are llama.cpp's, with a few exceptions below). It undoes what llama.cpp's converter
did to the weights: the q/k row permutation of the ``llama`` architecture (interleaved RoPE pairs back to halves),
gemma's ``norm + 1``, phi3's fused ``ffn_up``, and llama3/longrope factors stored as tensors.

Weights: :meth:`GGUFSource.exact` gives a tensor in a lowbit type without re-rounding where one matches
(convert/gguf_quants.py); :meth:`GGUFSource.raw` dequantizes any type gguf-py can read to float32, so the source
also acts as a float checkpoint for re-quantization (``--bits``, ``--method``, ``--target-bpw``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lowbit.convert.gguf_quants import DECODERS
from lowbit.errors import SourceError
from lowbit.formats.qtypes import QType, get_qtype

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
# GGUF general.architecture -> HF model_type
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                 "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3"}  # fmt: skip
GEMMA = ("gemma", "gemma2", "gemma3")
RENAMES = {"post_attention_norm": "attn_post_norm", "post_ffw_norm": "ffn_post_norm"}
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
FLOAT_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f32"}


def qk_rows(name: str, rows: int, cfg: dict, interleaved: bool) -> np.ndarray | None:
    """llama.cpp's q/k row permutation of the ``llama`` architecture (each head's two rotary halves interleaved row
    by row), for tensor ``name`` of ``rows`` rows; None for tensors it does not touch. ``interleaved``: the order
    that reads a llama.cpp tensor back into halves (import), else the order that interleaves halves (export)."""
    if not name.endswith((".attn_q.weight", ".attn_k.weight", ".attn_q.bias", ".attn_k.bias")):
        return None
    heads = cfg["num_attention_heads"] if ".attn_q." in name else cfg["num_key_value_heads"]
    if rows % (2 * heads):
        raise SourceError(f"{name} has {rows} rows, not a multiple of 2 x {heads} heads")
    order = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)  # halves -> pairs
    return np.argsort(order) if interleaved else order


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that should be read as GGUF (named .gguf, or starting with the GGUF magic)."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _decimal(v) -> float:
    """A GGUF float32 value as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06): the value
    the source config most likely held, so that a model exported by lowbit imports back to the same numbers."""
    return float(repr(np.float32(v)).removeprefix("np.float32(").removesuffix(")"))


def _value(field):
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - a field gguf-py cannot decode is treated as absent
        return None


class GGUFSource:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise SourceError(f"{path}: cannot read ({e.strerror})") from None
        if magic != MAGIC:
            raise SourceError(f"{path}: not a GGUF file (no GGUF magic at the start)")
        try:
            from gguf import GGUFReader

            self.reader = GGUFReader(self.path, "r")
        except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError, struct.error, IndexError, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SourceError(f"{path}: corrupt or truncated GGUF file ({first})") from None
        self.fields = {k: _value(f) for k, f in self.reader.fields.items()}
        self.arch = self.fields.get("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise SourceError(
                f"{path}: unsupported GGUF architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.types = {name: t.tensor_type.name for name, t in self.tensors.items()}
        self.config = self._config()
        self._canon = {}
        for name in self.tensors:
            canon = self._canonical(name)
            if canon is not None:
                self._canon[canon] = name

    # ---------------------------------------------------------------------------------------------- metadata

    def _get(self, key: str, default=None):
        v = self.fields.get(f"{self.arch}.{key}")
        if isinstance(v, list):  # per-layer values (e.g. head_count_kv): all alike or unsupported
            if len(set(v)) != 1:
                raise SourceError(f"{self.path}: per-layer {key} values are not supported")
            v = v[0]
        return default if v is None else v

    def _need(self, key: str):
        v = self._get(key)
        if v is None:
            raise SourceError(f"{self.path}: GGUF metadata lacks {self.arch}.{key}")
        return v

    def _config(self) -> dict:
        """An HF config.json equivalent for the family's args_from_hf."""
        tokens = self.fields.get("tokenizer.ggml.tokens")
        embd = self.tensors.get("token_embd.weight")
        vocab = int(embd.shape[1]) if embd is not None else len(tokens or [])
        hidden, heads = int(self._need("embedding_length")), int(self._need("attention.head_count"))
        head_dim = int(self._get("attention.key_length", hidden // heads))
        cfg = {
            "model_type": ARCHITECTURES[self.arch],
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_hidden_layers": int(self._need("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._get("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "intermediate_size": int(self._need("feed_forward_length")),
            "rms_norm_eps": _decimal(self._get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": _decimal(self._get("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._get("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
        }
        rot = self._get("rope.dimension_count")
        if rot is not None and int(rot) != head_dim:
            cfg["partial_rotary_factor"] = int(rot) / head_dim
        window = self._get("attention.sliding_window")
        if window:
            cfg["sliding_window"] = int(window)
            cfg["use_sliding_window"] = True
        cfg.update(self._rope_scaling(cfg))
        if self.arch in GEMMA:
            cfg["hidden_activation"] = "gelu_pytorch_tanh"
            # llama.cpp's attention scale: 1/sqrt(hidden/heads) for the 27B models, else 1/sqrt(head_dim)
            big = (self.arch, cfg["num_hidden_layers"]) in (("gemma2", 46), ("gemma3", 62))
            cfg["query_pre_attn_scalar"] = hidden // heads if big else head_dim
        if self.arch == "gemma2":
            cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                  for i in range(cfg["num_hidden_layers"])]  # fmt: skip
        if self.arch in ("gemma2", "gemma3"):
            cfg["attn_logit_softcapping"] = self._get("attn_logit_softcapping")
            cfg["final_logit_softcapping"] = self._get("final_logit_softcapping")
        if self.arch == "gemma3":
            cfg["rope_local_base_freq"] = _decimal(self._get("rope.freq_base_swa", 10000.0))
        pattern = self.fields.get(f"{self.arch}.attention.sliding_window_pattern")
        if isinstance(pattern, list) and len(pattern) == cfg["num_hidden_layers"]:  # per layer: sliding or not
            cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        elif isinstance(pattern, int) and pattern > 0:
            cfg["sliding_window_pattern"] = pattern
        return cfg

    def _rope_scaling(self, cfg: dict) -> dict:
        kind = self._get("rope.scaling.type")
        if "rope_factors_long.weight" in self.tensors:  # phi3 longrope
            return {
                "original_max_position_embeddings": int(self._get("rope.scaling.original_context_length", 4096)),
                "rope_scaling": {
                    "rope_type": "longrope",
                    "long_factor": self._float_list("rope_factors_long.weight"),
                    "short_factor": self._float_list("rope_factors_short.weight"),
                    **({"attention_factor": a} if (a := self._get("rope.scaling.attn_factor")) else {}),
                },
            }
        if "rope_freqs.weight" in self.tensors:  # llama3: per-frequency divisors, stored as a tensor
            return {"rope_scaling": {"rope_type": "freq_factors", "factors": self._float_list("rope_freqs.weight")}}
        if kind in (None, "none"):
            return {}
        if kind == "linear":
            return {"rope_scaling": {"rope_type": "linear", "factor": _decimal(self._need("rope.scaling.factor"))}}
        raise SourceError(f"{self.path}: unsupported rope scaling {kind!r} (supported: linear, llama3, longrope)")

    def _float_list(self, name: str) -> list[float]:
        return [float(x) for x in self.raw_float(name).reshape(-1)]

    # ------------------------------------------------------------------------------------------------ tensors

    def _canonical(self, name: str) -> str | None:
        if name in ROPE_TENSORS:
            return None
        base, _, kind = name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3:
            sub = RENAMES.get(parts[2], parts[2])
            if self.arch == "phi3" and sub == "ffn_up":
                sub = "ffn_gate_up"  # llama.cpp keeps phi3's fused gate/up projection under ffn_up
            return f"blk.{parts[1]}.{sub}.{kind}"
        return name

    def names(self) -> list[str]:
        """Canonical names of the tensors the runtime needs."""
        return list(self._canon)

    def shape(self, canon: str) -> tuple[int, ...]:
        t = self.tensors[self._canon[canon]]
        return tuple(int(d) for d in reversed(t.shape.tolist())) if len(t.shape) > 1 else (int(t.shape[0]),)

    def dtype(self, canon: str) -> str:
        """The safetensors-style dtype the converter sees (raw() dequantizes every quantized type to F32)."""
        return {"F16": "F16", "BF16": "BF16"}.get(self.types[self._canon[canon]], "F32")

    def gguf_type(self, canon: str) -> str:
        return self.types[self._canon[canon]]

    def _rows(self, canon: str) -> np.ndarray | None:
        """The row order that undoes llama.cpp's q/k permutation, or None when the tensor was not permuted."""
        if self.arch != "llama":
            return None
        return qk_rows(canon, self.shape(canon)[0], self.config, interleaved=True)

    def _dequantize(self, gguf_name: str, rows: slice = slice(None)) -> np.ndarray:
        """gguf-py's float32 dequantization of (some rows of) a tensor; SourceError for a type it cannot read."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        kind = self.types[gguf_name]
        try:
            return np.asarray(dequantize(np.asarray(self.tensors[gguf_name].data)[rows], GGMLQuantizationType[kind]),
                              dtype=np.float32)  # fmt: skip
        except (NotImplementedError, KeyError, ValueError) as e:
            raise SourceError(f"{self.path}: tensor {gguf_name} of type {kind} cannot be read ({e})") from None

    def raw_float(self, gguf_name: str) -> np.ndarray:
        shape = tuple(int(d) for d in reversed(self.tensors[gguf_name].shape.tolist()))
        return self._dequantize(gguf_name).reshape(shape)

    def check_readable(self, canon: str) -> None:
        """SourceError now, before any work, when gguf-py cannot dequantize this tensor's type (one row tried)."""
        name = self._canon[canon]
        if self.types[name] not in FLOAT_TYPES and self.types[name] not in DECODERS:
            self._dequantize(name, slice(0, 1))

    def raw(self, canon: str) -> tuple[str, np.ndarray]:
        """(dtype, array) like Checkpoint.raw: F16/BF16 (as uint16) as stored, every other type as float32."""
        name = self._canon[canon]
        t = self.tensors[name]
        kind = self.types[name]
        shape = self.shape(canon)
        if kind in ("F16", "BF16"):
            arr = np.asarray(t.data).view(np.float16 if kind == "F16" else np.uint16).reshape(shape)
            dtype = kind
        else:
            arr, dtype = self.raw_float(name), "F32"
        arr = self._unpermute(canon, arr)
        if self.arch in GEMMA and canon.endswith("norm.weight"):
            from lowbit.convert.source import to_f32

            arr, dtype = to_f32(dtype, arr) - np.float32(1.0), "F32"  # llama.cpp stores gemma's norms as 1 + w
        return dtype, arr

    def _unpermute(self, canon: str, arr: np.ndarray) -> np.ndarray:
        rows = self._rows(canon)
        return arr if rows is None else np.ascontiguousarray(arr[rows])

    def exact(self, canon: str) -> tuple[QType, dict[str, np.ndarray]]:
        """(lowbit type, stored parts) of a matrix whose GGUF type maps onto a lowbit type (gguf_quants.LOWBIT_TYPE)
        without re-rounding: its own codes and scales, or its floats."""
        name = self._canon[canon]
        kind = self.types[name]
        if kind in FLOAT_TYPES:
            dtype, arr = self.raw(canon)
            return get_qtype({"F16": "f16", "BF16": "bf16"}.get(dtype, "f32")), {"data": np.ascontiguousarray(arr)}
        raw = np.asarray(self.tensors[name].data).reshape(self.shape(canon)[0], -1)
        rows = self._rows(canon)
        return DECODERS[kind][0](raw if rows is None else raw[rows])

    def close(self) -> None:
        mm = getattr(self.reader, "data", None)
        if mm is not None and hasattr(mm, "_mmap"):
            mm._mmap.close()
