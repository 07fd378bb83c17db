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
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerun import __version__
from edgerun.errors import ConfigError
from edgerun.protocol import JSONObject, State, is_final

from . import edge
from .auth import Forbidden, Principal, Unauthorized, authenticate, create_token, is_loopback
from .errors import (
    BadRequest, BrokerUnreachable, Conflict, ListenError, NotFound, SchedulerError, UnknownNode,
)
from .fleetapi import attempts_of, rollout_routes
from .events import audit_event, without_tails
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .service import Service

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
STATIC = Path(__file__).resolve().parent / "web" / "static"
TOUCH_EVERY_S = 60.0
# the console runs only its own files: no inline script or style, no other origin, no frames
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
}
THREADS = 6  # the thread pool that runs handlers' blocking work


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8470
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure_http: bool = False
    max_body: int = MAX_BODY

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


class ApiError(SchedulerError):
    """An HTTP answer other than success, with its status and code."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


def error_body(status: int, code: str, message: str, **extra: Any) -> tuple[int, JSONObject]:
    return status, {"error": message, "code": code, **extra}


def classify(exc: BaseException) -> tuple[int, JSONObject]:
    """(status, JSON body) of an exception: the one place errors become answers."""
    if isinstance(exc, ApiError):
        return error_body(exc.status, exc.code, str(exc), **exc.extra)
    if isinstance(exc, Unauthorized):
        return error_body(401, "unauthorized", str(exc))
    if isinstance(exc, Forbidden):
        return error_body(403, "forbidden", str(exc))
    if isinstance(exc, edge.Invalid):
        return error_body(422, "invalid", str(exc), field=exc.field)
    if isinstance(exc, Conflict):
        return error_body(409, "conflict", str(exc))
    if isinstance(exc, UnknownNode):
        return error_body(404, "unknown_node", str(exc))
    if isinstance(exc, NotFound):
        return error_body(404, "not_found", str(exc))
    if isinstance(exc, BadRequest):
        message = str(exc)
        return error_body(422, "invalid", message,
                          field=edge.field_of(message.removeprefix("bad task: "), "body"))
    if isinstance(exc, BrokerUnreachable):
        return error_body(503, "broker_unreachable", str(exc))
    return error_body(500, "internal", "internal error; see the service log")


class Handlers:
    """The routes' work, synchronous (run in the thread pool), checked at the edge."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.store = service.store
        self._touched: dict[int, float] = {}

    # --- auth ------------------------------------------------------------------------
    def principal(self, header: str | None, query_token: str | None, role: str,
                  what: str) -> Principal:
        who, _record = authenticate(self.store, header, query_token)
        if who.token_id is not None:
            now = time.monotonic()
            if now - self._touched.get(who.token_id, -TOUCH_EVERY_S) >= TOUCH_EVERY_S:
                self._touched[who.token_id] = now
                self.store.touch_token(who.token_id)
        who.require(role, what)
        return who

    def audit(self, who: Principal, action: str, **details: Any) -> None:
        self.service.hub.publish(audit_event(action, who.name, who.role, **details))

    # --- ids by unique prefix ---------------------------------------------------------
    def task_id(self, given: str) -> str:
        """The full id for `given` (exact, else a unique prefix, as git does).
        Several matches: 409 `ambiguous` with the candidates (the request is well formed;
        it clashes with what exists, so it is a conflict, not a bad field)."""
        if self.store.find(given):
            return given
        found = self.store.task_ids_with_prefix(given, 11)
        if not found:
            raise NotFound(f"no task {given!r}")
        if len(found) > 1:
            raise ApiError(409, "ambiguous", f"{given!r} is the start of several task ids; "
                           f"give more of it", candidates=found[:10])
        return found[0]

    def node_id(self, given: str) -> str:
        names: list[str] = [n["node"] for n in self.store.nodes()]
        if given in names:
            return given
        found = [n for n in names if n.startswith(given)]
        if not found:
            raise UnknownNode(f"unknown node {given!r}")
        if len(found) > 1:
            raise ApiError(409, "ambiguous", f"{given!r} is the start of several node ids; "
                           f"give more of it", candidates=found[:10])
        return found[0]

    # --- reads -------------------------------------------------------------------------
    def nodes(self, q: dict[str, list[str]]) -> JSONObject:
        nodes = self.store.nodes()
        if q.get("match") or q.get("where"):
            chosen = set(self.service.resolve(q.get("match", []), edge.boolean(q, "online"),
                                              q.get("where")))
            nodes = [n for n in nodes if n["node"] in chosen]
        elif edge.boolean(q, "online"):
            nodes = [n for n in nodes if n["state"] == "online"]
        state = edge.one(q, "state")
        if state is not None:
            if state not in ("online", "offline"):
                raise edge.Invalid("state", "`state` must be online or offline")
            nodes = [n for n in nodes if n["state"] == state]
        text = (edge.one(q, "q") or "").lower()
        if text:
            nodes = [n for n in nodes if text in n["node"].lower()
                     or text in json.dumps(n.get("facts") or {}).lower()]
        for fact in q.get("fact", []):
            key, sep, value = fact.partition("=")
            if not sep or not key:
                raise edge.Invalid("fact", "`fact` must be KEY=VALUE, such as arch=x86_64")
            nodes = [n for n in nodes if str((n.get("facts") or {}).get(key)) == value]
        total = len(nodes)
        after = edge.one(q, "cursor")
        if after:
            nodes = [n for n in nodes if n["node"] > after]
        size = edge.limit(q, 500)
        page = nodes[:size]
        return {"nodes": page, "total": total,
                "next": page[-1]["node"] if len(nodes) > size else None}

    def node(self, node: str) -> JSONObject:
        found = self.store.node(self.node_id(node))
        assert found is not None
        tasks, _ = self.store.task_page(node=found["node"], limit=20)
        return {**found, "tasks": [without_tails(t) for t in tasks]}

    def tasks(self, q: dict[str, list[str]]) -> JSONObject:
        tasks, more = self.store.task_page(
            node=edge.one(q, "node"), state=edge.state(q), job_id=edge.one(q, "job"),
            before=edge.cursor_int(q), limit=edge.limit(q, 100))
        return {"tasks": [without_tails(t) for t in tasks],
                "next": str(more) if more is not None else None}

    def task(self, given: str, q: dict[str, list[str]]) -> JSONObject:
        task_id = self.task_id(given)
        node = edge.one(q, "node")
        found = [t for t in self.store.find(task_id) if node is None or t["node"] == node]
        if not found:
            raise NotFound(f"no task {task_id!r}" + (f" on node {node}" if node else ""))
        for task in found:
            task["updates"] = self.store.updates(task["node"], task_id)
            attempts = attempts_of(self.service, task)
            if attempts is not None:
                task["attempts"] = attempts
        return {"tasks": found}

    def jobs(self, q: dict[str, list[str]]) -> JSONObject:
        size = edge.limit(q, 50)
        jobs = self.store.jobs(before=edge.one(q, "cursor"), limit=size + 1)
        page = [{**j, "progress": self.progress(j["id"], len(j["steps"]), j["nodes"])}
                for j in jobs[:size]]
        return {"jobs": page, "next": jobs[size - 1]["created_at"] if len(jobs) > size
                else None}

    def progress(self, job_id: str, steps: int, nodes: int) -> JSONObject:
        """One row for the whole job, counted by the database: per step and in total."""
        counts = self.store.job_progress(job_id)
        per_step = [{"step": i, "states": counts.get(i, {})} for i in range(steps)]
        total: dict[str, int] = {}
        for by_state in counts.values():
            for state, n in by_state.items():
                total[state] = total.get(state, 0) + n
        done = sum(n for s, n in total.items() if is_final(State(s)))
        failed = sum(n for s, n in total.items() if is_final(State(s)) and s != "succeeded")
        return {"nodes": nodes, "tasks": nodes * steps, "done": done, "failed": failed,
                "succeeded": total.get("succeeded", 0), "states": total, "steps": per_step}

    def job(self, job_id: str) -> JSONObject:
        job = self.store.job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return {"id": job["id"], "created_at": job["created_at"], "steps": job["steps"],
                "nodes": len(job["nodes"]),
                "progress": self.progress(job_id, len(job["steps"]), len(job["nodes"]))}

    def job_targets(self, job_id: str, q: dict[str, list[str]]) -> JSONObject:
        if self.store.job(job_id) is None:
            raise NotFound(f"no job {job_id!r}")
        size = edge.limit(q, 100)
        rows = self.store.job_targets(job_id, edge.one(q, "cursor"), size + 1)
        page = rows[:size]
        return {"targets": page, "next": page[-1]["node"] if len(rows) > size else None}

    # --- writes ------------------------------------------------------------------------
    def check_spec(self, spec: JSONObject, field: str) -> None:
        """The contract's own parser on a request's task; its complaint names the field."""
        try:
            self.service.build_task(spec, spec.get("id") or "check", expiry=False)
        except edge.Invalid:
            raise
        except BadRequest as exc:
            message = str(exc).removeprefix("bad task: ")
            raise edge.Invalid(f"{field}.{edge.field_of(message, 'type')}",
                               f"`{field}`: {message}") from None

    def dispatch(self, who: Principal, body: JSONObject) -> JSONObject:
        targets, online, spec = edge.dispatch_body(body)
        self.check_spec(spec, "task")
        created = self.service.dispatch(targets, online, spec, where=body.get("where"),
                                        retry=body.get("retry"))
        self.audit(who, "dispatch", tasks=sorted({t["id"] for t in created}),
                   nodes=[t["node"] for t in created][:1000], count=len(created),
                   type=spec["type"], node=created[0]["node"] if len(created) == 1 else None)
        return {"tasks": [without_tails(t) for t in created]}

    def create_job(self, who: Principal, body: JSONObject) -> JSONObject:
        job_id, targets, online, steps = edge.job_body(body)
        for i, step in enumerate(steps):
            self.check_spec({k: v for k, v in step.items() if k != "id"}, f"steps.{i}")
        job = self.service.create_job(targets, online, steps, job_id, where=body.get("where"))
        self.audit(who, "job", job=job["id"], nodes=job["nodes"][:1000],
                   count=len(job["nodes"]), steps=len(steps), tasks=[])
        return {**self.job(job["id"]), "tasks": [without_tails(t) for t in job["tasks"]]}

    def cancel(self, who: Principal, given: str, body: JSONObject) -> JSONObject:
        edge.check_keys(body, ("node",), "a cancel request")
        node = body.get("node")
        if node is not None and not isinstance(node, str):
            raise edge.Invalid("node", "`node` must be a node id")
        task_id = self.task_id(given)
        canceled = self.service.cancel(task_id, node)
        self.audit(who, "cancel", tasks=[task_id], nodes=[t["node"] for t in canceled],
                   node=canceled[0]["node"] if len(canceled) == 1 else None)
        return {"tasks": [without_tails(t) for t in canceled]}

    def cancel_job(self, who: Principal, job_id: str, body: JSONObject) -> JSONObject:
        edge.check_keys(body, (), "a job cancel request")
        job = self.store.job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        open_tasks = [t for t in job["tasks"] if not is_final(State(t["state"]))]
        if not open_tasks:
            raise Conflict(f"job {job_id} has already finished; nothing to cancel")
        sent = []
        for task_id in sorted({t["id"] for t in open_tasks}):  # one call per step, not per node
            others = [t for t in self.store.find(task_id) if t["job"] != job_id]
            nodes = [None] if not others else sorted(
                {t["node"] for t in open_tasks if t["id"] == task_id})
            for node in nodes:
                try:
                    sent.extend(self.service.cancel(task_id, node))
                except Conflict:
                    continue  # it finished meanwhile
        self.audit(who, "cancel", job=job_id, tasks=sorted({t["id"] for t in sent}),
                   nodes=sorted({t["node"] for t in sent})[:1000], count=len(sent))
        return {"job": job_id, "canceled": len(sent)}

    # --- tokens ----------------------------------------------------------------------
    def create_token(self, who: Principal, body: JSONObject) -> JSONObject:
        edge.check_keys(body, ("name", "role"), "a token request")
        name, role = body.get("name"), body.get("role", "viewer")
        if not isinstance(name, str):
            raise edge.Invalid("name", "`name` must be a string: who or what uses the token")
        if not isinstance(role, str):
            raise edge.Invalid("role", "`role` must be viewer, operator or admin")
        try:
            token, record = create_token(self.store, name, role, who.name)
        except Conflict:
            raise
        except BadRequest as exc:
            raise edge.Invalid(edge.field_of(str(exc), "name"), str(exc)) from None
        self.audit(who, "token_create", token=name, token_role=role)
        return {**record, "token": token}

    def forget_node(self, who: Principal, node: str) -> JSONObject:
        """DELETE /v1/nodes/{node}: out of the registry (issue 13); its tasks stay."""
        done = self.service.forget_node(node)
        self.audit(who, "node_forget", node=node, nodes=[node])
        return done

    def revoke_token(self, who: Principal, name: str) -> JSONObject:
        record = self.store.revoke_token(name)
        if record is None:
            raise NotFound(f"no live token named {name!r}")
        self.audit(who, "token_revoke", token=name)
        return record


# --- the ASGI application ----------------------------------------------------------------
Route = tuple[str, str, str, Callable[..., Any]]  # method, path, role, work


def build_app(service: Service, config: ApiConfig, on_stream: Any = None) -> Any:
    """The Starlette application: /v1 routes, /v1/events, /v1/ws, the console at /."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, Response
    from starlette.routing import Mount, Route as StarletteRoute, WebSocketRoute
    from starlette.staticfiles import StaticFiles

    from . import streams
    from .openapi import document

    h = Handlers(service)

    def answer(status: int, body: Any) -> Response:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n"
        return Response(data, status_code=status, media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    async def read_body(request: Request) -> JSONObject:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body):
            raise ApiError(413, "too_large", f"the request body is over "
                           f"{config.max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body:
                raise ApiError(413, "too_large", f"the request body is over "
                               f"{config.max_body} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "bad_json", "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the request body must be a JSON object")
        return body

    def endpoint(role: str, what: str, work: Callable[..., Any], *, status: int = 200,
                 query: tuple[str, ...] = (), repeatable: tuple[str, ...] = (),
                 body: bool = False, with_who: bool = False
                 ) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            payload = await read_body(request) if body else None

            def run() -> Any:
                who = h.principal(request.headers.get("authorization"), None, role, what)
                q = edge.query(request.query_params.multi_items(), query, repeatable)
                args: list[Any] = list(request.path_params.values())
                if query:
                    args.append(q)
                if payload is not None:
                    args.append(payload)
                return work(who, *args) if with_who else work(*args)
            result = await run_in_threadpool(run)
            if isinstance(result, Response):
                return result
            return answer(status, result)
        return handle

    def metrics() -> Response:
        return Response(service.metrics.render(), media_type=METRICS_TYPE)

    def whoami(who: Principal) -> JSONObject:
        return {"name": who.name, "role": who.role, "version": __version__}

    async def open_metrics(_request: Request) -> Response:
        return await run_in_threadpool(metrics)

    async def openapi_json(_request: Request) -> Response:
        return answer(200, document(__version__))

    async def console(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store",
                                                            **CONSOLE_HEADERS})

    async def on_error(_request: Any, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
            message = {404: "no such endpoint", 405: "method not allowed here"}.get(
                exc.status_code, str(exc.detail))
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

    tasks_q = ("node", "state", "job", "limit", "cursor")
    nodes_q = ("online", "match", "where", "state", "q", "fact", "limit", "cursor")
    Handler = Callable[[Request], Awaitable[Response]]
    table: dict[str, dict[str, Handler]] = {
        "/v1/whoami": {"GET": endpoint("viewer", "reading", whoami, with_who=True)},
        "/v1/health": {"GET": endpoint("viewer", "reading", service.health)},
        "/v1/metrics": {"GET": endpoint("viewer", "reading", metrics)},
        "/v1/nodes": {"GET": endpoint("viewer", "reading", h.nodes, query=nodes_q,
                                      repeatable=("match", "fact", "where"))},
        "/v1/nodes/{node}": {
            "GET": endpoint("viewer", "reading", h.node),
            "DELETE": endpoint("operator", "forgetting nodes", h.forget_node, with_who=True)},
        "/v1/tasks": {
            "GET": endpoint("viewer", "reading", h.tasks, query=tasks_q),
            "POST": endpoint("operator", "dispatching", h.dispatch, status=201, body=True,
                             with_who=True)},
        "/v1/tasks/{id}": {"GET": endpoint("viewer", "reading", h.task, query=("node",))},
        "/v1/tasks/{id}/cancel": {"POST": endpoint("operator", "cancelling", h.cancel,
                                                   body=True, with_who=True)},
        "/v1/jobs": {
            "GET": endpoint("viewer", "reading", h.jobs, query=("limit", "cursor")),
            "POST": endpoint("operator", "dispatching", h.create_job, status=201, body=True,
                             with_who=True)},
        "/v1/jobs/{id}": {"GET": endpoint("viewer", "reading", h.job)},
        "/v1/jobs/{id}/targets": {"GET": endpoint("viewer", "reading", h.job_targets,
                                                  query=("limit", "cursor"))},
        "/v1/jobs/{id}/cancel": {"POST": endpoint("operator", "cancelling", h.cancel_job,
                                                  body=True, with_who=True)},
        "/v1/tokens": {
            "GET": endpoint("admin", "managing tokens",
                            lambda: {"tokens": service.store.tokens()}),
            "POST": endpoint("admin", "managing tokens", h.create_token, status=201,
                             body=True, with_who=True)},
        "/v1/tokens/{name}": {"DELETE": endpoint("admin", "managing tokens", h.revoke_token,
                                                 with_who=True)},
        "/v1/events": {"GET": streams.sse_endpoint(h, on_stream)},
    }

    table.update(rollout_routes(h, endpoint))

    def by_method(handlers: dict[str, Handler]) -> Handler:
        """One route per path, so a wrong method gets 405 with every allowed one."""
        async def handle(request: Request) -> Response:
            method = "GET" if request.method == "HEAD" else request.method
            return await handlers[method](request)
        return handle

    routes: list[Any] = [
        StarletteRoute("/", console, methods=["GET"]),
        StarletteRoute("/v1/openapi.json", openapi_json, methods=["GET"]),
        # Prometheus' convention: a scraper reads /metrics without a token (counts only)
        StarletteRoute("/metrics", open_metrics, methods=["GET"]),
        *[StarletteRoute(path, by_method(handlers), methods=list(handlers))
          for path, handlers in table.items()],
        WebSocketRoute("/v1/ws", streams.ws_endpoint(h, on_stream)),
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

        self.service, self.config = service, config or ApiConfig()
        self.config.check()
        self.streams: set[Any] = set()
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
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
        self._server = uvicorn.Server(uvicorn.Config(
            app, http="h11", ws="websockets-sansio", lifespan="off", log_config=None,
            access_log=False, server_header=False, timeout_graceful_shutdown=2,
            ws_ping_interval=20.0, ssl_certfile=self.config.tls_cert,
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
        await self._server.serve(sockets=[self._sock])

    def stop(self) -> None:
        for close in list(self.streams):
            close()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10.0)
        try:
            self._sock.close()
        except OSError:
            pass
