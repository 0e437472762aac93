"""The HTTP layer: FastAPI routes, server-sent events, OpenAI-shaped errors, body limit and request log.

Build the app with :func:`create_app`; everything it needs (engine, worker, settings) lives on ``app.state``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowbit.errors import ContextOverflowError, LowbitError
from lowbit.formats.chat_template import NO_TEMPLATE_MESSAGE
from lowbit.formats.tokenizer import Tokenizer
from lowbit.runtime.engine import Engine
from lowbit.runtime.server import protocol as P
from lowbit.runtime.server.middleware import BodyLimitMiddleware, LocalOnlyMiddleware, RequestLogMiddleware
from lowbit.runtime.server.worker import Outcome, ShuttingDown, Worker, submit_async

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


# ------------------------------------------------------------------------------------------------ ASGI middleware
# ------------------------------------------------------------------------------------------------ helpers
def _authorize(request: Request) -> None:
    key = request.app.state.config.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise P.APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise P.APIError(401, "incorrect API key provided", code="invalid_api_key")


async def _json_body(request: Request):
    raw = await request.body()
    if not raw.strip():
        raise P.bad_request("the request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise P.bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    _check_text(body)
    return body


def _check_text(body) -> None:
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


def _check_model(request: Request, model: str | None) -> None:
    name = request.app.state.config.model_name
    if model is not None and model != name:
        raise P.APIError(404, f"the model '{model}' does not exist; this server has '{name}'", param="model",
                         code="model_not_found")  # fmt: skip


def _room(engine: Engine, options: P.GenerationOptions, n_prompt: int, what: str) -> int:
    """max_tokens for this request: as asked, or all the context the prompt leaves; 400 when it does not fit."""
    ctx = engine.ctx
    asked = options.max_tokens
    if asked is None:
        if n_prompt < ctx:
            return ctx - n_prompt
        message = (
            f"this model's maximum context length is {ctx} tokens, but the {what} alone has {n_prompt} tokens, "
            f"which leaves no room for a completion; shorten the {what}"
        )
    elif n_prompt + asked > ctx:
        message = (
            f"this model's maximum context length is {ctx} tokens, but {n_prompt + asked} were requested "
            f"({n_prompt} in the {what}, {asked} for the completion); shorten the {what} or lower max_tokens"
        )
    else:
        return asked
    param = "max_tokens" if asked is not None and n_prompt < ctx else what
    raise P.APIError(400, message, param=param, code="context_length_exceeded")


def _worker_error(e: BaseException) -> P.APIError:
    if isinstance(e, ShuttingDown):
        return P.APIError(503, str(e), type="server_error", code="unavailable")
    if isinstance(e, ContextOverflowError):
        return P.APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, LowbitError):
        return P.APIError(400, str(e))
    return P.APIError(500, "generation failed; see the server log", type="server_error")


def _log_summary(o: Outcome) -> str:
    return (f"prompt={o.prompt_tokens} cached={o.cached_tokens} prefilled={o.prefilled_tokens} "
            f"completion={o.completion_tokens} finish={o.finish_reason} queued={o.queue_seconds:.3f}s")  # fmt: skip


def _usage(o: Outcome) -> P.Usage:
    return P.Usage(o.prompt_tokens, o.completion_tokens, o.cached_tokens)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _cancel_on_disconnect(request: Request, job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


# ------------------------------------------------------------------------------------------------ generation
class _JobStream(StreamingResponse):
    """A streaming response that cancels its job however it ends, even before its first event (client gone)."""

    def __init__(self, job, content, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()  # no-op when the job has finished


class _Generation:
    """One request's run: submit the job, then answer as one JSON object or as server-sent events."""

    def __init__(self, request: Request, kind: str, options: P.GenerationOptions, ids: list[int], what: str):
        app = request.app
        self.request = request
        self.kind = kind  # "chat" | "completion"
        self.options = options
        self.max_tokens = _room(app.state.engine, options, len(ids), what)
        self.ids = ids
        self.token_texts: TokenTexts = app.state.token_texts
        self.model = app.state.config.model_name
        # A completion continues the prompt, so its text keeps the leading space of its first token, which the
        # engine's detokenizer (which starts from the first generated token) drops; chat replies stay as decoded.
        self._lead_space: bool | None = None if kind == "completion" else False
        self.rid = P.new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = P.now()
        try:
            self.job, self.reports = submit_async(
                app.state.worker, ids, options.params, self.max_tokens, options.stop, options.logprobs
            )
        except ShuttingDown as e:
            raise _worker_error(e) from None

    def _logprobs(self, items: list[P.TokenLogprob], offset: int = 0):
        if self.options.logprobs is None:
            return None
        if self.kind == "chat":
            return P.chat_logprobs(items, self.token_texts.get)
        return P.completion_logprobs(items, self.token_texts.get, offset)

    def _text(self, event) -> str:
        if self._lead_space is None and event.token >= 0:
            self._lead_space = self.token_texts.loses_leading_space(event.token)
        if self._lead_space and event.text:
            self._lead_space = False
            return " " + event.text
        return event.text

    def _item(self, event) -> list[P.TokenLogprob]:
        if self.options.logprobs is None or event.token < 0 or event.logprob is None:
            return []
        return [P.TokenLogprob(event.token, event.logprob, list(event.top_logprobs))]

    async def respond_json(self) -> JSONResponse:
        watcher = asyncio.create_task(_cancel_on_disconnect(self.request, self.job))
        parts: list[str] = []
        items: list[P.TokenLogprob] = []
        try:
            while True:
                kind, payload = await self.reports.get()
                if kind == "token":
                    parts.append(self._text(payload))
                    items += self._item(payload)
                elif kind == "error":
                    raise _worker_error(payload)
                else:
                    outcome: Outcome = payload
                    break
        finally:
            watcher.cancel()
            self.job.cancel()  # no-op when it has finished
        self.request.state.lowbit_log = _log_summary(outcome)
        text = "".join(parts)
        build = P.chat_response if self.kind == "chat" else P.completion_response
        body = build(self.rid, self.created, self.model, text, outcome.finish_reason, _usage(outcome),
                     self._logprobs(items))  # fmt: skip
        return JSONResponse(body)

    def respond_stream(self) -> StreamingResponse:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return _JobStream(self.job, self._events(), media_type="text/event-stream", headers=headers)

    def _chunk(self, text: str, items: list[P.TokenLogprob], offset: int, finish: str | None = None) -> dict:
        usage = self.options.include_usage
        if self.kind == "chat":
            delta = {"content": text} if finish is None else {}
            return P.chat_chunk(self.rid, self.created, self.model, delta, finish,
                                self._logprobs(items) if items else None, include_usage=usage)  # fmt: skip
        return P.completion_chunk(self.rid, self.created, self.model, text, finish,
                                  self._logprobs(items, offset) if items else None, include_usage=usage)  # fmt: skip

    async def _events(self) -> AsyncIterator[str]:
        state = self.request.state
        finished = False
        received = 0
        offset = 0
        try:
            if self.kind == "chat":
                first = {"role": "assistant", "content": ""}
                yield _sse(P.chat_chunk(self.rid, self.created, self.model, first,
                                        include_usage=self.options.include_usage))  # fmt: skip
            while True:
                kind, payload = await self.reports.get()
                if kind == "token":
                    received += payload.token >= 0
                    items = self._item(payload)
                    text = self._text(payload)
                    if text or items:
                        yield _sse(self._chunk(text, items, offset))
                        offset += len(text)
                elif kind == "error":
                    finished = True
                    err = _worker_error(payload)
                    state.lowbit_log = f"error during stream: {err.message}"
                    yield _sse(err.body())
                    yield "data: [DONE]\n\n"
                    return
                else:
                    finished = True
                    outcome: Outcome = payload
                    state.lowbit_log = _log_summary(outcome)
                    yield _sse(self._chunk("", [], offset, finish=outcome.finish_reason))
                    if self.options.include_usage:
                        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
                        yield _sse(P.usage_chunk(self.rid, self.created, self.model, obj, _usage(outcome)))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:  # the client went away (or the server is stopping): stop generating
                self.job.cancel()
                state.lowbit_log = f"cancelled: client disconnected after {received} tokens"


# ------------------------------------------------------------------------------------------------ the app
def create_app(
    engine: Engine,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    loopback: bool = False,
    cors: tuple[str, ...] = (),
) -> FastAPI:
    """The OpenAI-compatible app for ``engine``. Its generation worker runs while the app's lifespan does."""
    try:
        created = int(engine.path.stat().st_mtime)
    except OSError:
        created = P.now()
    config = ServerConfig(model_name or engine.path.stem, api_key or None, max_body_bytes, created)
    worker = Worker(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="lowbit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.worker = worker
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
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        message = f"invalid request: {first.get('msg', 'validation failed')}" + (f" ({param})" if param else "")
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
        return JSONResponse(P.error_body("internal server error; see the server log", type="server_error"),
                            status_code=500)  # fmt: skip


def _install_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request):
        worker: Worker = request.app.state.worker
        engine: Engine = request.app.state.engine
        try:
            _authorize(request)
        except P.APIError:  # with --api-key set, only the key shows what runs here
            return {"status": "ok"}
        return {
            "status": "ok",
            "model": request.app.state.config.model_name,
            "context_length": engine.ctx,
            "busy": worker.busy,
            "queued": worker.queued,
            "worker": worker.stats.as_dict(),
        }

    def model_card(request: Request) -> dict:
        cfg: ServerConfig = request.app.state.config
        return {"id": cfg.model_name, "object": "model", "created": cfg.created, "owned_by": "lowbit",
                "context_length": request.app.state.engine.ctx}  # fmt: skip

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(request)
        return {"object": "list", "data": [model_card(request)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        _authorize(request)
        _check_model(request, model_id)
        return model_card(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorize(request)
        engine: Engine = request.app.state.engine
        req = P.parse_chat(await _json_body(request), engine.generation_defaults)
        _check_model(request, req.options.model)
        tok = engine.tokenizer
        if not tok.has_chat_template:
            raise P.bad_request(f"{NO_TEMPLATE_MESSAGE} with /v1/completions", "messages", "no_chat_template")
        try:
            ids = await run_in_threadpool(tok.encode_chat, req.messages, add_generation_prompt=True)
        except LowbitError as e:  # the template refused the conversation
            raise P.bad_request(f"chat template: {e}", "messages") from None
        return await _start(request, "chat", req.options, ids, "messages")

    @app.post("/v1/completions")
    async def completions(request: Request):
        _authorize(request)
        engine: Engine = request.app.state.engine
        req = P.parse_completion(await _json_body(request), engine.generation_defaults, engine.args.vocab_size)
        _check_model(request, req.options.model)
        if isinstance(req.prompt, str):
            ids = await run_in_threadpool(engine.tokenizer.encode, req.prompt, add_special_tokens=True)
        else:
            ids = req.prompt
        return await _start(request, "completion", req.options, ids, "prompt")


async def _start(request: Request, kind: str, options: P.GenerationOptions, ids: list[int], what: str):
    if not ids:
        raise P.bad_request(f"the {what} is empty after tokenization", what)
    gen = _Generation(request, kind, options, ids, what)
    if options.stream:
        return gen.respond_stream()
    return await gen.respond_json()
