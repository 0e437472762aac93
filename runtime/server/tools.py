"""Tool calling: request parsing, prompt rendering, the grammar that keeps calls valid, and parsing calls back out.

The wire formats (OpenAI ``tools``/``tool_calls``, Anthropic ``tool_use``) are turned into :class:`ToolSpec` and
:class:`ToolCall`; the model sees its own chat template's tool format:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes, Qwen 2/2.5/3, SmolLM3 and
  every template that does not know tools: the generic fallback below);
- ``llama3``: a bare ``{"name": ..., "parameters": {...}}`` reply (Llama 3.1+ JSON tool calling);
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]``.

Templates that do not mention tools get them in the system message with Hermes-style instructions (the generic
fallback, documented in README), earlier calls as ``<tool_call>`` blocks and results as ``<tool_response>`` user
turns. With ``tool_choice`` "required" or a named function the whole reply is generated under a grammar whose
arguments follow each function's JSON schema; with "auto" (hermes format) the grammar is lazy: free text, and once
the model opens ``<tool_call>`` the call must be valid.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from lowbit.runtime.constraint import MAX_GRAMMAR_CHARS, GrammarError, json_schema_grammar, lark_grammar

NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_TOOLS = 128


class ToolError(ValueError):
    """A malformed tool definition or choice; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class Tool:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def openai(self) -> dict:
        """As OpenAI and transformers chat templates expect a tool."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


@dataclass
class ToolSpec:
    tools: list[Tool]
    choice: str = "auto"  # auto | none | required | a tool name
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice not in ("auto", "none")

    def allowed(self) -> list[Tool]:
        if self.choice in ("auto", "none", "required"):
            return self.tools
        return [t for t in self.tools if t.name == self.choice]


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: new_call_id())

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def new_call_id(prefix: str = "call_") -> str:
    return prefix + uuid.uuid4().hex[:24]


# ------------------------------------------------------------------------------------------------ parsing requests
def parse_tool(item: Any, param: str, *, anthropic: bool = False) -> Tool:
    """One tool: OpenAI's ``{"type": "function", "function": {...}}`` or Anthropic's ``{name, input_schema}``."""
    if not isinstance(item, dict):
        raise ToolError(f"'{param}' must be an object", param)
    if anthropic:
        fn, schema_key, where = item, "input_schema", param
        kind = item.get("type")
        if kind not in (None, "custom"):
            raise ToolError(f"'{param}.type' {kind!r} is not supported (only custom tools)", f"{param}.type")
    else:
        if item.get("type", "function") != "function":
            raise ToolError(f"'{param}.type' must be 'function', got {item.get('type')!r}", f"{param}.type")
        fn, schema_key, where = item.get("function"), "parameters", f"{param}.function"
        if not isinstance(fn, dict):
            raise ToolError(f"'{where}' must be an object", where)
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ToolError(f"'{where}.name' must be 1-64 letters, digits, '_', '.' or '-', got {name!r}", f"{where}.name")
    description = fn.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise ToolError(f"'{where}.description' must be a string", f"{where}.description")
    schema = fn.get(schema_key)
    if schema is None:
        if anthropic:
            raise ToolError(f"'{where}.input_schema' is required", f"{where}.input_schema")
        schema = {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise ToolError(f"'{where}.{schema_key}' must be a JSON schema object", f"{where}.{schema_key}")
    if schema.get("type", "object") != "object":
        raise ToolError(f"'{where}.{schema_key}' must describe an object (type 'object')", f"{where}.{schema_key}")
    if len(json.dumps(schema)) > MAX_GRAMMAR_CHARS:
        raise ToolError(f"'{where}.{schema_key}' is too large", f"{where}.{schema_key}")
    return Tool(name, description, schema)


def parse_tools(items: Any, param: str = "tools", *, anthropic: bool = False) -> list[Tool]:
    if not isinstance(items, list):
        raise ToolError(f"'{param}' must be a list of tools", param)
    if len(items) > MAX_TOOLS:
        raise ToolError(f"'{param}' may hold at most {MAX_TOOLS} tools", param)
    tools = [parse_tool(t, f"{param}[{i}]", anthropic=anthropic) for i, t in enumerate(items)]
    names = [t.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ToolError(f"'{param}' names the tool {dup!r} twice", param)
    return tools


def openai_choice(value: Any, tools: list[Tool]) -> str:
    """OpenAI ``tool_choice``: "auto" | "none" | "required" | {"type": "function", "function": {"name": ...}}."""
    if value is None:
        return "auto" if tools else "none"
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise ToolError(f"'tool_choice' must be 'auto', 'none', 'required' or a function, got {value!r}",
                            "tool_choice")  # fmt: skip
        if value == "required" and not tools:
            raise ToolError("'tool_choice' is 'required' but no 'tools' were given", "tool_choice")
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        return _named(value["function"].get("name"), tools)
    raise ToolError("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                    "{'name': ...}}", "tool_choice")  # fmt: skip


def _named(name: Any, tools: list[Tool]) -> str:
    if not any(t.name == name for t in tools):
        raise ToolError(f"'tool_choice' names the function {name!r}, which is not among the tools", "tool_choice")
    return name


def anthropic_choice(value: Any, tools: list[Tool]) -> tuple[str, bool]:
    """Anthropic ``tool_choice``: {"type": "auto"|"any"|"tool"|"none", "name"?, "disable_parallel_tool_use"?}."""
    if value is None:
        return ("auto" if tools else "none"), True
    if not isinstance(value, dict) or value.get("type") not in ("auto", "any", "tool", "none"):
        raise ToolError("'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'", "tool_choice")
    parallel = not value.get("disable_parallel_tool_use", False)
    kind = value["type"]
    if kind in ("any", "tool") and not tools:
        raise ToolError(f"'tool_choice' is {kind!r} but no 'tools' were given", "tool_choice")
    if kind == "tool":
        return _named(value.get("name"), tools), parallel
    return {"any": "required"}.get(kind, kind), parallel


# ------------------------------------------------------------------------------------------------ formats
def tool_format(template: str | None) -> str:
    """Which tool-call format the model's chat template speaks (hermes for templates that know no tools)."""
    t = template or ""
    if "tools" not in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or "ipython" in t or '"parameters"' in t:
        return "llama3"
    return "hermes"


def native_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


FALLBACK_SYSTEM = (
    "You are a function calling AI model. You may call one or more functions to assist with the user query. "
    "Here are the available tools:\n<tools>\n{tools}\n</tools>\n"
    "For each function call, return a JSON object with the function name and arguments within <tool_call></tool_call>"
    ' tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def fallback_messages(messages: list[dict], tools: list[Tool] | None) -> list[dict]:
    """The conversation for a template that knows no tools: tool list in the system message, earlier calls as
    ``<tool_call>`` blocks in the assistant's text, results as ``<tool_response>`` user turns (consecutive ones
    joined)."""
    out: list[dict] = []
    if tools:
        listing = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools)
        system = FALLBACK_SYSTEM.format(tools=listing)
        if messages and messages[0]["role"] == "system":
            system = messages[0]["content"] + "\n\n" + system
            messages = messages[1:]
        out.append({"role": "system", "content": system})
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [_hermes_block(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            text = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
            out.append({"role": "assistant", "content": text})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    for m in out:
        m.pop("_tool", None)
    return out


def _hermes_block(name: str, arguments: Any) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def _call_schema(tool: Tool, args_key: str) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, args_key: tool.parameters},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


def _any_call(tools: list[Tool], args_key: str) -> dict:
    schemas = [_call_schema(t, args_key) for t in tools]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def grammar_for(spec: ToolSpec, fmt: str) -> str | None:
    """The llguidance Lark grammar that the reply must follow (None: free text, calls parsed afterwards)."""
    if spec.choice == "none" or not spec.tools:
        return None
    tools = spec.allowed()
    if fmt == "hermes":
        call = "call: %json " + json.dumps(_any_call(tools, "arguments"))
        block = 'block: "<tool_call>" /\\n?/ call /\\n?/ "</tool_call>"'
        more = "(/\\n*/ block)*" if spec.parallel else ""
        if spec.forced:
            return lark_grammar(f"start: block {more}\n{block}\n{call}\n")
        # lazy: any text that does not contain <tool_call>, or text up to <tool_call> and then valid calls
        return lark_grammar(
            "start: TEXT | prose tail\n"
            "TEXT: /(.|\\n)*/ & ~/(.|\\n)*<tool_call>(.|\\n)*/\n"
            "prose[lazy]: /(.|\\n)*<tool_call>/\n"
            f'tail: /\\n?/ call /\\n?/ "</tool_call>" {more}\n{block}\n{call}\n'
        )
    if not spec.forced:
        return None  # llama3 / mistral "auto": the whole reply is either text or calls; parsed afterwards
    if fmt == "llama3":
        return lark_grammar("start: call\ncall: %json " + json.dumps(_any_call(tools, "parameters")) + "\n")
    array = {"type": "array", "items": _any_call(tools, "arguments"), "minItems": 1}
    if not spec.parallel:
        array["maxItems"] = 1
    return lark_grammar("start: calls\ncalls: %json " + json.dumps(array) + "\n")


def check_grammar(spec: ToolSpec, compiler) -> None:
    """Compile each tool's parameter schema on its own, so that a bad one is named in the error."""
    for i, tool in enumerate(spec.tools):
        try:
            compiler.check(json_schema_grammar(tool.parameters))
        except GrammarError as e:
            raise ToolError(f"tool {tool.name!r}: its parameters schema cannot be used: {e}",
                            f"tools[{i}].function.parameters") from None  # fmt: skip


# ------------------------------------------------------------------------------------------------ parsing replies
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _as_call(obj: Any, names: set[str], args_keys: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    for key in args_keys:
        if key in obj:
            args = obj[key]
            if isinstance(args, str):  # some models write the arguments as a JSON string
                try:
                    args = json.loads(args)
                except ValueError:
                    return None
            return ToolCall(obj["name"], args) if isinstance(args, dict) else None
    return ToolCall(obj["name"], {})


def parse_calls(text: str, fmt: str, tools: list[Tool]) -> tuple[str, list[ToolCall]]:
    """Split a reply into (content text, tool calls). Text that is not a well-formed call stays content."""
    names = {t.name for t in tools}
    if fmt == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for m in HERMES_CALL.finditer(text, start):
            try:
                call = _as_call(json.loads(m.group(1)), names, ("arguments", "parameters"))
            except ValueError:
                call = None
            if call is None:
                return text, []  # not a call after all: keep the text as it is
            calls.append(call)
        return text[:start].rstrip(), calls
    body = text.strip().removeprefix("<|python_tag|>").removeprefix("[TOOL_CALLS]").strip()
    if not body.startswith(("{", "[")):
        return text, []
    try:
        obj = json.loads(body)
    except ValueError:
        if fmt != "llama3":
            return text, []
        try:  # Llama 3 may put several calls one after another, separated by ";"
            obj = [json.loads(part) for part in body.split(";") if part.strip()]
        except ValueError:
            return text, []
    items = obj if isinstance(obj, list) else [obj]
    calls = [_as_call(o, names, ("arguments", "parameters")) for o in items]
    if not calls or any(c is None for c in calls):
        return text, []
    return "", calls


def trigger(fmt: str) -> str:
    """Text from which on a streamed reply may be a tool call (held back until the reply is parsed)."""
    return "<tool_call>" if fmt == "hermes" else ""
