"""A GGUF file's tokenizer as the tokenizer data lowbit stores: tokenization follows llama.cpp's.

- ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE): a ``tokenizer.json`` for the ``tokenizers`` library with the
  vocabulary, the merges in rank order, and the pre-tokenizer regexes llama.cpp uses for ``tokenizer.ggml.pre``
  (applied one after the other, each match isolated, then the byte-to-unicode mapping). An unknown ``pre`` is
  refused, as llama.cpp refuses it.
- ``tokenizer.ggml.model = "llama"`` (SentencePiece): a sentencepiece ``ModelProto`` (BPE over the pieces' scores,
  byte fallback), with llama.cpp's space prefix (``tokenizer.ggml.add_space_prefix``, default on) added at the start
  of the text and after every special token, as transformers' ``legacy`` LlamaTokenizer does.

Control tokens (type 3) become special added tokens (split out of text, dropped when decoding with special tokens
skipped); user-defined tokens (type 4) are added tokens that decode as text. BOS/EOS/UNK/PAD ids, add_bos/add_eos,
and the chat template come from their keys; llama.cpp's end-of-generation tokens (EOT, EOM, and control tokens such
as ``<|im_end|>`` or ``<end_of_turn>``) all stop generation.
"""

from __future__ import annotations

import json
import struct

from lowbit.errors import SourceError
from lowbit.formats.tokenizer import tokenizer_meta
from lowbit.formats.tokenizer_backends import encode_varint

CONTROL, USER_DEFINED = 3, 4

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_DIGITS_THEN_GPT2 = (r"\p{N}", GPT2_REGEX + r"|\s+")
# tokenizer.ggml.pre -> (regexes in order, ignore_merges), as llama.cpp's llama-vocab.cpp reads them
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **{k: ((_LLAMA3,), True) for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")},
    **{k: ((_QWEN2,), False) for k in ("qwen2", "qwen2.5", "qwen-2.5", "deepseek-r1-qwen", "megrez")},
    **{k: (_DIGITS_THEN_GPT2, False) for k in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")},
    **{k: ((GPT2_REGEX,), False) for k in ("gpt-2", "phi-2", "jina-es", "jina-de", "mpt", "olmo", "jais")},
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
}
# token texts llama.cpp treats as end of generation when they are control tokens
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "<|eom_id|>",
             "<|end_of_text|>", "</s>")  # fmt: skip


def gguf_tokenizer(fields: dict, origin: str) -> tuple[dict, dict[str, bytes]]:
    """(tokenizer meta, blobs) for the container from the GGUF metadata ``fields`` (key -> value)."""
    model = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise SourceError(f"{origin}: no tokenizer vocabulary (tokenizer.ggml.tokens)")
    n = len(tokens)
    types = fields.get("tokenizer.ggml.token_type") or [1] * n
    if len(types) != n:
        raise SourceError(f"{origin}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

    def token_id(key: str) -> int | None:
        v = fields.get(f"tokenizer.ggml.{key}")
        return int(v) if isinstance(v, int) and 0 <= v < n else None

    ids = {k: token_id(f"{k}_token_id") for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
    if model == "gpt2":
        blobs = {"tokenizer.json": _bpe_json(fields, tokens, types, origin)}
        add_bos_default = fields.get("tokenizer.ggml.pre") in ("llama3", "llama-v3", "llama-bpe")
        prefix, cls = False, None
    elif model == "llama":
        blobs = {"tokenizer.model": _spm_proto(fields, tokens, types, ids)}
        add_bos_default, prefix, cls = True, bool(fields.get("tokenizer.ggml.add_space_prefix", True)), "LlamaTokenizer"
    else:
        raise SourceError(f"{origin}: unsupported tokenizer model {model!r} (supported: gpt2 BPE, llama SentencePiece)")

    def text(i: int | None) -> str | None:
        return None if i is None else tokens[i]

    added = {str(i): {"content": t, "special": types[i] == CONTROL, "normalized": False}
             for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)}  # fmt: skip
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    add_eos = fields.get("tokenizer.ggml.add_eos_token")
    cfg = {
        "tokenizer_class": cls,
        "bos_token": text(ids["bos"]),
        "eos_token": text(ids["eos"]),
        "unk_token": text(ids["unknown"]),
        "pad_token": text(ids["padding"]),
        "add_bos_token": bool(add_bos_default if add_bos is None else add_bos),
        "add_eos_token": bool(add_eos),
        "legacy": True,  # llama.cpp puts the space prefix after every special token too
        "add_prefix_space": prefix,
        "added_tokens_decoder": added,
    }
    eog = {i for k in ("eos", "eot", "eom") if (i := ids[k]) is not None}
    eog |= {i for i, t in enumerate(tokens) if types[i] == CONTROL and t in EOG_TEXTS}
    template = fields.get("tokenizer.chat_template")
    return tokenizer_meta(
        blobs,
        cfg,
        model_cfg={"eos_token_id": sorted(eog)},
        gen_cfg={},
        special_map={},
        chat_template=template if isinstance(template, str) else None,
        origin=origin,
    )


def _bpe_json(fields: dict, tokens: list[str], types: list[int], origin: str) -> bytes:
    pre = fields.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise SourceError(
            f"{origin}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {', '.join(PRE_TOKENIZERS)}"
        )
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    merges = fields.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m[1:] for m in merges):
        raise SourceError(f"{origin}: BPE tokenizer without valid merges (tokenizer.ggml.merges)")
    splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in regexes]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": types[i] == CONTROL}
        for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)
    ]  # fmt: skip
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*splits, byte_level]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": [m.split(" ", 1) if m[0] != " " else [" ", m[2:]] for m in merges],
        },
    }  # fmt: skip
    return json.dumps(data, ensure_ascii=False).encode("utf-8")


# ------------------------------------------------------------------------------- a sentencepiece model, by hand


def _field(num: int, payload: bytes) -> bytes:  # length-delimited
    return encode_varint(num << 3 | 2) + encode_varint(len(payload)) + payload


def _int_field(num: int, v: int) -> bytes:
    return encode_varint(num << 3) + encode_varint(int(v))


def _spm_proto(fields: dict, tokens: list[str], types: list[int], ids: dict) -> bytes:
    """A sentencepiece ModelProto (BPE) with llama.cpp's pieces, scores and types (the numbering is the same)."""
    scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    out = bytearray()
    for t, s, ty in zip(tokens, scores, types):
        piece = _field(1, t.encode("utf-8")) + encode_varint(2 << 3 | 5) + struct.pack("<f", float(s))
        out += _field(1, piece + _int_field(3, ty if 1 <= ty <= 6 else 1))
    trainer = _int_field(3, 2) + _int_field(35, 1)  # model_type BPE, byte_fallback
    for num, key in ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding")):
        trainer += _int_field(num, -1 if ids[key] is None else ids[key])
    out += _field(2, trainer)
    normalizer = _field(1, b"identity") + _int_field(3, 1) + _int_field(4, 0) + _int_field(5, 1)
    out += _field(3, normalizer)
    return bytes(out)
