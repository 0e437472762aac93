"""`lowbit serve`: a local OpenAI-compatible HTTP server (FastAPI + uvicorn).

protocol.py parses and shapes the OpenAI wire format, worker.py runs generations one at a time in a thread that
owns the engine, app.py holds the routes. :func:`create_app` builds the ASGI app; :func:`serve` runs it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from lowbit.errors import LowbitError
from lowbit.runtime.scheduler import DEFAULT_CACHE_RAM, DEFAULT_PARALLEL
from lowbit.runtime.server.app import DEFAULT_MAX_BODY, create_app
from lowbit.runtime.server.worker import DEFAULT_MAX_QUEUE

__all__ = ["DEFAULT_MAX_BODY", "bind_socket", "create_app", "make_server", "serve", "serve_command"]

log = logging.getLogger("lowbit.runtime.server")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); LowbitError when it cannot be had."""
    if not 0 <= port <= 65535:
        raise LowbitError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise LowbitError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)  # connections queue from now on, even before the server loop runs
    except OSError as e:
        sock.close()
        raise LowbitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def make_server(app, sock: socket.socket):
    """A uvicorn server for ``app`` on ``sock`` (run it with ``server.run(sockets=[sock])``)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_config=None,  # keep the application's logging set-up
        access_log=False,  # the app logs one line per request itself
        lifespan="on",
        ws="none",
        http="h11",
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    return uvicorn.Server(config)


def serve(app, sock: socket.socket) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    make_server(app, sock).run(sockets=[sock])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(args) -> int:
    from lowbit.runtime.compile_notice import CompileNotice
    from lowbit.runtime.engine import Engine
    from lowbit.runtime.store import resolve_model

    if log.getEffectiveLevel() > logging.INFO:  # the request lines and the address show without -v
        log.setLevel(logging.INFO)
    parallel = getattr(args, "parallel", DEFAULT_PARALLEL)
    cache_ram = getattr(args, "cache_ram", DEFAULT_CACHE_RAM >> 20)
    max_queue = getattr(args, "max_queue", DEFAULT_MAX_QUEUE)
    for flag, value, lo in (("--parallel", parallel, 1), ("--cache-ram", cache_ram, 0), ("--max-queue", max_queue, 0)):
        if value < lo:
            raise LowbitError(f"{flag} must be at least {lo}, got {value}")
    sock = bind_socket(args.host, args.port)  # first, so a busy port fails before the model loads
    try:
        engine = Engine(resolve_model(args.model), ctx=args.ctx, threads=args.threads,
                        device=getattr(args, "device", "cpu"), act_quant=getattr(args, "act_quant", "none"),
                        exact_activations=getattr(args, "exact_activations", None), mmap=getattr(args, "mmap", False),
                        kv=getattr(args, "kv_bits", None), verify=getattr(args, "verify", True),
                        context_shift=getattr(args, "context_shift", False))
        # kernels compiled (a cold start) or loaded before the port answers, so the first request does not wait:
        # by the generation worker, started here so that a failure is this command's error (all forward passes
        # run on its thread: runtime/server/worker.py); the app's start-up then finds it running
        engine.compile_notice = CompileNotice.for_engine(engine, live=False)
        app = create_app(engine, model_name=args.model_name, api_key=args.api_key, loopback=_is_loopback(args.host),
                         cors=tuple(getattr(args, "cors", None) or ()), parallel=parallel, cache_ram=cache_ram << 20,
                         max_queue=max_queue, warm_up=True)  # fmt: skip
        app.state.worker.start()
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(args.host) and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    log.info(
        "serving %s (%s, context %d, %d threads, %d parallel) at http://%s:%d/v1%s",
        app.state.config.model_name,
        engine.path,
        engine.ctx,
        engine.threads,
        app.state.worker.scheduler.parallel,
        shown,
        port,
        " (API key required)" if args.api_key else "",
    )
    serve(app, sock)
    return 0
