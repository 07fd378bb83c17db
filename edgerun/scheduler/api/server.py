"""The HTTP API under /v1 and the console at /, on Starlette served by uvicorn.

Starlette rather than FastAPI: the same ASGI core without pydantic (several MB
and ~40 ms of imports) or dependency injection; the request checks live in
edge.py, which names the key that is wrong, and the OpenAPI document is
written by hand (openapi.py). uvicorn runs with h11 and the `websockets`
package amqtt already brings; no `uvicorn[standard]` extras.

Threads: uvicorn's event loop runs on one thread ("api"). The service and the
store are blocking and thread-based, so every handler runs its work in the
thread pool (`run_in_threadpool`); the event streams are fed from the
service's EventHub through bounded queues that wake the loop thread-safely
(streams.py). Every error is JSON: `{"error": "...", "code": "...", "field"?}`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerun import __version__
from edgerun.control.errors import (
    SchedulerError,
)
from edgerun.control.tokens import is_loopback
from edgerun.errors import ConfigError
from edgerun.protocol import JSONObject
from edgerun.scheduler.api import edge, idem
from edgerun.scheduler.api.handlers import ApiError, Handlers, classify
from edgerun.scheduler.api.routes import JSONSchema, Op, Param, described
from edgerun.scheduler.api.table import core_routes
from edgerun.scheduler.api.fleetapi import rollout_routes
from edgerun.scheduler.api.overview import overview_routes
from edgerun.scheduler.errors import ListenError
from edgerun.scheduler.metrics import CONTENT_TYPE as METRICS_TYPE
from edgerun.scheduler.service import Service
from edgerun.scheduler.store.idempotency import Idempotency

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
STATIC = Path(__file__).resolve().parent / "web" / "static"
# the console runs only its own files: no inline script or style, no other origin, no frames
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
}
WS_MAX_SIZE = 64 * 1024  # a WebSocket message from a client: a subscribe is < 1 KiB
BODY_TIMEOUT_S = 30.0  # the whole request body (1 MiB at most) must arrive within this
READY_WITHIN_S = 2.0  # /readyz: a store that takes longer is not ready
THREADS = 6  # the thread pool that runs handlers' blocking work


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8470
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure_http: bool = False
    max_body: int = MAX_BODY
    # browser origins besides the server's own that may open the WebSocket ("*": any)
    allowed_origins: tuple[str, ...] = ()

    def check(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        if not self.tls_cert and not is_loopback(self.host) and not self.insecure_http:
            raise ConfigError(f"refusing to serve the API on {self.host} without TLS: its "
                              f"tokens and root commands would cross the network in clear; "
                              f"give --tls-cert and --tls-key, or --insecure-http if a "
                              f"proxy in front does TLS")
        for path in (self.tls_cert, self.tls_key):
            if path and not Path(path).is_file():
                raise ConfigError(f"TLS file {path} does not exist or is not a file")


def build_app(service: Service, config: ApiConfig, registry: Any = None) -> Any:
    """The Starlette application: /v1 routes, /v1/events, /v1/ws, the console at /."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, Response
    from starlette.routing import Mount, WebSocketRoute
    from starlette.routing import Route as StarletteRoute
    from starlette.staticfiles import StaticFiles

    from edgerun.scheduler.api import streams, ws
    from edgerun.scheduler.api.openapi import document

    h = Handlers(service)
    registry = registry if registry is not None else streams.Registry()
    h.on_revoke = registry.revoked
    keys = Idempotency(service.store.db)

    def answer(status: int, body: Any) -> Response:
        data = edge.dumps(body).encode("utf-8") + b"\n"
        return Response(data, status_code=status, media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    async def read_body(request: Request) -> JSONObject:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body):
            raise ApiError(413, "too_large", f"the request body is over "
                           f"{config.max_body} bytes")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):  # a body sent a byte at a time
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > config.max_body:
                        raise ApiError(413, "too_large", f"the request body is over "
                                       f"{config.max_body} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, "timeout", f"the request body did not arrive within "
                           f"{BODY_TIMEOUT_S:.0f} s") from None
        raw = b"".join(chunks)
        if not raw.strip():
            return {}
        return edge.parse_json(raw)

    def endpoint(role: str, what: str, work: Callable[..., Any], *, status: int = 200,
                 query: tuple[str | Param, ...] = (), repeatable: tuple[str, ...] = (),
                 body: bool | JSONSchema = False, with_who: bool = False, summary: str = "",
                 errors: tuple[int, ...] = (), carries: str = "the answer",
                 content: str = "application/json", path_params: dict[str, str] | None = None,
                 idempotent: bool = True) -> Callable[[Request], Awaitable[Response]]:
        """A route's handler, with its Op for the OpenAPI document. `query` names the
        query parameters (or gives them as Params, a schema each); `body` is True or the
        body's schema; `errors` the statuses the work may answer besides the edges'.
        `idempotent=False`: an answer that must not be kept (it shows a secret once) takes
        no Idempotency-Key."""
        params = tuple(q if isinstance(q, Param) else Param(q, many=q in repeatable)
                       for q in query)
        names = tuple(p.name for p in params)
        many = tuple(p.name for p in params if p.many)
        schema = body if isinstance(body, dict) else ({"type": "object"} if body else None)
        body = schema is not None
        op = Op(summary or what, role, status, params, schema, errors, carries, content,
                path_params or {})

        async def handle(request: Request) -> Response:
            # the token before the body: a stranger's body is never read
            who = await run_in_threadpool(h.principal, request.headers.get("authorization"),
                                          None, role, what)
            for name, value in request.path_params.items():
                edge.path_value(name, value)
            key = idem.key_of(request) if body and idempotent else None
            payload = await read_body(request) if body else None

            def run() -> Any:
                q = edge.query(request.query_params.multi_items(), names, many)
                args: list[Any] = list(request.path_params.values())
                if names:
                    args.append(q)
                if payload is not None:
                    args.append(payload)
                return work(who, *args) if with_who else work(*args)

            async def respond() -> Response:
                result = await run_in_threadpool(run)
                if isinstance(result, Response):
                    return result
                return answer(status, result)
            if key is None:
                return await respond()
            return await idem.once(keys, who.name, key, request, payload, respond)
        return described(handle, op)

    def metrics() -> Response:
        return Response(service.metrics.render(), media_type=METRICS_TYPE)

    async def open_metrics(_request: Request) -> Response:
        return await run_in_threadpool(metrics)

    async def openapi_json(_request: Request) -> Response:
        return answer(200, spec)

    async def healthz(_request: Request) -> Response:
        """Liveness, for a load balancer or Kubernetes: the API answers. No token, no data."""
        return answer(200, {"status": "ok"})

    async def readyz(_request: Request) -> Response:
        """Readiness: the store answers and the broker is connected. No token, no data."""
        def check() -> dict[str, bool]:
            try:
                store = service.store.schema_version > 0
            except Exception as exc:  # any store failure means not ready; say which
                log.debug("readyz: the store: %s", exc)
                store = False
            return {"store": store, "broker": service.messenger.connected.is_set()}
        try:
            parts = await asyncio.wait_for(run_in_threadpool(check), READY_WITHIN_S)
        except TimeoutError:
            parts = {"store": False, "broker": service.messenger.connected.is_set()}
        ready = all(parts.values())
        return answer(200 if ready else 503, {"status": "ready" if ready else "not_ready",
                                              **parts})

    async def console(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store",
                                                            **CONSOLE_HEADERS})

    async def on_error(request: Any, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
            message = {404: "no such endpoint", 405: "method not allowed here"}.get(
                exc.status_code, str(exc.detail))
            path = str(request.url.path)
            if exc.status_code == 404 and not path.startswith(("/v1/", "/static/")):
                message += (f"; the API is versioned: its paths start with /v1 (such as "
                            f"/v1{path[:80]}); /v1/openapi.json lists them")
            response = answer(exc.status_code, {"error": message, "code": code})
            for key, value in (exc.headers or {}).items():
                response.headers[key] = value
            return response
        status, payload = classify(exc)
        if status == 500:
            log.error("request failed", exc_info=exc)
        response = answer(status, payload)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="edgerun"'
        return response

    async def ws_over_http(request: Request) -> Response:
        await run_in_threadpool(h.principal, request.headers.get("authorization"), None,
                                "viewer", "reading events")
        raise ApiError(426, "upgrade_required", "/v1/ws is a WebSocket: connect with "
                       "Upgrade: websocket (docs/EVENTS.md)")

    Handler = Callable[[Request], Awaitable[Response]]
    table: dict[str, dict[str, Handler]] = core_routes(h, endpoint, metrics)
    table.update(rollout_routes(h, endpoint))
    table.update(overview_routes(h, endpoint))
    table["/v1/events"] = {"GET": described(streams.sse_endpoint(h, registry), Op(
        "Server-Sent Events (docs/EVENTS.md); resume with Last-Event-ID", "viewer",
        query=streams.QUERY, content="text/event-stream", carries="the event stream"))}
    # OpenAPI describes no WebSocket: /v1/ws is in the document's description, and a plain
    # GET of it gets 426 naming the upgrade
    table["/v1/ws"] = {"GET": ws_over_http}
    public = {
        "/healthz": {"GET": described(healthz, Op("liveness: the API answers", None,
                                                  carries="{status}"))},
        "/readyz": {"GET": described(readyz, Op("readiness: the store answers and the broker "
                                                "is connected", None, errors=(503,),
                                                carries="{status, store, broker}"))},
        # Prometheus' convention: a scraper reads /metrics without a token (counts only)
        "/metrics": {"GET": described(open_metrics, Op("Prometheus metrics", None,
                                                       content="text/plain",
                                                       carries="metrics"))},
        "/v1/openapi.json": {"GET": described(openapi_json, Op(
            "this document", None, carries="the OpenAPI document"))},
    }
    spec = document(__version__, {**public, **table})

    def by_method(handlers: dict[str, Handler]) -> Handler:
        """One route per path, so a wrong method gets 405 with every allowed one."""
        async def handle(request: Request) -> Response:
            method = "GET" if request.method == "HEAD" else request.method
            return await handlers[method](request)
        return handle

    routes: list[Any] = [
        StarletteRoute("/", console, methods=["GET"]),
        *[StarletteRoute(path, by_method(handlers), methods=list(handlers))
          for path, handlers in {**public, **table}.items()],
        WebSocketRoute("/v1/ws", ws.ws_endpoint(h, registry, config.allowed_origins)),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
    ]
    # SchedulerError is answered by the exception middleware (nothing more to log);
    # anything else reaches the server-error middleware: a 500 in JSON, and logged
    return Starlette(routes=routes, exception_handlers={
        Exception: on_error, HTTPException: on_error, SchedulerError: on_error})


class ApiServer:
    """uvicorn on its own thread ("api") with its own event loop."""

    def __init__(self, service: Service, config: ApiConfig | None = None) -> None:
        import uvicorn

        from edgerun.scheduler.api.deadline import HeadDeadline
        from edgerun.scheduler.api.trim import Trimmer

        self.service, self.config = service, config or ApiConfig()
        self.config.check()
        from edgerun.scheduler.api import logfilter
        from edgerun.scheduler.api.streams import Registry

        logfilter.install()
        self.streams = Registry()
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP;
        # with proto 0 a response written in two parts waits for the delayed ACK (40 ms)
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((self.config.host, self.config.port))
            self._sock.listen(128)
        except OSError as exc:
            self._sock.close()
            raise ListenError(f"the API cannot listen on {self.config.host}:"
                              f"{self.config.port}: {exc.strerror or exc}") from None
        self.host, self.port = self.config.host, int(self._sock.getsockname()[1])
        app = build_app(service, self.config, self.streams)
        self.trimmer = Trimmer()

        async def counted(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "lifespan":
                self.trimmer.note()
            await app(scope, receive, send)
        self._server = uvicorn.Server(uvicorn.Config(
            counted, http=HeadDeadline, ws="websockets-sansio", lifespan="off", log_config=None,
            access_log=False, server_header=False, timeout_graceful_shutdown=2,
            ws_ping_interval=20.0, ws_max_size=WS_MAX_SIZE, ssl_certfile=self.config.tls_cert,
            ssl_keyfile=self.config.tls_key))
        self._server.config.load()  # imports the protocol classes here, not on the api thread
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15.0
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise ListenError("the API did not start within 15 s")
            time.sleep(0.01)
        if not self._server.started:
            raise ListenError(f"the API could not start on {self.url}; see the log")
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception:
            log.exception("the API server stopped")

    async def _serve(self) -> None:
        import anyio.to_thread

        # the store is one connection behind a lock: more threads would only wait, and
        # each costs memory (small mode counts every MiB)
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        trimming = asyncio.get_running_loop().create_task(self._trim())
        try:
            await self._server.serve(sockets=[self._sock])
        finally:
            trimming.cancel()

    async def _trim(self) -> None:
        """Freed heap back to the system, every TRIM_EVERY_S after requests came (trim.py)."""
        from edgerun.scheduler.api.trim import TRIM_EVERY_S

        while True:
            await asyncio.sleep(TRIM_EVERY_S)
            if self.trimmer.due() and self.trimmer.trim is not None:
                await asyncio.to_thread(self.trimmer.trim)

    def stop(self) -> None:
        self.streams.stop_all()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10.0)
        try:
            self._sock.close()
        except OSError:
            pass
