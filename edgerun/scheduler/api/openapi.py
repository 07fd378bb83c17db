"""The OpenAPI 3.1 document of the API, built from the one route table the app serves
(routes.Op of each handler) and served at /v1/openapi.json. Nothing here is written by
hand but the frame: a route's summary, parameters, body schema and statuses live
beside the route (table.py, fleetapi.py, overview.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgerun.scheduler.api.routes import PATH_PARAM, Op, op_of

ERROR = {"$ref": "#/components/responses/Error"}
MALFORMED = {"description": "bad JSON, or a request the HTTP server cannot read (too long)",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}},
                         "text/plain": {"schema": {"type": "string"}}}}
SUCCESS_SCHEMA: dict[str, Any] = {"type": "object"}
SPECIAL = {101: "switching protocols: the WebSocket (docs/EVENTS.md)",
           426: "a WebSocket endpoint asked for without an upgrade"}


def _responses(op: Op, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status in op.statuses(path):
        if status == op.status:
            schema = SUCCESS_SCHEMA if op.content == "application/json" else {"type": "string"}
            out[str(status)] = {"description": op.carries,
                                "content": {op.content: {"schema": schema}}}
        elif status == 400:
            out["400"] = MALFORMED
        elif status == 101:
            out["101"] = {"description": SPECIAL[101]}
        else:
            out[str(status)] = ERROR
    # the HTTP server's own answer to a request line or head it cannot read (too long)
    out.setdefault("400", MALFORMED)
    return dict(sorted(out.items()))


def _parameters(op: Op, path: str) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True,
         "description": op.path_params.get(name, name),
         "schema": {"type": "string", "minLength": 1, "maxLength": 256,
                    "pattern": "^[^/\\u0000]+$"}}
        for name in PATH_PARAM.findall(path)]
    for p in op.query:
        schema = ({"type": "array", "items": p.schema,
                   **({"maxItems": p.max_items} if p.max_items is not None else {})}
                  if p.many else p.schema)
        params.append({"name": p.name, "in": "query", "required": False,
                       "description": p.description, "schema": schema,
                       **({"style": "form", "explode": True} if p.many else {})})
    return params


def operation(method: str, path: str, op: Op) -> dict[str, Any]:
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{method.lower()}_{path.strip('/').replace('/', '_') or 'root'}"
                       .replace("{", "").replace("}", ""),
        "security": [] if op.role is None else [{"bearer": []}],
        "responses": _responses(op, path)}
    if op.role is not None:
        out["description"] = f"needs a token with role {op.role} or above"
    params = _parameters(op, path)
    if params:
        out["parameters"] = params
    if op.body is not None:
        # an empty body reads as {}: required only where {} is not enough
        out["requestBody"] = {"required": bool(op.body.get("required")), "content": {
            "application/json": {"schema": op.body}}}
    return out


def document(version: str, table: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The document of every described operation in `table` ({path: {METHOD: handler}})."""
    paths: dict[str, Any] = {}
    for path, methods in table.items():
        item = {method.lower(): operation(method, path, op)
                for method, handler in methods.items() if (op := op_of(handler)) is not None}
        if item:
            paths[path] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgerun scheduler API", "version": version,
                 "description": "Roles: viewer reads, operator dispatches and cancels, admin "
                                "manages tokens. Errors: {error, code, field?}. Every POST "
                                "takes an Idempotency-Key header: a retry with the same key "
                                "and body gets the first answer (not POST /v1/tokens, whose "
                                "answer holds a secret). Live events: GET /v1/events "
                                "(Server-Sent Events) and the WebSocket /v1/ws (docs/EVENTS.md"
                                "; the token in the Authorization header, a ticket from POST "
                                "/v1/stream-tickets as ?ticket=, or the subprotocols edgerun "
                                "and bearer.<token>)."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "an error", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {"Error": {
                "type": "object", "required": ["error", "code"], "properties": {
                    "error": {"type": "string"}, "code": {"type": "string"},
                    "field": {"type": "string"}, "key": {"type": "string"},
                    "candidates": {"type": "array", "items": {"type": "string"}}}}},
        },
    }
