"""Chat templates: find a checkpoint's Jinja chat template and render it the way transformers does.

Rendering mirrors ``transformers`` (5.x) ``apply_chat_template(..., tokenize=False)``: an immutable Jinja sandbox with
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a no-op ``{% generation %}`` block, a ``tojson``
filter that does not HTML-escape, and the globals ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``.
The template sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the named special tokens
(``bos_token``, ``eos_token``, ...), plus any extra keyword arguments.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lowbit.errors import LowbitError, SourceError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"

NO_TEMPLATE_MESSAGE = (
    "this model has no chat template (no chat_template.jinja and no 'chat_template' in tokenizer_config.json); "
    "use plain-text prompts instead"
)


class ChatTemplateError(LowbitError):
    """A chat template is invalid, or refused the conversation (``raise_exception`` in the template)."""


def select_template(value: Any, origin: str) -> str | None:
    """Pick the default template from a ``chat_template`` value: a string, a list of ``{name, template}`` or a dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for entry in value:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise SourceError(f"{origin}: 'chat_template' list entries must be {{'name': ..., 'template': ...}}")
            named[entry["name"]] = entry.get("template")
        value = named
    if isinstance(value, dict):
        if "default" in value:
            chosen = value["default"]
        elif len(value) == 1:
            chosen = next(iter(value.values()))
        else:
            raise SourceError(
                f"{origin} has several chat templates ({', '.join(sorted(value))}) and none is named 'default'"
            )
        if chosen is not None and not isinstance(chosen, str):
            raise SourceError(f"{origin}: the default chat template is not a string")
        return chosen
    raise SourceError(f"{origin}: 'chat_template' must be a string or a list of named templates")


def find_chat_template(src_dir: Path, tokenizer_config: dict) -> str | None:
    """The chat template of a HF checkpoint folder, or None.

    Priority (as transformers): ``chat_template.jinja``, then ``tokenizer_config.json``'s ``chat_template``, then
    the older ``chat_template.json`` (``{"chat_template": ...}``).
    """
    src_dir = Path(src_dir)
    jinja_file = src_dir / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SourceError(f"cannot read {jinja_file}: {e}") from e
    if tokenizer_config.get("chat_template") is not None:
        return select_template(tokenizer_config["chat_template"], str(src_dir / "tokenizer_config.json"))
    legacy = src_dir / LEGACY_CHAT_TEMPLATE_FILE
    if legacy.is_file():
        try:
            data = json.loads(legacy.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(f"cannot read {legacy}: {e}") from e
        if isinstance(data, dict):
            return select_template(data.get("chat_template"), str(legacy))
        return select_template(data, str(legacy))
    return None


# --- the Jinja environment ------------------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; here it just renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes, so templates cannot reach interpreter internals."""

    def __init__(*args, **kwargs):  # self comes in args: the same signature trick as jinja2.utils.Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set the attribute {name!r} on a namespace")


class _DictFactory:
    """``dict(...)`` inside templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise ChatTemplateError(f"chat template error: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """Compile a chat template; syntax errors become ChatTemplateError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"invalid chat template (line {e.lineno}): {e.message}") from e


def _plain(value: Any, where: str) -> Any:
    """Copy ``value`` as plain JSON-like data, so a template only ever sees str/int/float/bool/None/list/dict."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, where) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, where) for v in value)
    if callable(getattr(value, "item", None)):  # numpy scalars
        return _plain(value.item(), where)
    raise LowbitError(f"{where} may only contain strings, numbers, lists and dicts, not {type(value).__name__}")


def render_chat_template(
    template: str | None,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` with ``template`` exactly as ``transformers`` ``apply_chat_template(tokenize=False)``.

    ``special_tokens`` maps ``bos_token``/``eos_token``/... to their strings; ``kwargs`` are extra template variables
    (they override special tokens of the same name). Raises LowbitError (ChatTemplateError) when there is no template,
    the template is invalid, or it calls ``raise_exception``.
    """
    if template is None:
        raise ChatTemplateError(NO_TEMPLATE_MESSAGE)
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LowbitError("a chat needs a non-empty list of messages")
    chat = []
    for message in messages:
        if not isinstance(message, dict):
            raise LowbitError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        # like transformers: keys whose value is None are dropped (templates handle missing keys better)
        chat.append(_plain({k: v for k, v in message.items() if v is not None}, "chat messages"))
    variables = {**(special_tokens or {}), **_plain(kwargs, "chat template arguments")}
    compiled = compile_template(template)
    try:
        return compiled.render(
            messages=chat,
            tools=_plain(tools, "tools"),
            documents=_plain(documents, "documents"),
            add_generation_prompt=bool(add_generation_prompt),
            **variables,
        )
    except LowbitError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
