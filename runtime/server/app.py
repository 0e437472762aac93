"""The HTTP layer: FastAPI routes, server-sent events, OpenAI-shaped errors, body limit and request log.

Build the app with :func:`create_app`; everything it needs (engine, worker, settings) lives on ``app.state``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowbit.formats.tokenizer import Tokenizer
from lowbit.runtime.engine import Engine
from lowbit.runtime.scheduler import DEFAULT_CACHE_RAM, DEFAULT_PARALLEL
from lowbit.runtime.server import protocol as P
from lowbit.runtime.server.anthropic import error_body as anthropic_error
from lowbit.runtime.server.anthropic import install_messages_route, is_messages_path
from lowbit.runtime.server.generation import JobStream, Run, log_summary, sse, usage
from lowbit.runtime.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from lowbit.runtime.server.metrics import Metrics
from lowbit.runtime.server.middleware import BodyLimitMiddleware, LocalOnlyMiddleware, RequestLogMiddleware
from lowbit.runtime.server.requests import authorize, chat_prompt, check_model, compile_constraint, json_body
from lowbit.runtime.server.worker import DEFAULT_MAX_QUEUE, Outcome, Worker

log = logging.getLogger("lowbit.runtime.server")

DEFAULT_MAX_BODY = 1 << 20  # bytes


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    created: int = 0


# ------------------------------------------------------------------------------------------------ token text
class TokenTexts:
    """The text and UTF-8 bytes of single tokens, for logprobs (leading spaces kept, byte tokens as their byte)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        byte_ids = tokenizer.byte_token_ids()
        self.byte_of: dict[int, int] = {}
        for b in range(256):
            i = tokenizer.token_to_id(f"<0x{b:02X}>")
            if i is not None and i in byte_ids:
                self.byte_of[i] = b
        anchor = tokenizer.encode("a", add_special_tokens=False)
        self.anchor = anchor[-1:] if anchor else []
        self.anchor_text = tokenizer.decode(self.anchor, skip_special_tokens=False)
        self.get = lru_cache(maxsize=65536)(self._text)

    def loses_leading_space(self, token: int) -> bool:
        """Whether decoding from ``token`` on drops its leading space (sentencepiece-style decoders do)."""
        text = self.get(token)[0]
        return text.startswith(" ") and not self.tok.decode([token], skip_special_tokens=False).startswith(" ")

    def _text(self, token: int) -> tuple[str, list[int] | None]:
        if token in self.byte_of:
            raw = bytes([self.byte_of[token]])
            return raw.decode("utf-8", errors="replace"), list(raw)
        both = self.tok.decode([*self.anchor, token], skip_special_tokens=False)
        if self.anchor and both.startswith(self.anchor_text):  # decoders drop a leading space of the first token
            text = both[len(self.anchor_text) :]
        else:
            text = self.tok.decode([token], skip_special_tokens=False)
        return text, list(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------ OpenAI answers
def _logprobs(run: Run, kind: str, items: list[P.TokenLogprob], offset: int = 0):
    if run.options.logprobs is None:
        return None
    if kind == "chat":
        return P.chat_logprobs(items, run.token_texts.get)
    return P.completion_logprobs(items, run.token_texts.get, offset)


async def _respond_json(run: Run, kind: str) -> JSONResponse:
    rid, created = P.new_id("chatcmpl" if kind == "chat" else "cmpl"), P.now()
    text, items, calls, outcome = await run.collect()
    logprobs = _logprobs(run, kind, items)
    if kind == "chat":
        body = P.chat_response(rid, created, run.model, text, outcome.finish_reason, usage(outcome), logprobs, calls)
    else:
        body = P.completion_response(rid, created, run.model, text, outcome.finish_reason, usage(outcome), logprobs)
    return JSONResponse(body)


def _respond_stream(run: Run, kind: str) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return JobStream(run.job, _stream_events(run, kind), media_type="text/event-stream", headers=headers)


async def _stream_events(run: Run, kind: str) -> AsyncIterator[str]:
    state = run.request.state
    rid, created, model = P.new_id("chatcmpl" if kind == "chat" else "cmpl"), P.now(), run.model
    with_usage = run.options.include_usage
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    finished = False
    offset = 0

    def chunk(text: str, items, finish: str | None = None, delta: dict | None = None) -> str:
        if kind == "chat":
            delta = delta if delta is not None else ({"content": text} if finish is None else {})
            return sse(P.chat_chunk(rid, created, model, delta, finish, _logprobs(run, kind, items) if items else None,
                                    include_usage=with_usage))  # fmt: skip
        return sse(P.completion_chunk(rid, created, model, text, finish,
                                      _logprobs(run, kind, items, offset) if items else None,
                                      include_usage=with_usage))  # fmt: skip

    try:
        if kind == "chat":
            yield sse(P.chat_chunk(rid, created, model, {"role": "assistant", "content": ""},
                                   include_usage=with_usage))  # fmt: skip
        try:
            async for ev in run.events():
                if ev[0] == "text":
                    if ev[1] or ev[2]:
                        yield chunk(ev[1], ev[2])
                        offset += len(ev[1])
                elif ev[0] == "calls":
                    for i, call in enumerate(ev[1]):  # as OpenAI streams them: name first, then the arguments
                        yield chunk("", [], delta={"tool_calls": [P.tool_call_delta(i, call, head=True)]})
                        yield chunk("", [], delta={"tool_calls": [P.tool_call_delta(i, call, head=False)]})
                else:
                    outcome: Outcome = ev[1]
                    finished = True
                    state.lowbit_log = log_summary(outcome)
                    yield chunk("", [], finish=outcome.finish_reason)
                    if with_usage:
                        yield sse(P.usage_chunk(rid, created, model, obj, usage(outcome)))
                    yield "data: [DONE]\n\n"
        except P.APIError as err:
            finished = True
            state.lowbit_log = f"error during stream: {err.message}"
            yield sse(err.body())
            yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away (or the server is stopping): stop generating
            run.job.cancel()
            state.lowbit_log = f"cancelled: client disconnected after {run.received} tokens"


# ------------------------------------------------------------------------------------------------ the app
def create_app(
    engine: Engine,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    loopback: bool = False,
    cors: tuple[str, ...] = (),
    parallel: int = DEFAULT_PARALLEL,
    cache_ram: int = DEFAULT_CACHE_RAM,
    max_queue: int = DEFAULT_MAX_QUEUE,
    warm_up: bool = False,
) -> FastAPI:
    """The OpenAI-compatible app for ``engine``. Its generation worker runs while the app's lifespan does; its
    start-up waits for the worker's preparation (``warm_up``: the first reply's kernels too)."""
    try:
        created = int(engine.path.stat().st_mtime)
    except OSError:
        created = P.now()
    config = ServerConfig(model_name or engine.path.stem, api_key or None, max_body_bytes, created)
    worker = Worker(engine, parallel, cache_ram, max_queue, warm_up)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(worker.start)
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="lowbit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.worker = worker
    app.state.metrics = Metrics(worker)
    app.state.config = config
    app.state.token_texts = TokenTexts(engine.tokenizer)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(LocalOnlyMiddleware, loopback=loopback)
    if cors:  # only the origins the user named may read responses from a browser
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-api-key"])  # fmt: skip
    app.add_middleware(RequestLogMiddleware)  # outermost: logs the refusals too
    _install_error_handlers(app)
    _install_routes(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(P.APIError)
    async def api_error(request: Request, e: P.APIError):
        request.state.lowbit_log = f"error: {e.message}"
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        if e.status == 503 and e.code == "overloaded":
            headers = {"Retry-After": "1"}
        if is_messages_path(request.url.path):
            return JSONResponse(anthropic_error(e.status, e.message), status_code=e.status, headers=headers)
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        message = f"invalid request: {first.get('msg', 'validation failed')}" + (f" ({param})" if param else "")
        if is_messages_path(request.url.path):
            return JSONResponse(anthropic_error(400, message), status_code=400)
        return JSONResponse(P.error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            message, code = f"no such endpoint: {request.method} {request.url.path}", "not_found"
        elif e.status_code == 405:
            message, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(e.detail), None
        kind = "server_error" if e.status_code >= 500 else "invalid_request_error"
        return JSONResponse(P.error_body(message, type=kind, code=code), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        if is_messages_path(request.url.path):
            return JSONResponse(anthropic_error(500, "internal server error; see the server log"), status_code=500)
        return JSONResponse(P.error_body("internal server error; see the server log", type="server_error"),
                            status_code=500)  # fmt: skip


def _install_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request):
        worker: Worker = request.app.state.worker
        engine: Engine = request.app.state.engine
        try:
            authorize(request)
        except P.APIError:  # with --api-key set, only the key shows what runs here
            return {"status": "ok"}
        return {
            "status": "ok",
            "model": request.app.state.config.model_name,
            "context_length": engine.ctx,
            "busy": worker.busy,
            "running": worker.running,
            "parallel": worker.scheduler.parallel,
            "queued": worker.queued,
            "worker": worker.stats.as_dict(),
        }

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        return Response(request.app.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    def model_card(request: Request) -> dict:
        cfg: ServerConfig = request.app.state.config
        return {"id": cfg.model_name, "object": "model", "created": cfg.created, "owned_by": "lowbit",
                "context_length": request.app.state.engine.ctx}  # fmt: skip

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(request)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        authorize(request)
        check_model(request, model_id)
        return model_card(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        engine: Engine = request.app.state.engine
        req = P.parse_chat(await json_body(request), engine.generation_defaults)
        check_model(request, req.options.model)
        ids, fmt, constraint, keep = await chat_prompt(request, req.messages, req.tools, req.options.grammar)
        return await _start(request, "chat", req.options, ids, "messages", tools=req.tools, tool_format=fmt,
                            constraint=constraint, keep=keep)  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        engine: Engine = request.app.state.engine
        req = P.parse_completion(await json_body(request), engine.generation_defaults, engine.args.vocab_size)
        check_model(request, req.options.model)
        if isinstance(req.prompt, str):
            ids = await run_in_threadpool(engine.tokenizer.encode, req.prompt, add_special_tokens=True)
        else:
            ids = req.prompt
        constraint = await compile_constraint(engine, req.options.grammar)
        return await _start(request, "completion", req.options, ids, "prompt", constraint=constraint)

    install_messages_route(app)


async def _start(request: Request, kind: str, options: P.GenerationOptions, ids: list[int], what: str, **kw):
    if not ids:
        raise P.bad_request(f"the {what} is empty after tokenization", what)
    run = Run(request, ids, options, what=what, continuation=kind == "completion", **kw)
    if options.stream:
        return _respond_stream(run, kind)
    return await _respond_json(run, kind)
