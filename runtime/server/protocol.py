"""OpenAI wire protocol: request parsing and validation into dataclasses, response and error shapes.

Nothing here touches the engine or the network: parsing turns a decoded JSON body into :class:`ChatRequest` or
:class:`CompletionRequest` (or raises :class:`APIError`), and the ``*_response`` / ``*_chunk`` helpers build the
JSON objects that the OpenAI clients expect.
"""

from __future__ import annotations

import json
import numbers
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lowbit.errors import LowbitError
from lowbit.runtime.constraint import GrammarError, json_object_grammar, json_schema_grammar, lark_grammar
from lowbit.runtime.sampling import SamplingParams
from lowbit.runtime.server.schema import RANGE_ERRORS, ChatFields, CompletionFields, OpenAIFields, Sampling
from lowbit.runtime.server.tools import ToolCall, ToolError, ToolSpec, openai_choice, parse_tools

MAX_STOP_STRINGS = 16
F = TypeVar("F", bound=BaseModel)
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}  # what OpenAI does when a request leaves them out
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ------------------------------------------------------------------------------------------------ requests
@dataclass
class GenerationOptions:
    """What chat and completion requests share."""

    model: str | None
    max_tokens: int | None  # None: up to the remaining context
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: off; otherwise how many top alternatives per token (0 = only the chosen one)
    grammar: str | None = None  # the output must follow this llguidance grammar (response_format, grammar)
    ignore_eos: bool = False  # extension (vLLM, llama.cpp): end-of-sequence tokens are never sampled (benchmarks)


@dataclass
class ChatRequest:
    options: GenerationOptions
    messages: list[dict]  # [{"role": ..., "content": str, "tool_calls"?, "tool_call_id"?}], roles normalised
    tools: ToolSpec | None = None


@dataclass
class CompletionRequest:
    options: GenerationOptions
    prompt: str | list[int]  # text (BOS added as the tokenizer does) or token ids (used as given)


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _param(loc: tuple) -> str:
    """A pydantic error location as OpenAI names a parameter: ``messages[0].content``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def fields(cls: type[F], body: Mapping) -> F:
    """``body``'s scalar settings validated by ``cls`` (runtime/server/schema.py); the first error as a 400 naming
    the field."""
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(err["loc"])
        code = "invalid_value" if err["type"] in RANGE_ERRORS else "invalid_type"
        raise bad_request(f"'{param}': {err['msg']}, got {err.get('input')!r}", param, code) from None


def _unsupported(body: Mapping, key: str, allowed: Callable[[Any], bool], what: str) -> None:
    if key in body and body[key] is not None and not allowed(body[key]):
        raise bad_request(f"'{key}' is not supported by this server ({what})", key, "unsupported_parameter")


def stop_strings(body: Mapping) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad_request("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(items) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' may hold at most {MAX_STOP_STRINGS} strings", "stop", "invalid_value")
    if any(s == "" for s in items):
        raise bad_request("'stop' strings must not be empty", "stop", "invalid_value")
    return list(dict.fromkeys(items))


def sampling_params(f: Sampling, defaults: Mapping) -> SamplingParams:
    """Sampling settings: the request's (validated ``f``), else the model's generation defaults, else OpenAI's."""

    def given(value, key: str, fallback):
        if value is not None:
            return value
        value = defaults.get(key, fallback)
        return value if _is_number(value) else fallback

    if defaults.get("do_sample") is False:
        base_temperature = 0.0
    else:
        base_temperature = given(None, "temperature", OPENAI_DEFAULTS["temperature"])
    temperature = float(f.temperature if f.temperature is not None else base_temperature)
    top_p = float(given(f.top_p, "top_p", OPENAI_DEFAULTS["top_p"]))
    top_k = max(int(given(f.top_k, "top_k", 0)), 0)  # -1 means off, as in vLLM
    if top_p == 0.0:  # OpenAI accepts 0: only the most likely token survives
        top_p, top_k = 1.0, 1
    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=float(given(f.min_p, "min_p", 0.0)),
        repetition_penalty=float(given(f.repetition_penalty, "repetition_penalty", 1.0)),
        presence_penalty=float(f.presence_penalty or 0.0),
        frequency_penalty=float(f.frequency_penalty or 0.0),
        seed=None if f.seed is None else f.seed % 2**64,
    )
    try:
        params.validate()
    except LowbitError as e:
        raise bad_request(str(e).removeprefix("sampling: ")) from None
    return params


def _options(f: OpenAIFields, body: Mapping, defaults: Mapping, logprobs: int | None) -> GenerationOptions:
    max_tokens = f.max_completion_tokens if f.max_completion_tokens is not None else f.max_tokens
    stream = bool(f.stream)
    include_usage = False
    if f.stream_options is not None:
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
        include_usage = bool(f.stream_options.include_usage)
    _unsupported(body, "logit_bias", lambda v: isinstance(v, dict) and not v, "logit_bias")
    grammar = _response_format(body)
    return GenerationOptions(
        model=f.model or None,
        max_tokens=max_tokens,
        params=sampling_params(f, defaults),
        stop=stop_strings(body),
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        grammar=grammar,
        ignore_eos=bool(f.ignore_eos),
    )


def _response_format(body: Mapping) -> str | None:
    """The grammar that ``response_format`` (or llama.cpp's ``json_schema`` / ``grammar`` fields) asks for."""
    rf = body.get("response_format")
    try:
        if rf is not None:
            if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
                raise bad_request(
                    "'response_format' must be an object with a 'type'", "response_format", "invalid_type"
                )
            kind = rf["type"]
            if kind == "text":
                return None
            if kind == "json_object":
                schema = rf.get("schema")  # llama.cpp's extension
                return json_object_grammar() if schema is None else json_schema_grammar(schema)
            if kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or "schema" not in spec and "name" not in spec:
                    raise bad_request("'response_format.json_schema' must be an object with 'name' and 'schema'",
                                      "response_format.json_schema", "invalid_type")  # fmt: skip
                name = spec.get("name", "response")
                if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                    raise bad_request("'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'",
                                      "response_format.json_schema.name", "invalid_value")  # fmt: skip
                return json_schema_grammar(spec.get("schema", {}), what="the JSON schema")
            raise bad_request(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                              "response_format.type", "invalid_value")  # fmt: skip
        if body.get("json_schema") is not None:
            return json_schema_grammar(body["json_schema"], what="'json_schema'")
        if body.get("grammar") is not None:
            return lark_grammar(body["grammar"])
    except GrammarError as e:
        raise bad_request(str(e), "response_format", "invalid_schema") from None
    return None


def require_object(body: Any) -> Mapping:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _message_content(content: Any, i: int, role: str, has_calls: bool = False) -> str:
    param = f"messages[{i}].content"
    if content is None:
        if role == "assistant" or has_calls:
            return ""
        raise bad_request(f"'{param}' must not be null", param, "invalid_type")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"'{param}' must be a string or a list of content parts", param, "invalid_type")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f"'{param}[{j}]' must be an object with a 'type'", f"{param}[{j}]", "invalid_type")
        if part["type"] != "text":
            raise bad_request(
                f"'{param}[{j}]' is of type {part['type']!r}; this server accepts only text parts",
                f"{param}[{j}]",
                "unsupported_content",
            )
        if not isinstance(part.get("text"), str):
            raise bad_request(f"'{param}[{j}].text' must be a string", f"{param}[{j}].text", "invalid_type")
        texts.append(part["text"])
    return "\n".join(texts)


def parse_chat(body: Any, defaults: Mapping | None = None) -> ChatRequest:
    body = require_object(body)
    defaults = defaults or {}
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of messages", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"'messages[{i}]' must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(
                f"'messages[{i}].role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                f"messages[{i}].role",
                "invalid_value",
            )
        out.append(_message(m, i, role))
    f = fields(ChatFields, body)
    logprobs, top = bool(f.logprobs), f.top_logprobs
    if top is not None and not logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    _unsupported(body, "functions", lambda v: isinstance(v, list) and not v, "use 'tools'")
    _unsupported(body, "function_call", lambda v: v == "none", "use 'tool_choice'")
    options = _options(f, body, defaults, (top or 0) if logprobs else None)
    try:
        tools = parse_tools(body["tools"]) if body.get("tools") is not None else []
        choice = openai_choice(body.get("tool_choice"), tools)
    except ToolError as e:
        raise bad_request(str(e), e.param, "invalid_tools") from None
    parallel = True if f.parallel_tool_calls is None else f.parallel_tool_calls
    spec = ToolSpec(tools, choice, parallel) if tools else None
    if spec is not None and choice != "none" and options.grammar is not None:
        raise bad_request("'response_format' cannot be combined with tools unless 'tool_choice' is 'none'",
                          "response_format", "invalid_value")  # fmt: skip
    return ChatRequest(options, out, spec)


def _message(m: Mapping, i: int, role: str) -> dict:
    """One message for the chat template: role, content text, and the tool fields where they apply."""
    calls = m.get("tool_calls") if role == "assistant" else None
    out: dict[str, Any] = {
        "role": CHAT_ROLES[role],
        "content": _message_content(m.get("content"), i, role, bool(calls)),
    }
    if calls is not None:
        if not isinstance(calls, list):
            raise bad_request(f"'messages[{i}].tool_calls' must be a list", f"messages[{i}].tool_calls", "invalid_type")
        out["tool_calls"] = [_history_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
    if role == "tool":
        tid = m.get("tool_call_id")
        if not isinstance(tid, str):
            raise bad_request(f"'messages[{i}].tool_call_id' must be a string", f"messages[{i}].tool_call_id",
                              "invalid_type")  # fmt: skip
        out["tool_call_id"] = tid
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]
    return out


def _history_call(c: Any, param: str) -> dict:
    """An earlier tool call as chat templates read it (arguments as an object, as transformers passes them)."""
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
        raise bad_request(f"'{param}' must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}} with "
                          "'arguments' a JSON string", param, "invalid_type")  # fmt: skip
    try:
        args = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
    except ValueError:
        raise bad_request(f"'{param}.function.arguments' is not valid JSON", f"{param}.function.arguments",
                          "invalid_value") from None  # fmt: skip
    cid = c.get("id")
    return {"id": cid if isinstance(cid, str) else "", "type": "function",
            "function": {"name": fn["name"], "arguments": args}}  # fmt: skip


def parse_completion(body: Any, defaults: Mapping | None = None, vocab_size: int | None = None) -> CompletionRequest:
    body = require_object(body)
    defaults = defaults or {}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in prompt):
            raise bad_request(f"'prompt' token ids must lie in [0, {vocab_size})", "prompt", "invalid_value")
        prompt = [int(t) for t in prompt]
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("only one prompt per request is supported", "prompt", "invalid_value")
    elif not isinstance(prompt, str) or prompt == "":
        raise bad_request("'prompt' must be a non-empty string or a list of token ids", "prompt", "invalid_type")
    _unsupported(body, "echo", lambda v: v is False, "echo")
    _unsupported(body, "suffix", lambda v: v == "", "suffix")
    _unsupported(body, "best_of", lambda v: v == 1, "best_of must be 1")
    f = fields(CompletionFields, body)
    return CompletionRequest(_options(f, body, defaults, f.logprobs), prompt)


# ------------------------------------------------------------------------------------------------ responses
@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values were reused from the previous request

    def body(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


TokenText = Callable[[int], tuple[str, list[int] | None]]  # token id -> (text, UTF-8 bytes or None)


def chat_logprobs(items: list[TokenLogprob], token_text: TokenText) -> dict:
    """OpenAI chat shape: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}``."""

    def entry(tok: int, lp: float) -> dict:
        text, raw = token_text(tok)
        return {"token": text, "logprob": lp, "bytes": raw}

    content = [{**entry(it.token, it.logprob), "top_logprobs": [entry(t, lp) for t, lp in it.top]} for it in items]
    return {"content": content, "refusal": None}


def completion_logprobs(items: list[TokenLogprob], token_text: TokenText, offset: int = 0) -> dict:
    """Legacy completions shape: parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``."""
    tokens, offsets = [], []
    for it in items:
        text = token_text(it.token)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [it.logprob for it in items],
        "top_logprobs": [{token_text(t)[0]: lp for t, lp in it.top} for it in items],
        "text_offset": offsets,
    }


def tool_call_body(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json()}}


def tool_call_delta(index: int, call: ToolCall, head: bool) -> dict:
    """A streamed tool call: first its id and name (empty arguments), then its arguments."""
    if head:
        return {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
    return {"index": index, "function": {"arguments": call.arguments_json()}}


def chat_response(rid: str, created: int, model: str, text: str, finish: str, usage: Usage, logprobs,
                  calls: list[ToolCall] | None = None) -> dict:  # fmt: skip
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
    if calls:
        message["tool_calls"] = [tool_call_body(c) for c in calls]
    choice = {"message": message, "logprobs": logprobs, "finish_reason": finish}
    return {**_envelope(rid, "chat.completion", created, model, choice), "usage": usage.body()}


def _envelope(rid: str, obj: str, created: int, model: str, choice: dict) -> dict:
    """The fields every response and chunk shares, with its one choice."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [{"index": 0, **choice}]}


def _chunk(rid: str, obj: str, created: int, model: str, choice: dict, include_usage: bool) -> dict:
    chunk = _envelope(rid, obj, created, model, choice)
    if include_usage:
        chunk["usage"] = None  # only the final usage chunk carries numbers
    return chunk


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None = None, logprobs=None,
               include_usage: bool = False) -> dict:  # fmt: skip
    choice = {"delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return _chunk(rid, "chat.completion.chunk", created, model, choice, include_usage)


def usage_chunk(rid: str, created: int, model: str, obj: str, usage: Usage) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage.body()}


def completion_response(rid: str, created: int, model: str, text: str, finish: str, usage: Usage, logprobs) -> dict:
    choice = {"text": text, "logprobs": logprobs, "finish_reason": finish}
    return {**_envelope(rid, "text_completion", created, model, choice), "usage": usage.body()}


def completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None = None, logprobs=None,
                     include_usage: bool = False) -> dict:  # fmt: skip
    choice = {"text": text, "logprobs": logprobs, "finish_reason": finish}
    return _chunk(rid, "text_completion", created, model, choice, include_usage)
