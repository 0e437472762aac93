"""Constrained generation: a token mask from a grammar, applied before sampling.

The grammar engine is llguidance (the library behind OpenAI's structured outputs and llama.cpp's, vLLM's and
SGLang's grammar backends): JSON schemas, Lark-style context-free grammars and regexes compile in about a millisecond
and a mask over a 49k vocabulary costs tens of microseconds per token (``bench/grammar_cost.py``). Chosen over
xgrammar (needs torch, transformers and triton at run time) and outlines-core (regular languages only: no
recursive schemas, no grammars, and a vocabulary index that is slow to build for large schemas).

:class:`GrammarCompiler` belongs to one tokenizer (building its token table takes ~0.2 s, so it is made once, on
first use); :meth:`GrammarCompiler.compile` turns a grammar into a fresh :class:`Constraint` for one generation.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_GRAMMAR_CHARS = 1 << 20  # a schema or grammar larger than this is refused before it is compiled
SAFE_INTEGER = 2**53 - 1  # RFC 8259 section 6: integers beyond this are not interoperable
# whitespace between JSON tokens: a newline and indentation, or a few spaces, but not an endless run (a small model
# under a greedy sampler can otherwise fill max_tokens with blanks); llama.cpp's JSON grammars bound it the same way
JSON_WHITESPACE = r"[ \t]{0,4}|\n[ \t]{0,32}"


class GrammarError(LowbitError):
    """A schema or grammar that cannot be used (invalid, unsupported feature, too large)."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a dependency of the package; only a broken install lacks it
        raise GrammarError(f"constrained generation needs the llguidance package ({e})") from None
    return llguidance


# ------------------------------------------------------------------------------------------------ grammars
def json_schema_grammar(schema: object, *, what: str = "schema") -> str:
    """The grammar of JSON documents valid under ``schema`` (a dict, or true/false). GrammarError when it is not a
    schema; unsupported keywords are refused when the grammar is compiled."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise GrammarError(f"{what} must be a JSON object, got {type(schema).__name__}")
    text = json.dumps(_bounded(schema))
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"{what} is larger than {MAX_GRAMMAR_CHARS} characters")
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_pattern": JSON_WHITESPACE})
    except ValueError as e:
        raise GrammarError(f"{what}: {e}") from None


def _bounded(schema: object) -> object:
    """A copy of ``schema`` in which every integer without bounds is held to +-(2**53 - 1): a small model repeating
    a digit under a greedy sampler would otherwise write one number until max_tokens and never close the JSON."""
    if isinstance(schema, list):
        return [_bounded(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("enum", "const", "default", "examples") else _bounded(v) for k, v in schema.items()}
    kinds = out.get("type")
    if kinds == "integer" or (isinstance(kinds, list) and kinds == ["integer"]):
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -SAFE_INTEGER
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = SAFE_INTEGER
    return out


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    return json_schema_grammar({"type": "object"})


def lark_grammar(text: str) -> str:
    """A Lark-style context-free grammar in llguidance's dialect (``start`` is the top rule; ``%json {...}`` embeds
    a JSON schema). GBNF (llama.cpp's grammar files) is translated first when the text looks like one."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("the grammar is empty")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the grammar is larger than {MAX_GRAMMAR_CHARS} characters")
    llg = _llguidance()
    if "::=" in text:  # GBNF
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            text = gbnf_to_lark(text)
        except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions for bad input
            raise GrammarError(f"cannot read the GBNF grammar: {_first_line(str(e))}") from None
    return llg.LLMatcher.grammar_from_lark(text)


def regex_grammar(pattern: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise GrammarError("the regular expression is empty")
    return _llguidance().LLMatcher.grammar_from_regex(pattern)


def grammar_from_files(json_schema: str | None = None, grammar: str | None = None) -> str | None:
    """The grammar of ``--json-schema FILE`` or ``--grammar FILE`` (Lark in llguidance's dialect, or GBNF)."""
    path = json_schema or grammar
    if path is None:
        return None
    flag = "--json-schema" if json_schema else "--grammar"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GrammarError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GrammarError(f"{flag} {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if grammar:
        return lark_grammar(text)
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise GrammarError(f"{flag} {path}: not valid JSON ({e})") from None
    return json_schema_grammar(schema, what=f"{flag} {path}")


# ------------------------------------------------------------------------------------------------ masks
class _Wrapper:
    """What llguidance's LLTokenizer reads from a tokenizer it cannot parse itself (sentencepiece models)."""

    def __init__(self, tokenizer: Tokenizer, token_bytes: list[bytes], eos: int):
        special = tokenizer.special_ids()
        self.tokens = [b"\xff" + t if i in special else t for i, t in enumerate(token_bytes)]  # llguidance's mark
        self.special_token_ids = sorted(special)
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.bos_id
        self.is_tokenizer_wrapper = True
        self._tok = tokenizer
        self._prefix = tokenizer.encode("\n", add_special_tokens=False)

    def __call__(self, text: str | bytes) -> list[int]:
        """Tokens of ``text`` as they would follow other text: without the space SentencePiece puts before a text's
        start (encoded after a newline, whose tokens are then dropped)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self._tok.encode("\n" + text, add_special_tokens=False)
        n = len(self._prefix)
        return ids[n:] if ids[:n] == self._prefix else self._tok.encode(text, add_special_tokens=False)


class GrammarCompiler:
    """Compiles grammars against one tokenizer; ``eos_ids`` are the tokens that end a generation."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)  # the model's logits (may exceed the tokenizer's table)
        self.eos_ids = sorted(set(eos_ids))
        self._ll = None

    def _lltokenizer(self):
        if self._ll is None:
            llg = _llguidance()
            eos = self.eos_ids or ([self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else [])
            if not eos:
                raise GrammarError("constrained generation needs an end-of-sequence token; this model has none")
            source = self.tokenizer.serialized()
            try:
                if source is None:
                    source = _Wrapper(self.tokenizer, self.tokenizer.token_bytes(), eos[0])
                self._ll = llg.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=eos)
            except Exception as e:  # noqa: BLE001 - the Rust side raises plain exceptions
                raise GrammarError(f"the grammar engine cannot read this model's tokenizer: {e}") from None
        return self._ll

    def check(self, grammar: str) -> None:
        """GrammarError with the engine's message when ``grammar`` cannot be used."""
        llg = _llguidance()
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self._lltokenizer())
        if is_error:
            raise GrammarError(_first_line(messages[0] if messages else "invalid grammar"))

    def compile(self, grammar: str) -> Constraint:
        matcher = _llguidance().LLMatcher(self._lltokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error()))
        return Constraint(matcher, self.vocab_size)


def _first_line(message: str) -> str:
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    return lines[0] if lines else "invalid grammar"


class Constraint:
    """One generation's grammar state: which tokens may come next, advanced by each sampled token."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.mask_seconds = 0.0  # time spent computing masks (the cost the grammar adds to decoding)
        self.steps = 0

    @property
    def done(self) -> bool:
        """The grammar allows nothing more (the document is complete)."""
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """A boolean mask over the vocabulary of the tokens the grammar allows next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self.matcher.is_error():
            raise GrammarError(f"grammar: {_first_line(self.matcher.get_error())}")
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids at -inf (a new float32 array)."""
        t0 = time.perf_counter()
        allowed = self.allowed()
        if not allowed.any():
            raise GrammarError("grammar: no token can continue the output")
        out = np.array(logits, dtype=np.float32, copy=True)
        out[~allowed[: out.shape[0]]] = -np.inf
        self.mask_seconds += time.perf_counter() - t0  # everything the grammar adds to a step
        self.steps += 1
        return out

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise GrammarError(f"grammar: token {token} is not allowed here ({_first_line(self.matcher.get_error())})")
