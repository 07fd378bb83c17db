"""The OpenAPI 3.1 document of /v1, written by hand and served at /v1/openapi.json."""

from __future__ import annotations

from typing import Any

from edgerun.scheduler.api import fleetapi, overview

ERR = {"$ref": "#/components/responses/Error"}
COMMON = {"401": ERR, "403": ERR, "422": ERR}


def _q(name: str, description: str, schema: dict[str, Any] | None = None,
       many: bool = False) -> dict[str, Any]:
    base = schema or {"type": "string"}
    return {"name": name, "in": "query", "description": description, "required": False,
            "schema": {"type": "array", "items": base} if many else base,
            **({"explode": True} if many else {})}


def _p(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string"}}


def _ok(description: str, status: str = "200", ref: str | None = None) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{ref}"} if ref else {"type": "object"}
    return {status: {"description": description,
                     "content": {"application/json": {"schema": schema}}}}


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{ref}"}}}}


LIMIT = _q("limit", "page size (1-1000)", {"type": "integer", "minimum": 1, "maximum": 1000})
CURSOR = _q("cursor", "`next` of the previous page (opaque)")
ID = _p("id", "a task id, or a unique prefix of one (as git does); several matches: 409 "
              "`ambiguous` with `candidates`")

TASK_SPEC = {
    "type": "object", "required": ["type"], "additionalProperties": False,
    "description": "PROTOCOL.md's task without v/kind/sig; unknown keys are refused (422)",
    "properties": {
        "type": {"enum": ["shell", "download"]}, "id": {"type": "string"},
        "timeout": {"type": "number", "exclusiveMinimum": 0},
        "expires_at": {"type": "string", "format": "date-time"},
        "command": {"oneOf": [{"type": "string"},
                              {"type": "array", "items": {"type": "string"}}]},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "cwd": {"type": "string"}, "stdin": {"type": "string"},
        "ok_codes": {"type": "array", "items": {"type": "integer"}},
        "url": {"type": "string"}, "dest": {"type": "string"},
        "sha256": {"type": "string"}, "mode": {"type": "string"},
        "max_bytes": {"type": "integer"},
    },
}


def document(version: str) -> dict[str, Any]:
    read, operate, admin = (["viewer"], ["operator"], ["admin"])
    paths: dict[str, Any] = {
        "/v1/whoami": {"get": {"summary": "the token's name and role", "security": [
            {"bearer": read}], "responses": {**_ok("who"), **COMMON}}},
        "/v1/health": {"get": {"summary": "broker and store status", "responses": {
            **_ok("health"), **COMMON}}},
        "/v1/metrics": {"get": {"summary": "Prometheus text", "responses": {
            "200": {"description": "metrics", "content": {"text/plain": {}}}, **COMMON}}},
        "/v1/nodes": {"get": {"summary": "the registry, by node id, paged", "parameters": [
            _q("online", "only online nodes", {"type": "boolean"}),
            _q("match", "node id or glob", many=True),
            _q("state", "online or offline"), _q("q", "substring of id or facts"),
            _q("fact", "KEY=VALUE of a top-level fact", many=True),
            _q("where", "fact expression, such as cpus>=32 (all must hold)", many=True),
            LIMIT, CURSOR],
            "responses": {**_ok("{nodes, total, next}"), **COMMON}}},
        "/v1/nodes/{node}": {"get": {"summary": "a node and its 20 latest tasks",
                                     "parameters": [_p("node", "id or unique prefix")],
                                     "responses": {**_ok("node"), "404": ERR, **COMMON}},
                             "delete": {"summary": "forget a node (operator): out of the "
                                                   "registry; its tasks stay",
                                        "parameters": [_p("node", "node id")],
                                        "responses": {**_ok("{node, forgotten}"),
                                                      "404": ERR, **COMMON}}},
        "/v1/tasks": {
            "get": {"summary": "tasks, newest first, paged; no output tails", "parameters": [
                _q("node", "node id"), _q("state", "task state"), _q("job", "job id"),
                LIMIT, CURSOR], "responses": {**_ok("{tasks, next}"), **COMMON}},
            "post": {"summary": "dispatch one task to nodes (operator)",
                     "requestBody": _body("Dispatch"),
                     "responses": {**_ok("{tasks}", "201"), "404": ERR, "409": ERR,
                                   "413": ERR, "503": ERR, **COMMON}}},
        "/v1/tasks/{id}": {"get": {"summary": "the task on every node, with updates and "
                                   "output tails", "parameters": [ID, _q("node", "node id")],
                                   "responses": {**_ok("{tasks}"), "404": ERR, "409": ERR,
                                                 **COMMON}}},
        "/v1/tasks/{id}/cancel": {"post": {
            "summary": "cancel (operator); 409 if already finished", "parameters": [ID],
            "requestBody": {"content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"node": {"type": "string"}}}}}},
            "responses": {**_ok("{tasks}"), "404": ERR, "409": ERR, "503": ERR, **COMMON}}},
        "/v1/jobs": {
            "get": {"summary": "jobs, newest first, each with aggregated progress",
                    "parameters": [LIMIT, CURSOR], "responses": {**_ok("{jobs, next}"),
                                                                 **COMMON}},
            "post": {"summary": "create a job (operator)", "requestBody": _body("Job"),
                     "responses": {**_ok("the job", "201"), "404": ERR, "409": ERR,
                                   "413": ERR, "503": ERR, **COMMON}}},
        "/v1/jobs/{id}": {"get": {"summary": "a job with one aggregated progress row",
                                  "parameters": [_p("id", "job id")],
                                  "responses": {**_ok("job"), "404": ERR, **COMMON}}},
        "/v1/jobs/{id}/targets": {"get": {"summary": "per-node, per-step states, paged",
                                          "parameters": [_p("id", "job id"), LIMIT, CURSOR],
                                          "responses": {**_ok("{targets, next}"),
                                                        "404": ERR, **COMMON}}},
        "/v1/jobs/{id}/cancel": {"post": {"summary": "cancel every open task (operator)",
                                          "parameters": [_p("id", "job id")],
                                          "responses": {**_ok("{job, canceled}"), "404": ERR,
                                                        "409": ERR, **COMMON}}},
        "/v1/tokens": {
            "get": {"summary": "tokens (admin); never their values", "security": [
                {"bearer": admin}], "responses": {**_ok("{tokens}"), **COMMON}},
            "post": {"summary": "create a token (admin); its value is shown once",
                     "security": [{"bearer": admin}], "requestBody": _body("NewToken"),
                     "responses": {**_ok("the token", "201"), "409": ERR, **COMMON}}},
        "/v1/tokens/{name}": {"delete": {"summary": "revoke (admin)", "security": [
            {"bearer": admin}], "parameters": [_p("name", "token name")],
            "responses": {**_ok("the revoked token"), "404": ERR, **COMMON}}},
        "/v1/events": {"get": {
            "summary": "Server-Sent Events (docs/EVENTS.md); resume with Last-Event-ID",
            "parameters": [_q("channel", "nodes, tasks, output, audit", many=True),
                           _q("node", "node id", many=True), _q("task", "task id", many=True),
                           _q("access_token", "the token, for EventSource"),
                           _q("last_event_id", "as the Last-Event-ID header")],
            "responses": {"200": {"description": "the stream",
                                  "content": {"text/event-stream": {}}}, **COMMON}}},
        "/v1/ws": {"get": {"summary": "WebSocket: subscribe protocol in docs/EVENTS.md",
                           "responses": {"101": {"description": "switching protocols"},
                                         **COMMON}}},
    }
    paths.update(fleetapi.openapi_paths(_ok, ERR, COMMON, _body))
    paths.update(overview.openapi_paths(_ok, ERR, COMMON))
    for path, item in paths.items():
        for method, op in item.items():
            op.setdefault("security", [{"bearer": operate if method in ("post",) and
                                        not path.startswith("/v1/tokens") else read}])
            op["operationId"] = f"{method}_{path[4:].replace('/', '_').strip('_') or 'root'}"
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgerun scheduler API", "version": version,
                 "description": "Roles: viewer reads, operator dispatches and cancels, "
                                "admin manages tokens. Errors: {error, code, field?}."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "an error", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "code"], "properties": {
                    "error": {"type": "string"}, "code": {"type": "string"},
                    "field": {"type": "string"},
                    "candidates": {"type": "array", "items": {"type": "string"}}}},
                "TaskSpec": TASK_SPEC,
                "Dispatch": {"type": "object", "required": ["task"],
                             "additionalProperties": False, "properties": {
                                 "targets": {"type": "array", "items": {"type": "string"}},
                                 "online": {"type": "boolean"},
                                 "where": fleetapi.WHERE, "retry": fleetapi.RETRY,
                                 "task": {"$ref": "#/components/schemas/TaskSpec"}}},
                "Rollout": fleetapi.ROLLOUT_SCHEMA,
                "Job": {"type": "object", "required": ["steps"], "additionalProperties": False,
                        "properties": {
                            "id": {"type": "string"}, "online": {"type": "boolean"},
                            "targets": {"type": "array", "items": {"type": "string"}},
                            "where": fleetapi.WHERE,
                            "steps": {"type": "array", "minItems": 1, "items": {
                                "$ref": "#/components/schemas/TaskSpec"},
                                "description": "an ordered list; or a graph whose steps "
                                               "also have name, needs, targets, where, "
                                               "online (scheduler/README.md, Jobs)"}}},
                "NewToken": {"type": "object", "required": ["name"],
                             "additionalProperties": False, "properties": {
                                 "name": {"type": "string"},
                                 "role": {"enum": ["viewer", "operator", "admin"]}}},
            },
        },
    }
