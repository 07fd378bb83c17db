"""The HTTP JSON API that the command line and other tools use (scheduler/README.md, "API").

stdlib ThreadingHTTPServer: one thread per request. `/events` is a live
stream of newline-delimited JSON (one event a line, a heartbeat every 15 s),
open until the client goes away or the service stops.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from edgerun import __version__

from .errors import (
    BadRequest, BrokerUnreachable, ListenError, NotFound, SchedulerError, UnknownNode,
)
from .events import NODE_EVENT, OUTPUT, TASK_EVENT
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .service import Service

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
HEARTBEAT_S = 15.0
ERRORS: list[tuple[type[SchedulerError], HTTPStatus, str]] = [
    (BadRequest, HTTPStatus.BAD_REQUEST, "bad_request"),
    (UnknownNode, HTTPStatus.NOT_FOUND, "unknown_node"),
    (NotFound, HTTPStatus.NOT_FOUND, "not_found"),
    (BrokerUnreachable, HTTPStatus.SERVICE_UNAVAILABLE, "broker_unreachable"),
]


class ApiServer:
    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 8470) -> None:
        handler = type("Handler", (_Handler,), {"service": service})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ListenError(f"the API cannot listen on {host}:{port}: "
                                 f"{exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        self.host, self.port = host, int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="api",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    service: Service
    server_version = f"edgerun/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # --- plumbing ----------------------------------------------------------------------
    def _send_json(self, status: HTTPStatus, body: Any) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, status: HTTPStatus, code: str, message: str) -> None:
        self._send_json(status, {"error": message, "code": code})

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise BadRequest(f"request body is {length} bytes; the limit is {MAX_BODY}")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequest("request body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = [unquote(p) for p in parts.path.strip("/").split("/") if p]
        query = parse_qs(parts.query)
        try:
            self._dispatch(method, path, query)
        except SchedulerError as exc:
            for cls, status, code in ERRORS:
                if isinstance(exc, cls):
                    self._fail(status, code, str(exc))
                    return
            log.error("request %s %s failed: %s", method, self.path, exc)
            self._fail(HTTPStatus.INTERNAL_SERVER_ERROR, "internal", str(exc))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception:
            log.exception("request %s %s failed", method, self.path)
            self._fail(HTTPStatus.INTERNAL_SERVER_ERROR, "internal",
                       "internal error; see the service log")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    # --- routes ------------------------------------------------------------------------
    def _dispatch(self, method: str, path: list[str], query: dict[str, list[str]]) -> None:
        svc, ok = self.service, HTTPStatus.OK
        one = {k: v[-1] for k, v in query.items()}
        match method, path:
            case "GET", ["health"]:
                self._send_json(ok, svc.health())
            case "GET", ["metrics"]:
                data = svc.metrics.render()
                self.send_response(ok)
                self.send_header("Content-Type", METRICS_TYPE)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            case "GET", ["nodes"]:
                self._send_json(ok, {"nodes": self._nodes(query)})
            case "GET", ["nodes", node]:
                info = svc.store.node(node)
                if info is None:
                    raise UnknownNode(f"unknown node {node!r}")
                info["tasks"] = svc.store.tasks(node=node, limit=20)
                self._send_json(ok, info)
            case "GET", ["tasks"]:
                self._send_json(ok, {"tasks": svc.store.tasks(
                    node=one.get("node"), state=one.get("state"), job_id=one.get("job"),
                    limit=_int(one.get("limit"), 100))})
            case "GET", ["tasks", task_id]:
                found = [t for t in svc.store.find(task_id)
                         if "node" not in one or t["node"] == one["node"]]
                if not found:
                    raise NotFound(f"no task {task_id!r}")
                for task in found:
                    task["updates"] = svc.store.updates(task["node"], task_id)
                self._send_json(ok, {"tasks": found})
            case "POST", ["tasks"]:
                body = self._body()
                tasks = svc.dispatch(_targets(body), bool(body.get("online")),
                                     body.get("task"))
                self._send_json(HTTPStatus.CREATED, {"tasks": tasks})
            case "POST", ["tasks", task_id, "cancel"]:
                body = self._body()
                self._send_json(ok, {"tasks": svc.cancel(task_id, body.get("node"))})
            case "POST", ["jobs"]:
                body = self._body()
                steps = body.get("steps")
                if not isinstance(steps, list):
                    raise BadRequest("`steps` must be a list of tasks")
                job_id = body.get("id")
                if job_id is not None and not isinstance(job_id, str):
                    raise BadRequest("`id` must be a string")
                job = svc.create_job(_targets(body), bool(body.get("online")), steps, job_id)
                self._send_json(HTTPStatus.CREATED, job)
            case "GET", ["jobs", job_id]:
                found_job = svc.store.job(job_id)
                if found_job is None:
                    raise NotFound(f"no job {job_id!r}")
                self._send_json(ok, found_job)
            case "GET", ["events"]:
                self._stream(query)
            case _:
                raise NotFound(f"no such endpoint: {method} /{'/'.join(path)}")

    def _nodes(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        nodes = self.service.store.nodes()
        patterns = query.get("match", [])
        if patterns:
            chosen = set(self.service.resolve(patterns, bool(query.get("online"))))
            return [n for n in nodes if n["node"] in chosen]
        if query.get("online"):
            nodes = [n for n in nodes if n["state"] == "online"]
        return nodes

    def _stream(self, query: dict[str, list[str]]) -> None:
        kinds = query.get("kind") or [TASK_EVENT, NODE_EVENT, OUTPUT]
        sub = self.service.hub.subscribe(ids=query.get("id", []), nodes=query.get("node", []),
                                         kinds=kinds)
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self._line({"v": 1, "kind": "hello", "server": self.server_version})
            while not sub.overflowed:
                try:
                    event = sub.queue.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    self._line({"v": 1, "kind": "heartbeat"})
                    continue
                if event is None:
                    return
                self._line(event)
            self._line({"v": 1, "kind": "error", "error": "this reader fell too far behind; "
                        "reconnect and read the current state from /tasks"})
        finally:
            self.service.hub.unsubscribe(sub)

    def _line(self, obj: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
        self.wfile.flush()


def _targets(body: dict[str, Any]) -> list[str]:
    targets = body.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise BadRequest("`targets` must be a list of node ids or globs")
    return targets


def _int(text: str | None, default: int) -> int:
    if text is None:
        return default
    try:
        return max(1, int(text))
    except ValueError:
        raise BadRequest(f"not a number: {text!r}") from None

