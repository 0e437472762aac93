"""A container's tokenizer as GGUF ``tokenizer.*`` keys, the way llama.cpp's convert_hf_to_gguf.py writes them: the
inverse of convert/gguf_tokenizer.py, for ``lowbit export``.

- A sentencepiece ``tokenizer.model`` (preferred when present, as llama.cpp's converter prefers it for Llama models)
  becomes ``tokenizer.ggml.model = "llama"``: the pieces, their scores and types (normal, unknown, control, unused,
  byte), and ``add_space_prefix`` from the model's normalizer.
- A byte-level BPE ``tokenizer.json`` becomes ``"gpt2"``: the vocabulary by id (ids no token holds are
  ``[PAD{id}]``, unused), the merges in rank order, and ``tokenizer.ggml.pre``, the name llama.cpp knows the
  pre-tokenizer by. llama.cpp tells pre-tokenizers apart by hashing the tokens of a test text; here the
  pre-tokenizer's own description is matched against the ones llama.cpp implements (convert/gguf_tokenizer.py's
  regexes, and the forms transformers writes for the same models); an unknown one is refused, since llama.cpp would
  cut the text differently.

Added tokens marked special are control tokens (type 3), other added tokens user-defined (type 4). The special ids,
add_bos/add_eos and the chat template come from the container's tokenizer meta.
"""

from __future__ import annotations

import json

from lowbit.convert.gguf_tokenizer import CONTRACTIONS, GPT2_REGEX, PRE_TOKENIZERS
from lowbit.errors import LowbitError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# the name written for each of llama.cpp's pre-tokenizers (several names share one implementation)
PREFERRED = ("llama-bpe", "qwen2", "smollm", "gpt-2", "default")
# transformers' spelling of the contractions that llama.cpp's regexes spell out
_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# ByteLevel with use_regex: transformers' GPT-2 split (llama.cpp's, with a final \s+)
_HF_BYTE_LEVEL = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _pre_regexes(pre: dict | None) -> tuple[str, ...] | None:
    """The split regexes a tokenizer.json pre-tokenizer applies, in order (None: something else than splits)."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    out: list[str] = []
    for step in steps:
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "Split" and isinstance(step.get("pattern"), dict) and "Regex" in step["pattern"]:
            out.append(step["pattern"]["Regex"].replace(_HF_CONTRACTIONS, CONTRACTIONS))
        elif kind == "Digits":
            out.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            if step.get("use_regex", True):
                out.append(GPT2_REGEX)
        else:
            return None
    return tuple(r.replace(_HF_BYTE_LEVEL, GPT2_REGEX) for r in out)


def pre_name(tok_json: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level BPE tokenizer.json's pre-tokenizer."""
    regexes = _pre_regexes(tok_json.get("pre_tokenizer"))
    for name in PREFERRED:
        known = PRE_TOKENIZERS[name][0]
        # llama.cpp's own GPT-2 regex lacks transformers' final \s+, which changes no split
        if regexes is not None and tuple(r.removesuffix(r"|\s+") for r in regexes) == tuple(
            r.removesuffix(r"|\s+") for r in known
        ):
            return name
    raise LowbitError(
        "the tokenizer's pre-tokenizer is not one llama.cpp implements (known: "
        f"{', '.join(PREFERRED)}); a GGUF would cut text differently, so it is not exported"
    )


def vocab_fields(tok_meta: dict, blobs: dict[str, bytes], vocab_size: int) -> dict[str, tuple[str, object]]:
    """GGUF key -> (value kind, value) for the tokenizer: kinds are ``str``, ``u32``, ``bool``, ``strs``, ``i32s``,
    ``f32s`` (the writer picks the GGUF type from them)."""
    if "tokenizer.model" in blobs:
        fields = _spm(blobs["tokenizer.model"], tok_meta, vocab_size)
    elif "tokenizer.json" in blobs:
        fields = _bpe(blobs["tokenizer.json"], tok_meta, vocab_size)
    else:
        raise LowbitError("the container has no tokenizer to export")
    for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        tid = tok_meta.get(f"{key}_token_id")
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            fields[f"tokenizer.ggml.{gguf_key}_token_id"] = ("u32", tid)
    fields["tokenizer.ggml.add_bos_token"] = ("bool", bool(tok_meta.get("add_bos_token")))
    if tok_meta.get("add_eos_token"):
        fields["tokenizer.ggml.add_eos_token"] = ("bool", True)
    if isinstance(tok_meta.get("chat_template"), str):
        fields["tokenizer.chat_template"] = ("str", tok_meta["chat_template"])
    return fields


def _added(tok_meta: dict, tok_json: dict | None) -> dict[int, dict]:
    entries = (tok_json or {}).get("added_tokens") or tok_meta.get("added_tokens") or []
    return {int(e["id"]): e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), int)}


def _bpe(data: bytes, tok_meta: dict, vocab_size: int) -> dict[str, tuple[str, object]]:
    try:
        tok = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(f"the container's tokenizer.json is not valid JSON ({e})") from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(tok):
        raise LowbitError("only byte-level BPE tokenizer.json files (and sentencepiece models) can be exported to GGUF")
    tokens: list[str | None] = [None] * vocab_size
    types = [NORMAL] * vocab_size
    for text, tid in model.get("vocab", {}).items():
        _place(tokens, tid, text)
    for tid, e in _added(tok_meta, tok).items():
        _place(tokens, tid, e["content"])
        types[tid] = CONTROL if e.get("special") else USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "tokenizer.ggml.model": ("str", "gpt2"),
        "tokenizer.ggml.pre": ("str", pre_name(tok)),
        "tokenizer.ggml.tokens": ("strs", tokens),
        "tokenizer.ggml.token_type": ("i32s", types),
        "tokenizer.ggml.merges": ("strs", merges),
        "tokenizer.ggml.add_space_prefix": ("bool", False),
    }


def _byte_level(tok: dict) -> bool:
    return '"ByteLevel"' in json.dumps([tok.get("pre_tokenizer"), tok.get("decoder")])


def _place(tokens: list, tid, text: str) -> None:
    if not isinstance(tid, int) or not 0 <= tid < len(tokens):
        raise LowbitError(f"token {text!r} has id {tid}, outside the model's {len(tokens)} embeddings")
    tokens[tid] = text


def _spm(proto: bytes, tok_meta: dict, vocab_size: int) -> dict[str, tuple[str, object]]:
    import sentencepiece

    from lowbit.formats.tokenizer_backends import spm_adds_dummy_prefix

    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, TypeError, OSError) as e:
        raise LowbitError(f"the container's tokenizer.model is not a sentencepiece model ({e})") from None
    n = sp.get_piece_size()
    if n > vocab_size:
        raise LowbitError(f"the tokenizer has {n} pieces for the model's {vocab_size} embeddings")
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        kind = NORMAL
        if sp.is_unknown(i):
            kind = UNKNOWN
        elif sp.is_control(i):
            kind = CONTROL
        elif sp.is_unused(i):
            kind = UNUSED
        elif sp.is_byte(i):
            kind = BYTE
        types.append(kind)
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    scores += [-1000.0] * (vocab_size - n)
    types += [UNUSED] * (vocab_size - n)
    for tid, e in _added(tok_meta, None).items():
        if 0 <= tid < vocab_size and (tid >= n or tokens[tid] == e["content"]):
            tokens[tid] = e["content"]
            types[tid] = CONTROL if e.get("special") else USER_DEFINED
    return {
        "tokenizer.ggml.model": ("str", "llama"),
        "tokenizer.ggml.pre": ("str", "default"),
        "tokenizer.ggml.tokens": ("strs", tokens),
        "tokenizer.ggml.scores": ("f32s", scores),
        "tokenizer.ggml.token_type": ("i32s", types),
        "tokenizer.ggml.add_space_prefix": ("bool", spm_adds_dummy_prefix(proto)),
    }
