"""ASGI middleware of the HTTP server, outside FastAPI's routing: the body size limit, the local-only checks (Host
header, JSON content type) and the request log line."""

from __future__ import annotations

import json
import logging
import time

from lowbit.runtime.server import protocol as P

log = logging.getLogger("lowbit.runtime.server")

DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this much so the client sees the 413
LOG_KEY = "lowbit_log"  # request-state key for the generation summary in the request log line


async def _send_json(send, status: int, body: dict, close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class BodyLimitMiddleware:
    """Answer 413 (OpenAI error shape) to request bodies over ``max_bytes``; otherwise hand the app the body."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else None
        body = bytearray()
        total = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            more = message.get("more_body", False)
            too_big = total > self.max_bytes or (size is not None and size > self.max_bytes)
            if too_big and total >= DRAIN_LIMIT:
                break
            if not too_big:
                body += chunk
        if total > self.max_bytes or (size is not None and size > self.max_bytes):
            msg = f"request body of {size if size is not None else total} bytes exceeds the limit of {self.max_bytes}"
            scope.setdefault("state", {})[LOG_KEY] = "body too large"
            return await _send_json(send, 413, P.error_body(msg, code="request_too_large"), close=True)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


class LocalOnlyMiddleware:
    """What a web page in the user's browser must not be able to do to a local server:

    - DNS rebinding: with ``loopback`` (the server binds a loopback address) a request whose Host header names
      anything but localhost / 127.0.0.1 / [::1] gets 403;
    - cross-origin "simple" POSTs (``text/plain`` or form bodies, which a page can send without a CORS preflight):
      every POST must say ``Content-Type: application/json``, else 415."""

    def __init__(self, app, loopback: bool):
        self.app = app
        self.loopback = loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.loopback:
            host = headers.get(b"host", b"").decode("latin-1").strip().lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK_HOSTS:
                scope.setdefault("state", {})[LOG_KEY] = f"refused Host {host!r}"
                msg = f"Host {host!r} is not this local server (expected localhost, 127.0.0.1 or [::1])"
                return await _send_json(send, 403, P.error_body(msg, code="forbidden_host"), close=True)
        if scope["method"] == "POST":
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype != "application/json":
                scope.setdefault("state", {})[LOG_KEY] = f"refused content type {ctype!r}"
                msg = f"Content-Type must be application/json, got {ctype or 'none'!r}"
                return await _send_json(send, 415, P.error_body(msg, code="unsupported_media_type"), close=True)
        await self.app(scope, receive, send)


class RequestLogMiddleware:
    """One log line per request: method, path, status, generation summary (tokens), duration."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 0

        async def send_logged(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            extra = state.get(LOG_KEY)
            log.info(
                "%s %s %s%s %.3fs",
                scope["method"],
                scope["path"],
                status or "-",
                f" {extra}" if extra else "",
                time.perf_counter() - t0,
            )


