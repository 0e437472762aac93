"""What every route does with a request before generating: the API key, the JSON body, the model name, and for
chats the prompt (chat template with tools) and the output constraint."""

from __future__ import annotations

import hmac
import json

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from lowbit.errors import LowbitError
from lowbit.formats.chat_template import NO_TEMPLATE_MESSAGE
from lowbit.runtime.constraint import GrammarError
from lowbit.runtime.engine import Engine
from lowbit.runtime.server import protocol as P
from lowbit.runtime.server.tools import (
    ToolError,
    ToolSpec,
    check_grammar,
    fallback_messages,
    grammar_for,
    native_tools,
    tool_format,
)


def authorize(request: Request) -> None:
    """With --api-key: OpenAI's ``Authorization: Bearer KEY`` or Anthropic's ``x-api-key: KEY``."""
    key = request.app.state.config.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "").strip()
    if not token:
        raise P.APIError(401, "missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                         code="invalid_api_key", type="authentication_error")  # fmt: skip
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise P.APIError(401, "incorrect API key provided", code="invalid_api_key", type="authentication_error")


async def json_body(request: Request):
    raw = await request.body()
    if not raw.strip():
        raise P.bad_request("the request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise P.bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    check_text(body)
    return body


def check_text(body) -> None:
    """400 for strings no UTF-8 text can hold (a lone UTF-16 surrogate escape such as "\\ud800")."""
    stack = [body]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = v[e.start : e.end].encode("unicode_escape").decode()
                raise P.bad_request(f"the request holds text that is not valid Unicode (a lone surrogate {bad})",
                                    code="invalid_text") from None  # fmt: skip
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def check_model(request: Request, model: str | None) -> None:
    name = request.app.state.config.model_name
    if model is not None and model != name:
        raise P.APIError(404, f"the model '{model}' does not exist; this server has '{name}'", param="model",
                         code="model_not_found")  # fmt: skip


async def chat_prompt(request: Request, messages: list[dict], tools: ToolSpec | None, grammar: str | None):
    """Token ids of the chat, rendered with the tools the model's template knows (or the generic fallback), the tool
    format, the constraint its reply must follow (response_format, or the tool-call grammar), and the leading
    tokens a context shift keeps (system prompt and tools; 0 unless the server shifts)."""
    engine: Engine = request.app.state.engine
    tok = engine.tokenizer
    if not tok.has_chat_template:
        raise P.bad_request(f"{NO_TEMPLATE_MESSAGE} with /v1/completions", "messages", "no_chat_template")
    fmt = tool_format(tok.chat_template)
    offered = tools.tools if tools is not None else None
    kwargs = {}
    if native_tools(tok.chat_template):
        kwargs = {"tools": [t.openai() for t in offered]} if offered else {}
    else:
        messages = fallback_messages(messages, offered)
    if tools is not None:
        try:
            await run_in_threadpool(check_grammar, tools, engine.grammars)
            grammar = await run_in_threadpool(grammar_for, tools, fmt)
        except ToolError as e:
            raise P.bad_request(str(e), e.param, "invalid_tools") from None
    try:
        ids = await run_in_threadpool(tok.encode_chat, messages, add_generation_prompt=True, literal_content=True,
                                      **kwargs)
    except LowbitError as e:  # the template refused the conversation
        raise P.bad_request(f"chat template: {e}", "messages") from None
    keep = 0
    if engine.context_shift:
        keep = await run_in_threadpool(engine.keep_tokens, ids, messages, **kwargs)
    return ids, fmt, await compile_constraint(engine, grammar), keep


async def compile_constraint(engine: Engine, grammar: str | None, param: str = "response_format"):
    if grammar is None:
        return None
    try:
        return await run_in_threadpool(engine.grammars.compile, grammar)
    except GrammarError as e:
        raise P.bad_request(f"cannot constrain the output: {e}", param, "invalid_schema") from None
