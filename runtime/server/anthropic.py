"""The Anthropic Messages API (``POST /v1/messages``) over the same generation core as the OpenAI routes.

Request: ``model``, ``max_tokens`` (required), ``messages`` (text, ``tool_use`` and ``tool_result`` blocks),
``system``, ``stop_sequences``, ``temperature``/``top_p``/``top_k``, ``stream``, ``tools``, ``tool_choice``,
``metadata``. Answer: a ``message`` with ``text`` and ``tool_use`` blocks, ``stop_reason`` (end_turn, max_tokens,
stop_sequence, tool_use) and ``usage`` (``input_tokens`` excludes ``cache_read_input_tokens``, as Anthropic counts);
streamed as Anthropic's named events. Errors are ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lowbit.runtime.constraint import GrammarError, json_schema_grammar
from lowbit.runtime.server import protocol as P
from lowbit.runtime.server.generation import JobStream, Run, log_summary, sse
from lowbit.runtime.server.requests import authorize, chat_prompt, check_model, json_body
from lowbit.runtime.server.schema import Sampling
from lowbit.runtime.server.tools import ToolError, ToolSpec, anthropic_choice, new_call_id, parse_tools
from lowbit.runtime.server.worker import Outcome

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "cancelled": "end_turn"}


def error_body(status: int, message: str) -> dict:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def is_messages_path(path: str) -> bool:
    return path.rstrip("/") == "/v1/messages"


# ------------------------------------------------------------------------------------------------ requests
def _text_blocks(content: Any, param: str) -> str:
    """Text of a string or a list of text blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise P.bad_request(f"'{param}' must be a string or a list of content blocks", param, "invalid_type")
    texts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            message = f"'{param}[{j}]' must be a text block, got {kind!r}"
            raise P.bad_request(message, f"{param}[{j}]", "unsupported_content")
        texts.append(block["text"])
    return "\n".join(texts)


def _message(m: Any, i: int) -> list[dict]:
    """One Anthropic message as chat-template messages (tool results become ``tool`` messages)."""
    param = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
        raise P.bad_request(f"'{param}.role' must be 'user' or 'assistant'", f"{param}.role", "invalid_value")
    role, content = m["role"], m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise P.bad_request(f"'{param}.content' must be a string or a list of blocks", f"{param}.content")
    texts: list[str] = []
    calls: list[dict] = []
    results: list[dict] = []
    for j, block in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                raise P.bad_request(f"'{where}' must have a 'name' and an object 'input'", where, "invalid_type")
            fn = {"name": block["name"], "arguments": block.get("input", {})}
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": fn})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise P.bad_request(f"'{where}.tool_use_id' must be a string", f"{where}.tool_use_id", "invalid_type")
            text = _text_blocks(block.get("content", ""), f"{where}.content")
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "content": text, "tool_call_id": block["tool_use_id"]})
        else:
            message = (f"'{where}' is a {kind!r} block; this server accepts text blocks, tool_use in assistant "
                       "turns and tool_result in user turns")  # fmt: skip
            raise P.bad_request(message, where, "unsupported_content")
    out = list(results)
    if role == "assistant":
        out.append({"role": role, "content": "\n".join(texts), **({"tool_calls": calls} if calls else {})})
    elif texts or not results:
        out.append({"role": role, "content": "\n".join(texts)})
    return out


def parse_messages_request(body: Any, defaults: dict) -> tuple[P.GenerationOptions, list[dict], ToolSpec | None]:
    body = P.require_object(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise P.bad_request("'max_tokens' is required", "max_tokens", "missing_required_parameter")
    f = P.fields(Sampling, body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise P.bad_request("'messages' must be a non-empty list of messages", "messages", "invalid_type")
    chat: list[dict] = []
    if body.get("system") is not None:
        chat.append({"role": "system", "content": _text_blocks(body["system"], "system")})
    for i, m in enumerate(messages):
        chat += _message(m, i)
    stops = body.get("stop_sequences")
    stop_body = {"stop": stops} if stops is not None else {}
    try:
        tools = parse_tools(body["tools"], anthropic=True) if body.get("tools") is not None else []
        choice, parallel = anthropic_choice(body.get("tool_choice"), tools)
    except ToolError as e:
        raise P.bad_request(str(e), e.param, "invalid_tools") from None
    options = P.GenerationOptions(
        model=f.model or None,
        max_tokens=f.max_tokens,
        params=P.sampling_params(f, defaults),
        stop=P.stop_strings(stop_body),
        stream=bool(f.stream),
        grammar=_output_format(body.get("output_config")),
    )
    if options.grammar is not None and tools and choice != "none":
        raise P.bad_request("'output_config.format' cannot be combined with tools unless 'tool_choice' is none",
                            "output_config.format")  # fmt: skip
    return options, chat, (ToolSpec(tools, choice, parallel) if tools else None)


def _output_format(config: Any) -> str | None:
    """Anthropic's structured outputs: ``output_config: {"format": {"type": "json_schema", "schema": {...}}}``."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise P.bad_request("'output_config' must be an object", "output_config", "invalid_type")
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or "schema" not in fmt:
        raise P.bad_request("'output_config.format' must be {'type': 'json_schema', 'schema': {...}}",
                            "output_config.format", "invalid_value")  # fmt: skip
    try:
        return json_schema_grammar(fmt["schema"], what="the JSON schema")
    except GrammarError as e:
        raise P.bad_request(str(e), "output_config.format.schema", "invalid_schema") from None


# ------------------------------------------------------------------------------------------------ answers
def _usage(o: Outcome) -> dict:
    return {"input_tokens": o.prompt_tokens - o.cached_tokens, "output_tokens": o.completion_tokens,
            "cache_read_input_tokens": o.cached_tokens, "cache_creation_input_tokens": 0}  # fmt: skip


def _tool_block(call) -> dict:
    return {
        "type": "tool_use",
        "id": "toolu_" + call.id.removeprefix("call_"),
        "name": call.name,
        "input": call.arguments,
    }


def _message_shell(mid: str, model: str) -> dict:
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None}  # fmt: skip


async def _respond_json(run: Run) -> JSONResponse:
    text, _, calls, outcome = await run.collect()
    body = _message_shell(new_call_id("msg_"), run.model)
    body["content"] = ([{"type": "text", "text": text}] if text else []) + [_tool_block(c) for c in calls]
    body["stop_reason"] = "stop_sequence" if outcome.stop_sequence else STOP_REASONS.get(outcome.finish_reason)
    body["stop_sequence"] = outcome.stop_sequence
    body["usage"] = _usage(outcome)
    return JSONResponse(body)


async def _events(run: Run, n_prompt: int) -> AsyncIterator[str]:
    state = run.request.state
    shell = _message_shell(new_call_id("msg_"), run.model)
    shell["usage"] = {"input_tokens": n_prompt, "output_tokens": 0}
    yield sse({"type": "message_start", "message": shell}, "message_start")
    index, text_open, finished = 0, False, False
    try:
        try:
            async for ev in run.events():
                if ev[0] == "text" and ev[1]:
                    if not text_open:
                        start = {
                            "type": "content_block_start",
                            "index": index,
                            "content_block": {"type": "text", "text": ""},
                        }
                        yield sse(start, "content_block_start")
                        text_open = True
                    delta = {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "text_delta", "text": ev[1]},
                    }
                    yield sse(delta, "content_block_delta")
                elif ev[0] == "calls":
                    if text_open:
                        yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
                        index, text_open = index + 1, False
                    for call in ev[1]:
                        block = {**_tool_block(call), "input": {}}
                        yield sse({"type": "content_block_start", "index": index, "content_block": block},
                                  "content_block_start")  # fmt: skip
                        delta = {"type": "input_json_delta", "partial_json": call.arguments_json()}
                        yield sse({"type": "content_block_delta", "index": index, "delta": delta},
                                  "content_block_delta")  # fmt: skip
                        yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
                        index += 1
                elif ev[0] == "end":
                    outcome: Outcome = ev[1]
                    finished = True
                    state.lowbit_log = log_summary(outcome)
                    if text_open:
                        yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
                    reason = "stop_sequence" if outcome.stop_sequence else STOP_REASONS.get(outcome.finish_reason)
                    delta = {"stop_reason": reason, "stop_sequence": outcome.stop_sequence}
                    yield sse({"type": "message_delta", "delta": delta, "usage": _usage(outcome)}, "message_delta")
                    yield sse({"type": "message_stop"}, "message_stop")
        except P.APIError as err:
            finished = True
            state.lowbit_log = f"error during stream: {err.message}"
            yield sse(error_body(err.status, err.message), "error")
    finally:
        if not finished:
            run.job.cancel()
            state.lowbit_log = f"cancelled: client disconnected after {run.received} tokens"


def install_messages_route(app: FastAPI) -> None:
    @app.post("/v1/messages")
    async def messages(request: Request):
        authorize(request)
        engine = request.app.state.engine
        options, chat, tools = parse_messages_request(await json_body(request), engine.generation_defaults)
        check_model(request, options.model)
        ids, fmt, constraint, keep = await chat_prompt(request, chat, tools, options.grammar)
        if not ids:
            raise P.bad_request("the messages are empty after tokenization", "messages")
        run = Run(request, ids, options, what="messages", tools=tools, tool_format=fmt, constraint=constraint,
                  keep=keep)
        if options.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return JobStream(run.job, _events(run, len(ids)), media_type="text/event-stream", headers=headers)
        return await _respond_json(run)
