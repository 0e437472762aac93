"""One request's generation, independent of the wire protocol: submit the job, turn the worker's reports into
text pieces (leading spaces as the protocol wants, tool calls held back and parsed), and end with the outcome.

:class:`Run` is shared by the OpenAI routes (app.py) and the Anthropic Messages route (anthropic.py). Its
:meth:`Run.events` yields ``("text", str, [TokenLogprob])``, then ``("calls", [ToolCall])`` when the reply was
tool calls, and last ``("end", Outcome)``; a failure raises :class:`protocol.APIError`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

from lowbit.errors import ContextOverflowError, LowbitError
from lowbit.runtime.constraint import Constraint
from lowbit.runtime.engine import Engine
from lowbit.runtime.sampling import StopMatcher
from lowbit.runtime.server import protocol as P
from lowbit.runtime.server.tools import ToolSpec, parse_calls, trigger
from lowbit.runtime.server.worker import Outcome, Overloaded, ShuttingDown, submit_async


def room(engine: Engine, max_tokens: int | None, n_prompt: int, what: str) -> int:
    """max_tokens for this request: as asked, or all the context the prompt leaves; 400 when it does not fit."""
    ctx = engine.ctx
    if engine.context_shift and max_tokens is not None and n_prompt < ctx:
        return max_tokens  # the context moves on (--context-shift): only the prompt must fit
    if max_tokens is None:
        if n_prompt < ctx:
            return ctx - n_prompt
        message = (
            f"this model's maximum context length is {ctx} tokens, but the {what} alone has {n_prompt} tokens, "
            f"which leaves no room for a completion; shorten the {what}"
        )
    elif n_prompt + max_tokens > ctx:
        message = (
            f"this model's maximum context length is {ctx} tokens, but {n_prompt + max_tokens} were requested "
            f"({n_prompt} in the {what}, {max_tokens} for the completion); shorten the {what} or lower max_tokens"
        )
    else:
        return max_tokens
    param = "max_tokens" if max_tokens is not None and n_prompt < ctx else what
    raise P.APIError(400, message, param=param, code="context_length_exceeded")


def worker_error(e: BaseException) -> P.APIError:
    if isinstance(e, P.APIError):
        return e
    if isinstance(e, ShuttingDown):
        return P.APIError(503, str(e), type="server_error", code="unavailable")
    if isinstance(e, Overloaded):
        return P.APIError(503, str(e), type="server_error", code="overloaded")
    if isinstance(e, ContextOverflowError):
        return P.APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, LowbitError):
        return P.APIError(400, str(e))
    return P.APIError(500, "generation failed; see the server log", type="server_error")


def log_summary(o: Outcome) -> str:
    return (f"prompt={o.prompt_tokens} cached={o.cached_tokens} prefilled={o.prefilled_tokens} "
            f"completion={o.completion_tokens} finish={o.finish_reason} queued={o.queue_seconds:.3f}s")  # fmt: skip


def usage(o: Outcome) -> P.Usage:
    return P.Usage(o.prompt_tokens, o.completion_tokens, o.cached_tokens)


def sse(obj, event: str | None = None) -> str:
    data = f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
    return data if event is None else f"event: {event}\n{data}"


async def cancel_on_disconnect(request: Request, job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


class JobStream(StreamingResponse):
    """A streaming response that cancels its job however it ends, even before its first event (client gone)."""

    def __init__(self, job, content, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()  # no-op when the job has finished


class _ToolHold:
    """Passes reply text through until it may be a tool call, then holds the rest for parsing at the end."""

    def __init__(self, spec: ToolSpec, fmt: str):
        self.spec, self.fmt = spec, fmt
        self.matcher = StopMatcher([trigger(fmt)]) if trigger(fmt) else None
        self.parts: list[str] = []
        self.emitted = 0  # characters of the reply already passed on
        self.holding = False
        self.lead = ""  # llama3/mistral: leading whitespace, until the first character decides

    def feed(self, text: str) -> str:
        self.parts.append(text)
        if self.holding:
            return ""
        if self.matcher is not None:
            out, hit = self.matcher.feed(text)
            self.holding = hit
        else:
            self.lead += text
            head = self.lead.lstrip()
            if not head:
                return ""
            self.holding = head.startswith(("{", "[", "<|python_tag|>", "[TOOL_CALLS]"))
            out, self.lead = ("" if self.holding else self.lead), ""
        self.emitted += len(out)
        return out

    def finish(self) -> tuple[str, list]:
        """(text not yet passed on, tool calls) at the end of the reply."""
        full = "".join(self.parts)
        _, calls = parse_calls(full, self.fmt, self.spec.allowed())
        if calls:
            return "", calls
        return full[self.emitted :], []


class Run:
    """One generation: submitted at construction; :meth:`events` reads it."""

    def __init__(
        self,
        request: Request,
        ids: list[int],
        options: P.GenerationOptions,
        *,
        what: str,
        continuation: bool = False,
        tools: ToolSpec | None = None,
        tool_format: str = "hermes",
        constraint: Constraint | None = None,
        keep: int | None = None,
    ):
        app = request.app
        self.request = request
        self.options = options
        self.max_tokens = room(app.state.engine, options.max_tokens, len(ids), what)
        self.token_texts = app.state.token_texts
        self.model = app.state.config.model_name
        # A completion continues the prompt, so its text keeps the leading space of its first token, which the
        # engine's detokenizer (which starts from the first generated token) drops; chat replies stay as decoded.
        self._lead_space: bool | None = None if continuation else False
        self.hold = _ToolHold(tools, tool_format) if tools is not None and tools.choice != "none" else None
        self.received = 0
        try:
            self.job, self.reports = submit_async(app.state.worker, ids, options.params, self.max_tokens,
                                                  options.stop, options.logprobs, constraint,
                                                  options.ignore_eos, keep)  # fmt: skip
        except (ShuttingDown, Overloaded) as e:
            raise worker_error(e) from None

    def _text(self, event) -> str:
        if self._lead_space is None and event.token >= 0:
            self._lead_space = self.token_texts.loses_leading_space(event.token)
        if self._lead_space and event.text:
            self._lead_space = False
            return " " + event.text
        return event.text

    def _items(self, event) -> list[P.TokenLogprob]:
        if self.options.logprobs is None or event.token < 0 or event.logprob is None:
            return []
        return [P.TokenLogprob(event.token, event.logprob, list(event.top_logprobs))]

    async def events(self) -> AsyncIterator[tuple]:
        pending: list[P.TokenLogprob] = []  # logprobs of held-back text
        while True:
            kind, payload = await self.reports.get()
            if kind == "token":
                self.received += payload.token >= 0
                text, items = self._text(payload), self._items(payload)
                if self.hold is not None:
                    text = self.hold.feed(text)
                    if not text:
                        pending += items
                        continue
                    items, pending = pending + items, []
                if text or items:
                    yield ("text", text, items)
            elif kind == "error":
                raise worker_error(payload)
            else:
                outcome: Outcome = payload
                if self.hold is not None:
                    tail, calls = self.hold.finish()
                    if tail or pending:
                        yield ("text", tail, pending)
                    if calls and outcome.finish_reason != "cancelled":
                        outcome.finish_reason = "tool_calls"
                        yield ("calls", calls)
                yield ("end", outcome)
                return

    async def collect(self) -> tuple[str, list[P.TokenLogprob], list, Outcome]:
        """The whole reply (text, logprobs, tool calls, outcome); a client that goes away cancels it."""
        watcher = asyncio.create_task(cancel_on_disconnect(self.request, self.job))
        parts: list[str] = []
        items: list[P.TokenLogprob] = []
        calls: list = []
        try:
            async for ev in self.events():
                if ev[0] == "text":
                    parts.append(ev[1])
                    items += ev[2]
                elif ev[0] == "calls":
                    calls = ev[1]
                else:
                    outcome = ev[1]
        finally:
            watcher.cancel()
            self.job.cancel()  # no-op when it has finished
        self.request.state.lowbit_log = log_summary(outcome)
        text = "".join(parts)
        if calls:
            text = text.rstrip()
        return text, items, calls, outcome
