"""Tokenizer backends: ``tokenizer.json`` through ``tokenizers``, ``tokenizer.model`` through ``sentencepiece``.

Used by :mod:`lowbit.formats.tokenizer`; both follow transformers 5.x ``AutoTokenizer`` (see that module).
"""

from __future__ import annotations

import re

import sentencepiece
import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers, processors

from lowbit.errors import LowbitError, SourceError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def added_entry(token_id, value) -> dict | None:
    if isinstance(value, str):
        value = {"content": value}
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        return None
    special = bool(value.get("special", False))
    return {
        "id": None if token_id is None else int(token_id),
        "content": value["content"],
        "special": special,
        "lstrip": bool(value.get("lstrip", False)),
        "rstrip": bool(value.get("rstrip", False)),
        "normalized": bool(value.get("normalized", not special)),
        "single_word": bool(value.get("single_word", False)),
    }


def _all_added(meta: dict) -> list[dict]:
    """Added tokens plus the named and extra special tokens (which transformers always registers as special)."""
    entries = list(meta.get("added_tokens") or [])
    known = {e["content"] for e in entries}
    named = [meta.get(k) for k in SPECIAL_TOKEN_KEYS] + list(meta.get("extra_special_tokens") or [])
    for content in named:
        if content and content not in known:
            known.add(content)
            entries.append(added_entry(None, {"content": content, "special": True}))
    return entries


class JsonBackend:
    def __init__(self, data: bytes, meta: dict, prepend_scheme: str | None):
        try:
            tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust side raises plain Exception
            raise LowbitError(f"cannot load tokenizer.json: {e}") from e
        if prepend_scheme is not None:
            tok.normalizer = None
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
            steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            if prepend_scheme != "never":
                steps.append(decoders.Strip(content=" ", left=1))
            tok.decoder = decoders.Sequence(steps)
        present = {t.content for t in tok.get_added_tokens_decoder().values()}
        for e in _all_added(meta):
            if e["content"] not in present:
                fields = {k: e[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special")}
                tok.add_tokens([AddedToken(e["content"], **fields)])
        tok.no_truncation()
        tok.no_padding()
        tok.encode_special_tokens = bool(meta.get("split_special_tokens"))
        if meta.get("special_tokens_explicit"):
            tok.post_processor = _template_processor(tok, meta)
        self.tok = tok
        self._literal: tokenizers.Tokenizer | None = None
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.is_bpe = type(tok.model).__name__ == "BPE"
        self.byte_fallback = "ByteFallback" in repr(tok.decoder)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def byte_token_ids(self) -> frozenset[int]:
        if not self.byte_fallback:
            return frozenset()
        return frozenset(i for t, i in self.tok.get_vocab(with_added_tokens=False).items() if BYTE_PIECE.fullmatch(t))

    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)

    def serialized(self) -> str:
        """The tokenizer as tokenizer.json text (with the added tokens and pipeline changes made here)."""
        return self.tok.to_str()

    def encode_literal(self, text: str) -> list[int]:
        """Tokens of ``text`` with special-token text in it taken as plain text (its own copy of the pipeline:
        the flag is per tokenizer object, and other threads encode with this one)."""
        if self._literal is None:
            literal = tokenizers.Tokenizer.from_str(self.tok.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal.encode(text, add_special_tokens=False).ids

    def token_bytes(self) -> None:
        return None  # a tokenizers pipeline: readers of tokenizer.json work the bytes out from serialized()


def _template_processor(tok: tokenizers.Tokenizer, meta: dict):
    """The post-processor transformers builds from add_bos_token / add_eos_token."""
    bos, eos = meta.get("bos_token"), meta.get("eos_token")
    add_bos = bool(meta.get("add_bos_token")) and bos is not None and tok.token_to_id(bos) is not None
    add_eos = bool(meta.get("add_eos_token")) and eos is not None and tok.token_to_id(eos) is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _proto_fields(buf: bytes):
    """Yield (field number, wire type, value, start, end) of a protobuf message; value is an int or bytes."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, wire, value, start, i


def encode_varint(value: int) -> bytes:
    """A protobuf varint; a negative (int32/int64 field) value is written as its 64-bit two's complement."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _spm_prepare(proto: bytes) -> tuple[bytes, bool, int]:
    """Return (proto with add_dummy_prefix off, whether it was on, trainer model_type) of a sentencepiece model.

    The prefix is added by us instead, to follow transformers' rules (only at the start, not after special tokens).
    """
    out, dummy, model_type, seen = bytearray(), True, 1, False
    for field, wire, value, start, end in _proto_fields(proto):
        if field == 2 and wire == 2:  # trainer_spec.model_type (1 unigram, 2 bpe)
            model_type = next((v for f, w, v, *_ in _proto_fields(value) if f == 3 and w == 0), 1)
        if field == 3 and wire == 2:  # normalizer_spec.add_dummy_prefix (default true)
            seen = True
            kept = bytearray()
            for f, w, v, s, e in _proto_fields(value):
                if f == 3 and w == 0:
                    dummy = bool(v)
                else:
                    kept += value[s:e]
            kept += b"\x18\x00"
            out += b"\x1a" + encode_varint(len(kept)) + kept
        else:
            out += proto[start:end]
    if not seen:
        out += b"\x1a\x02\x18\x00"
    return bytes(out), dummy, model_type


def spm_adds_dummy_prefix(proto: bytes) -> bool:
    """Whether a sentencepiece model's normalizer adds a space at the start of the text (its default)."""
    return _spm_prepare(proto)[1]


def _load_spm(proto: bytes, origin) -> sentencepiece.SentencePieceProcessor:
    try:
        return sentencepiece.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, TypeError, OSError) as e:
        raise SourceError(f"{origin}: tokenizer.model is not a valid sentencepiece model ({e})") from e


def spm_special_pieces(proto: bytes, origin) -> dict[str, str]:
    sp = _load_spm(proto, origin)
    ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id()}
    return {k: sp.id_to_piece(i) for k, i in ids.items() if 0 <= i < sp.get_piece_size()}


class SpmBackend:
    def __init__(self, data: bytes, meta: dict, prepend_scheme: str | None):
        try:
            proto, dummy, model_type = _spm_prepare(data)
        except (ValueError, IndexError) as e:
            raise SourceError(f"tokenizer.model is not a valid sentencepiece model ({e})") from e
        self.sp = _load_spm(proto, "tokenizer")
        self.scheme = prepend_scheme if prepend_scheme is not None else "always" if dummy else "never"
        self.is_bpe = model_type == 2
        self.byte_fallback = True
        n = self.sp.get_piece_size()
        self.added: dict[int, dict] = {}
        next_id = n
        for e in _all_added(meta):
            tid = e["id"] if e["id"] is not None else self.token_to_id(e["content"])
            if tid is None:
                tid, next_id = next_id, next_id + 1
            self.added[tid] = e
            next_id = max(next_id, tid + 1)
        self.added_ids = {e["content"]: tid for tid, e in self.added.items()}
        self.vocab_size = max([n, *(t + 1 for t in self.added)])
        contents = sorted(self.added_ids, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, contents))) if contents else None
        self.split_special = bool(meta.get("split_special_tokens"))
        bos = self.token_to_id(meta["bos_token"]) if meta.get("add_bos_token") and meta.get("bos_token") else None
        eos = self.token_to_id(meta["eos_token"]) if meta.get("add_eos_token") and meta.get("eos_token") else None
        self.prefix_ids = [] if bos is None else [bos]
        self.suffix_ids = [] if eos is None else [eos]

    def token_to_id(self, token: str) -> int | None:
        if token in getattr(self, "added_ids", {}):
            return self.added_ids[token]
        tid = self.sp.piece_to_id(token)
        return tid if self.sp.id_to_piece(tid) == token else None

    def _segments(self, text: str, split_special: bool = False):
        """Split on added tokens (tokenizers' rules for lstrip/rstrip/single_word): yield (start, text or id).
        ``split_special``: special tokens' text is plain text."""
        pos = 0
        plain = self.split_special or split_special
        for m in self.pattern.finditer(text) if self.pattern else ():
            if plain and self.added[self.added_ids[m.group()]]["special"]:
                continue
            entry = self.added[self.added_ids[m.group()]]
            if m.start() < pos:
                continue
            if entry["single_word"] and (
                (m.start() > 0 and text[m.start() - 1].isalnum()) or (m.end() < len(text) and text[m.end()].isalnum())
            ):
                continue
            end_left = m.start()
            if entry["lstrip"]:
                end_left = pos + len(text[pos:end_left].rstrip())
            yield pos, text[pos:end_left]
            yield m.start(), self.added_ids[m.group()]
            pos = m.end()
            if entry["rstrip"]:
                pos += len(text[pos:]) - len(text[pos:].lstrip())
        yield pos, text[pos:]

    def encode_literal(self, text: str) -> list[int]:
        return self.encode(text, False, split_special=True)

    def encode(self, text: str, add_special_tokens: bool, split_special: bool = False) -> list[int]:
        ids = list(self.prefix_ids) if add_special_tokens else []
        for start, seg in self._segments(text, split_special):
            if isinstance(seg, int):
                ids.append(seg)
                continue
            if not seg:
                continue
            if (self.scheme == "always" or (self.scheme == "first" and start == 0)) and not seg.startswith((" ", "▁")):
                seg = " " + seg
            ids.extend(self.sp.encode(seg))
        return ids + (list(self.suffix_ids) if add_special_tokens else [])

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        parts, pending = [], bytearray()
        n = self.sp.get_piece_size()
        for tid in ids:
            if tid in self.added:
                if skip_special_tokens and self.added[tid]["special"]:
                    continue
                piece = self.added[tid]["content"]
            elif 0 <= tid < n:
                piece = self.sp.id_to_piece(tid)
            else:
                continue
            if BYTE_PIECE.fullmatch(piece):
                pending.append(int(piece[3:5], 16))
                continue
            if pending:
                parts.append(bytes_text(pending))
                pending = bytearray()
            parts.append(piece.replace("▁", " "))
        if pending:
            parts.append(bytes_text(pending))
        text = "".join(parts)
        if self.scheme != "never" and text.startswith(" "):
            text = text[1:]
        return text

    def byte_token_ids(self) -> frozenset[int]:
        return frozenset(i for i in range(self.sp.get_piece_size()) if self.sp.is_byte(i))

    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i, e in self.added.items() if e["special"])

    def serialized(self) -> None:
        return None

    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each token id stands for (byte pieces as their byte, "▁" as a space; added tokens as
        their text; unused ids empty)."""
        out = [b""] * self.vocab_size
        for tid in range(self.sp.get_piece_size()):
            piece = self.sp.id_to_piece(tid)
            if self.sp.is_byte(tid) and BYTE_PIECE.fullmatch(piece):
                out[tid] = bytes([int(piece[3:5], 16)])
            elif not (self.sp.is_control(tid) or self.sp.is_unknown(tid)):
                out[tid] = piece.replace("▁", " ").encode("utf-8")
            else:
                out[tid] = piece.encode("utf-8")
        for tid, e in self.added.items():
            out[tid] = e["content"].encode("utf-8")
        return out


def bytes_text(data: bytes) -> str:
    """tokenizers' ByteFallback: a run of byte tokens is UTF-8, or else one U+FFFD per byte."""
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)


def clean_up_tokenization(text: str) -> str:
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(old, new)
    return text
