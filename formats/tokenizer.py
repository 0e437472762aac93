"""Tokenizers of HF checkpoints: read at convert time, then encode/decode/chat/stream at run time.

Backends: ``tokenizer.json`` through the ``tokenizers`` library (preferred), else ``tokenizer.model`` through
``sentencepiece``. Both reproduce transformers 5.x ``AutoTokenizer``. Note that transformers does not run a
``LlamaTokenizer``'s tokenizer.json pipeline as written: it keeps the vocab/merges but uses no normalizer, a
``Metaspace`` pre-tokenizer that adds the "▁" prefix only at the very start of the text (``legacy: false``; after
every special token too with ``legacy: true``) and a decoder that strips that one space. We do the same.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from lowbit.errors import LowbitError, SourceError
from lowbit.formats.chat_template import find_chat_template, render_chat_template
from lowbit.formats.jsonfile import read_json_object
from lowbit.formats.tokenizer_backends import (
    SPECIAL_TOKEN_KEYS,
    JsonBackend,
    SpmBackend,
    added_entry,
    clean_up_tokenization,
    spm_special_pieces,
)

log = logging.getLogger(__name__)

TOKENIZER_BLOBS = ("tokenizer.json", "tokenizer.model")
_LLAMA_DEFAULT_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# model types whose Hub tokenizer_class is known to be wrong; transformers does not use LlamaTokenizer for them
_NOT_LLAMA_MODEL_TYPES = frozenset(
    {"arctic", "ernie4_5", "ernie4_5_moe", "internlm2", "internlm3", "jamba", "minicpm3", "nemotron", "phi3",
     "phimoe", "qwen2", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "llava", "llava_next"}
)  # fmt: skip


def _read_json(path: Path) -> dict:
    return read_json_object(path) or {}


def _token_content(value) -> str | None:
    """A special-token value from a config: a string or a serialised AddedToken ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _int_list(value, origin: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if value is None:
        return []
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SourceError(f"{origin}: eos_token_id must be an int or a list of ints, got {value!r}")
    return list(values)


def _uses_llama_pipeline(tokenizer_class: str | None, model_type: str | None, tokenizer_json: dict | None) -> bool:
    """Whether transformers would load this with its LlamaTokenizer class (and so rebuild the pipeline)."""
    if not isinstance(tokenizer_class, str) or tokenizer_class.removesuffix("Fast") != "LlamaTokenizer":
        return False
    if model_type in _NOT_LLAMA_MODEL_TYPES:
        return False
    if tokenizer_json is not None:  # byte-level (Llama-3 style) files declared as LlamaTokenizer are used as is
        stages = json.dumps([tokenizer_json.get("pre_tokenizer"), tokenizer_json.get("decoder")])
        if '"ByteLevel"' in stages:
            return False
    return True


def read_tokenizer_source(src_dir: Path) -> tuple[dict, dict[str, bytes]]:
    """Read a HF checkpoint folder's tokenizer: (JSON-serialisable meta, raw tokenizer.json / tokenizer.model bytes)."""
    src_dir = Path(src_dir)
    blobs: dict[str, bytes] = {}
    for name in TOKENIZER_BLOBS:
        path = src_dir / name
        if path.is_file():
            try:
                blobs[name] = path.read_bytes()
            except OSError as e:
                raise SourceError(f"cannot read {path}: {e}") from e
    if not blobs:
        raise SourceError(f"{src_dir} has no tokenizer: expected tokenizer.json or tokenizer.model")
    cfg = _read_json(src_dir / "tokenizer_config.json")
    return tokenizer_meta(
        blobs,
        cfg,
        model_cfg=_read_json(src_dir / "config.json"),
        gen_cfg=_read_json(src_dir / "generation_config.json"),
        special_map=_read_json(src_dir / "special_tokens_map.json"),
        chat_template=find_chat_template(src_dir, cfg),
        origin=src_dir,
    )


def tokenizer_meta(
    blobs: dict[str, bytes],
    cfg: dict,
    model_cfg: dict,
    gen_cfg: dict,
    special_map: dict,
    chat_template: str | None,
    origin,
) -> tuple[dict, dict[str, bytes]]:
    """The container's tokenizer meta from the tokenizer data and the checkpoint's configs (tokenizer_config.json
    as ``cfg``, config.json, generation_config.json, special_tokens_map.json); ``origin`` names the source in
    errors. Used for HF folders and for the configs a GGUF import synthesises."""
    src_dir = Path(origin)
    tok_json = None
    if "tokenizer.json" in blobs:
        try:
            tok_json = json.loads(blobs["tokenizer.json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(f"cannot read {src_dir / 'tokenizer.json'}: not valid JSON ({e})") from e
        if not isinstance(tok_json, dict) or not isinstance(tok_json.get("model"), dict):
            raise SourceError(f"{src_dir / 'tokenizer.json'} is not a tokenizers file (no 'model' section)")

    tokenizer_class = cfg.get("tokenizer_class") or model_cfg.get("tokenizer_class")
    llama = _uses_llama_pipeline(tokenizer_class, model_cfg.get("model_type"), tok_json)
    defaults = _LLAMA_DEFAULT_TOKENS if llama else {}
    if tok_json is None and not llama:
        defaults = spm_special_pieces(blobs["tokenizer.model"], src_dir)
    meta: dict = {"tokenizer_class": tokenizer_class, "llama_pipeline": llama}
    for key in SPECIAL_TOKEN_KEYS:
        source = cfg if key in cfg else special_map if key in special_map else defaults
        meta[key] = _token_content(source.get(key))

    extras = cfg.get("extra_special_tokens", cfg.get("additional_special_tokens"))
    if extras is None:
        extras = special_map.get("additional_special_tokens")
    extras = list(extras.values()) if isinstance(extras, dict) else list(extras or [])
    extras += [v for k, v in cfg.items() if k.endswith("_token") and k not in SPECIAL_TOKEN_KEYS and _token_content(v)]
    meta["extra_special_tokens"] = [c for c in map(_token_content, extras) if c]

    if isinstance(cfg.get("added_tokens_decoder"), dict):
        added = [added_entry(k, v) for k, v in cfg["added_tokens_decoder"].items()]
    elif tok_json is not None:
        added = [added_entry(t.get("id"), t) for t in tok_json.get("added_tokens") or [] if isinstance(t, dict)]
    else:
        added = []
    meta["added_tokens"] = [a for a in added if a is not None]

    meta["special_tokens_explicit"] = "add_bos_token" in cfg or "add_eos_token" in cfg
    meta["add_bos_token"] = bool(cfg.get("add_bos_token", False))
    meta["add_eos_token"] = bool(cfg.get("add_eos_token", False))
    meta["legacy"] = cfg.get("legacy")
    meta["add_prefix_space"] = cfg.get("add_prefix_space")
    meta["clean_up_tokenization_spaces"] = bool(cfg.get("clean_up_tokenization_spaces", False))
    meta["split_special_tokens"] = bool(cfg.get("split_special_tokens", False))
    meta["chat_template"] = chat_template

    try:
        tok = Tokenizer(meta, blobs)
    except SourceError:
        raise
    except LowbitError as e:
        raise SourceError(f"{src_dir}: {e}") from e
    for key in SPECIAL_TOKEN_KEYS:
        meta[f"{key}_id"] = tok.token_to_id(meta[key]) if meta[key] is not None else None
    if not meta["special_tokens_explicit"]:  # report what the tokenizer.json post-processor really adds
        probe = tok.encode("", add_special_tokens=True)
        meta["add_bos_token"] = meta["bos_token_id"] is not None and probe[:1] == [meta["bos_token_id"]]
        meta["add_eos_token"] = meta["eos_token_id"] is not None and probe[-1:] == [meta["eos_token_id"]]
    eos = set() if meta["eos_token_id"] is None else {meta["eos_token_id"]}
    if "eos_token_id" in gen_cfg:
        eos.update(_int_list(gen_cfg["eos_token_id"], str(src_dir / "generation_config.json")))
    else:
        eos.update(_int_list(model_cfg.get("eos_token_id"), str(src_dir / "config.json")))
    meta["eos_token_ids"] = sorted(eos)
    gen_bos = gen_cfg.get("bos_token_id", model_cfg.get("bos_token_id"))
    meta["generation_bos_token_id"] = gen_bos if isinstance(gen_bos, int) else None
    meta["vocab_size"] = tok.vocab_size
    return meta, blobs


# --- the public tokenizer -------------------------------------------------------------------------------------------


class Tokenizer:
    """A checkpoint's tokenizer, built from ``read_tokenizer_source`` output (meta, blobs)."""

    def __init__(self, meta: dict, blobs: dict[str, bytes]):
        self.meta = dict(meta)
        scheme = None
        if meta.get("llama_pipeline"):
            prefix = meta.get("add_prefix_space")
            scheme = "never" if prefix is False else "always" if meta.get("legacy") else "first"
        if "tokenizer.json" in blobs:
            self._backend = JsonBackend(blobs["tokenizer.json"], meta, scheme)
        elif "tokenizer.model" in blobs:
            self._backend = SpmBackend(blobs["tokenizer.model"], meta, scheme)
        else:
            raise LowbitError("no tokenizer data: expected tokenizer.json or tokenizer.model")
        self._cleanup = bool(meta.get("clean_up_tokenization_spaces")) and not self._backend.is_bpe
        self._byte_ids: frozenset[int] | None = None
        self.vocab_size: int = self._backend.vocab_size
        self.special_tokens = {k: meta[k] for k in SPECIAL_TOKEN_KEYS if meta.get(k) is not None}
        self.bos_id = self.token_to_id(meta["bos_token"]) if meta.get("bos_token") else None
        self.eos_id = self.token_to_id(meta["eos_token"]) if meta.get("eos_token") else None
        self.pad_id = self.token_to_id(meta["pad_token"]) if meta.get("pad_token") else None
        eos = set(meta.get("eos_token_ids") or []) | ({self.eos_id} if self.eos_id is not None else set())
        self.eos_ids: list[int] = sorted(eos)
        self.chat_template: str | None = meta.get("chat_template")

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise LowbitError(f"can only tokenize text, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens)
        return clean_up_tokenization(text) if self._cleanup else text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render a chat (as transformers ``apply_chat_template(tokenize=False)``); LowbitError without a template."""
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **kwargs,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, literal_content: bool = False,
                    **kwargs) -> list[int]:  # fmt: skip
        """Token ids of the rendered chat. ``literal_content``: text in the messages that spells a special token
        ("</s>", "<|im_end|>") stays text; only the template's own special tokens are special (what a server
        owes its users: a message cannot end a turn or forge a role)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        spans = []
        if literal_content:
            spans = self._special_text_spans(text, messages, add_generation_prompt, kwargs)
        if not spans:
            return self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        pos = 0
        for a, b in spans:
            if pos < a:
                ids += self.encode(text[pos:a], add_special_tokens=False)
            ids += self._literal(text[a:b])
            pos = b
        if pos < len(text):
            ids += self.encode(text[pos:], add_special_tokens=False)
        return ids

    def _special_text_spans(self, text: str, messages: list[dict], add_generation_prompt: bool,
                             kwargs: dict) -> list[tuple[int, int]]:  # fmt: skip
        """Where in the rendered ``text`` the contents of messages that spell a special token are: the template
        is rendered again with a placeholder for each such content, which must give ``text`` back once the contents
        are put in (a template that changes the text it inserts gets none: the text stays as rendered)."""
        specials = [t for t in self.special_token_texts() if t]
        marked, contents = [], {}
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str) and any(s in content for s in specials):
                mark = f"\ue000{i}\ue001"
                contents[mark] = content
                m = {**m, "content": mark}
            marked.append(m)
        if not contents:
            return []
        try:
            skeleton = self.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, **kwargs)
        except LowbitError:
            return []
        pattern = re.compile("|".join(map(re.escape, contents)))
        for inserted in (contents, {k: v.strip() for k, v in contents.items()}):  # as given, or trimmed (llama 2)
            spans, pos, out = [], 0, []
            for m in pattern.finditer(skeleton):
                out.append(skeleton[pos : m.start()])
                start = sum(map(len, out))
                out.append(inserted[m.group()])
                spans.append((start, start + len(inserted[m.group()])))
                pos = m.end()
            out.append(skeleton[pos:])
            if "".join(out) == text:
                return spans
        return []

    def _literal(self, text: str) -> list[int]:
        """``text``'s tokens as they follow other text, special-token text kept as text: encoded after a newline
        whose tokens are then dropped (SentencePiece-style pipelines put a space before a text's start)."""
        prefix = self._backend.encode_literal("\n")
        ids = self._backend.encode_literal("\n" + text)
        if ids[: len(prefix)] == prefix:
            return ids[len(prefix) :]
        return self._backend.encode_literal(text)

    def special_token_texts(self) -> list[str]:
        """The text of every special token (the strings a user could type to forge one)."""
        return sorted({self.decode([i], skip_special_tokens=False) for i in self.special_ids()})

    def byte_token_ids(self) -> frozenset[int]:
        """Ids of byte-fallback tokens (``<0xAB>``) when the decoder joins them into UTF-8, else empty."""
        if self._byte_ids is None:
            self._byte_ids = self._backend.byte_token_ids()
        return self._byte_ids

    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens (dropped by ``decode(..., skip_special_tokens=True)``)."""
        return self._backend.special_ids()

    def serialized(self) -> str | None:
        """tokenizer.json text for a tokenizers pipeline; None for a sentencepiece model (see token_bytes)."""
        return self._backend.serialized()

    def token_bytes(self) -> list[bytes] | None:
        """For a sentencepiece model, the bytes of every token id; None for a tokenizers pipeline."""
        return self._backend.token_bytes()

    def stream_decoder(self, skip_special_tokens: bool = True, context: Sequence[int] = ()) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens, context)


class StreamDecoder:
    """Incremental detokenizer: ``add`` returns the newly final text, never half a character.

    The concatenation of all ``add`` results plus ``flush()`` equals ``tokenizer.decode(all ids)``. A trailing run of
    byte-fallback tokens is held back until it ends (a later byte could still make the run invalid UTF-8, which
    tokenizers decodes as U+FFFD for every byte of the run), and text ending in U+FFFD is held for more bytes. Only a
    window of recent ids is decoded each time: it restarts from one context token whose text is known to be final.
    """

    _REBASE_AFTER = 64

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, context: Sequence[int] = ()):
        """``context``: token ids that precede the stream (e.g. the prompt's last token). Text is decoded after them,
        so a continuation keeps the leading space its first token has in context (sentencepiece-style decoders drop
        it at the start of a text)."""
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._byte_ids = tokenizer.byte_token_ids()
        # skipped special tokens vanish before the decoder runs, so they do not end a run of byte tokens
        self._transparent = self._byte_ids | tokenizer.special_ids() if skip_special_tokens else self._byte_ids
        self._ids: list[int] = [int(i) for i in context]  # the window
        self._done = tokenizer.decode(self._ids, skip_special_tokens=skip_special_tokens) if self._ids else ""

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        end = len(self._ids)
        while end and self._ids[end - 1] in self._transparent:
            end -= 1
        if not any(i in self._byte_ids for i in self._ids[end:]):
            end = len(self._ids)  # no byte tokens at the end: nothing there can still change
        return self._emit(end, final=False)

    def flush(self) -> str:
        return self._emit(len(self._ids), final=True)

    def _emit(self, end: int, final: bool) -> str:
        text = self._tok.decode(self._ids[:end], skip_special_tokens=self._skip)
        ready = text
        if not final:
            if text.endswith("\ufffd"):
                return ""
            if self._tok._cleanup and " " in text[-4:]:  # " ." etc. may still be cleaned up
                ready = text[: text.rindex(" ")]
        if ready.startswith(self._done):
            new = ready[len(self._done) :]
        else:  # cannot happen with the decoders we know; never repeat text
            log.debug("stream decode not prefix-stable: %r then %r", self._done, ready)
            new = ready[len(self._done) :] if len(ready) > len(self._done) else ""
        self._done = ready if len(ready) >= len(self._done) else self._done
        if ready == text and end >= self._REBASE_AFTER and end == len(self._ids):
            context = self._tok.decode(self._ids[end - 1 : end], skip_special_tokens=self._skip)
            if context and self._done.endswith(context):
                self._ids, self._done = self._ids[end - 1 :], context
        return new
