"""The API's own routes under /v1, each with what the OpenAPI document says of it: its
summary, query parameters, body schema and the statuses its work may answer. The
schemas say exactly what the edge (edge.py) and the contract's parser accept, so a
request valid by the document is not refused for its shape, and one it calls invalid
is refused (both are checked by schemathesis, tests/test_api_openapi.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgerun import __version__
from edgerun.protocol import JSONObject
from edgerun.scheduler.api import edge
from edgerun.scheduler.api.auth import Principal
from edgerun.scheduler.api.batch import MAX_ITEMS, Batches, batch_schema
from edgerun.scheduler.api.handlers import FACT_FILTER, Handlers
from edgerun.scheduler.api.routes import JSONSchema, Param
from edgerun.scheduler.fleet.targets import MAX_EXPRESSION_LEN, MAX_EXPRESSIONS

# --- schemas --------------------------------------------------------------------------------
def nullable(schema: JSONSchema) -> JSONSchema:
    """A field that may also be null, which reads as leaving it out."""
    return {"anyOf": [schema, {"type": "null"}]}


def optional_null(schema: JSONSchema) -> JSONSchema:
    """An object schema whose optional properties may be null (the contract's parser reads
    null as absent)."""
    required = set(schema.get("required", ()))
    return {**schema, "properties": {k: v if k in required else nullable(v)
                                     for k, v in schema["properties"].items()}}



TEXT = "^[^\\u0000]*$"  # no NUL (the edge refuses it)
# a query value: also no U+FFFD, which is what bytes that are not UTF-8 decode to (422)
QUERY_TEXT: JSONSchema = {"type": "string", "maxLength": 4096,
                          "pattern": "^[^\\u0000\\ufffd]*$"}
# an id a request gives: empty (or left out) means the service makes one
TASK_ID: JSONSchema = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{0,128}$"}
WHOLE = 2**63 - 1  # the largest integer the edge takes (edge.MAX_INT)
TARGET: JSONSchema = {
    "type": "string", "maxLength": 128, "description": "a node id, a glob or a MAC address",
    "pattern": "^[A-Za-z0-9_:-]{1,128}$|^[^\\u0000]*[*?\\[][^\\u0000]*$"
               "|^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$"}
FACT_PATH = "[A-Za-z0-9_][A-Za-z0-9_-]*(\\.[A-Za-z0-9_-]+)*"
WHERE: JSONSchema = {
    "type": "array", "maxItems": 32, "items": {"type": "string", "maxLength": 512, "pattern":
        f"^{FACT_PATH}(=|!=)[A-Za-z0-9_:*.,/+-]+$|^{FACT_PATH}(>=|<=|>|<)-?[0-9]{{1,9}}$"},
    "description": "fact expressions that must all hold: arch=x86_64, "
                   "dmi.sys_vendor=Dell*, cpus>=32, macs=52:54:00:*"}
ABS_PATH = "^(/[A-Za-z0-9_-][A-Za-z0-9._-]*)+$"  # absolute, normalised, naming a file
COMMON_TASK: dict[str, JSONSchema] = {
    "id": TASK_ID,
    "timeout": {"type": "number", "exclusiveMinimum": 0},
    "expires_at": {"type": "string", "pattern": "^2[0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
                                                "T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]Z$",
                   "description": "RFC 3339 UTC time"},
}
SHELL_TASK: JSONSchema = {
    "type": "object", "required": ["type", "command"], "additionalProperties": False,
    "properties": {
        **COMMON_TASK, "type": {"const": "shell"},
        "command": {"oneOf": [
            {"type": "string", "pattern": "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$",
             "description": "run as /bin/sh -c COMMAND"},
            {"type": "array", "minItems": 1, "prefixItems": [
                {"type": "string", "minLength": 1, "pattern": "^[^\\u0000]+$"}],
             "items": {"type": "string", "pattern": TEXT},
             "description": "argv, run without a shell"}]},
        "env": {"type": "object", "propertyNames": {"pattern": "^[^=\\u0000]+$"},
                "additionalProperties": {"type": "string", "pattern": TEXT}},
        "cwd": {"type": "string", "pattern": "^/$|" + ABS_PATH},
        "stdin": {"type": "string"},
        "ok_codes": {"type": "array", "minItems": 1,
                     "items": {"type": "integer", "minimum": -255, "maximum": 255}}}}
DOWNLOAD_TASK: JSONSchema = {
    "type": "object", "required": ["type", "url", "dest"], "additionalProperties": False,
    "properties": {
        **COMMON_TASK, "type": {"const": "download"},
        "url": {"type": "string", "pattern": "^https?://[A-Za-z0-9.-]+(:[0-9]{1,4})?"
                                             "(/[A-Za-z0-9._~/-]*)?$"},
        "dest": {"type": "string", "pattern": ABS_PATH},
        "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
        "mode": {"type": "string", "pattern": "^0?[0-7]{3,4}$"},
        "max_bytes": {"type": "integer", "minimum": 1, "maximum": WHOLE}}}
TASK: JSONSchema = {"oneOf": [optional_null(SHELL_TASK), optional_null(DOWNLOAD_TASK)],
                    "description": "PROTOCOL.md's task without v/kind/sig; unknown keys are "
                                   "refused (422)"}
RETRY: JSONSchema = {
    "type": "object", "additionalProperties": False, "required": ["retries"],
    "properties": {"retries": {"type": "integer", "minimum": 0, "maximum": 20},
                   "on": {"type": "array", "minItems": 1, "items": {
                       "enum": ["failed", "timed_out", "lost", "busy"]}},
                   "delay": {"type": "number", "minimum": 0, "maximum": 600}}}
# a request names its targets: node ids or globs, or --online, or --where (one at least)
CHOOSE: list[JSONSchema] = [
    {"required": ["targets"], "properties": {"targets": {"type": "array", "minItems": 1}}},
    {"required": ["online"], "properties": {"online": {"const": True}}},
    {"required": ["where"], "properties": {"where": {"type": "array", "minItems": 1}}}]
TARGETS: dict[str, JSONSchema] = {
    "targets": {"type": "array", "items": TARGET, "maxItems": 1000},
    "online": {"type": "boolean"}, "where": nullable(WHERE)}
DISPATCH: JSONSchema = {"type": "object", "required": ["task"], "additionalProperties": False,
                        "anyOf": CHOOSE, "properties": {**TARGETS, "retry": nullable(RETRY),
                                                        "task": TASK}}
BATCH: JSONSchema = batch_schema(DISPATCH)
JOB: JSONSchema = {
    "type": "object", "required": ["steps"], "additionalProperties": False, "anyOf": CHOOSE,
    "properties": {**TARGETS, "id": nullable(TASK_ID),
                   "steps": {"type": "array", "minItems": 1, "maxItems": 100, "items": TASK,
                             "description": "an ordered list; a graph's steps also have "
                                            "name, needs, targets, where, online "
                                            "(scheduler/README.md, Jobs)"}}}
CANCEL: JSONSchema = {"type": "object", "additionalProperties": False,
                      "properties": {"node": nullable({"type": "string", "pattern": TEXT})}}
NOTHING: JSONSchema = {"type": "object", "additionalProperties": False, "properties": {}}
NEW_TOKEN: JSONSchema = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "pattern": "^[!-~][ -~]{0,63}$"},
                   "role": {"enum": ["viewer", "operator", "admin"]}}}

LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "page size")
NUMBER_CURSOR = Param("cursor", {"type": "string", "pattern": "^[0-9]{0,18}$"},
                      "`next` of the previous page")
TEXT_CURSOR = Param("cursor", QUERY_TEXT,
                    "`next` of the previous page")
BOOL = {"enum": ["true", "false", "1", "0", "yes", "no"]}
NODE_QUERY = (
    Param("online", BOOL, "online nodes only"),
    Param("match", {**TARGET, "not": {"pattern": "\\ufffd"}}, "node id, glob or MAC address",
          many=True),
    Param("where", WHERE["items"], "fact expression (all must hold)", many=True),
    Param("state", {"enum": ["online", "offline"]}, "online or offline"),
    Param("q", QUERY_TEXT,
          "substring of the id or facts"),
    Param("fact", {"type": "string", "maxLength": MAX_EXPRESSION_LEN,
                   "pattern": FACT_FILTER.pattern},
          "a fact expression, as `--where` takes (all must hold): labels.rack=r1, "
          "custom.asset=AT-*, dmi.sys_vendor=Dell*, cpus>=32, macs=52:54:00:*. "
          "= and != compare a case-insensitive glob, the others numbers; a dotted path "
          "reaches into nested facts (not through a list); a list or map matches if any "
          "element does; a missing fact never matches = < > and always matches !=",
          many=True, max_items=MAX_EXPRESSIONS),
    LIMIT, TEXT_CURSOR)
TASK_QUERY = (
    Param("node", QUERY_TEXT, "node id"),
    Param("state", {"enum": sorted(edge.STATES)}, "task state"),
    Param("job", QUERY_TEXT, "job id"),
    LIMIT, NUMBER_CURSOR)
NODE_PARAM = {"node": "node id or unique prefix"}
TASK_PARAM = {"id": "a task id or a unique prefix of one (as git does); several: 409 "
                    "`ambiguous` with `candidates`"}
JOB_PARAM = {"id": "job id"}


def core_routes(h: Handlers, endpoint: Callable[..., Any], metrics: Callable[[], Any]
                ) -> dict[str, dict[str, Any]]:
    """The /v1 routes of tasks, jobs, nodes and tokens, in the route table's shape."""
    service = h.service

    def whoami(who: Principal) -> JSONObject:
        return {"name": who.name, "role": who.role, "version": __version__}

    read = ("viewer", "reading")
    batches = Batches(h)
    return {
        "/v1/whoami": {"GET": endpoint(*read, whoami, with_who=True,
                                       summary="the token's name and role, the version")},
        "/v1/health": {"GET": endpoint(*read, service.health,
                                       summary="broker connection and store")},
        "/v1/metrics": {"GET": endpoint(*read, metrics, content="text/plain",
                                        summary="Prometheus metrics (also /metrics)")},
        "/v1/nodes": {"GET": endpoint(*read, h.nodes, query=NODE_QUERY, errors=(404,),
                                      summary="nodes with state and facts, paged")},
        "/v1/nodes/{node}": {
            "GET": endpoint(*read, h.node, path_params=NODE_PARAM, errors=(409,),
                            summary="a node and its 20 latest tasks"),
            "DELETE": endpoint("operator", "forgetting nodes", h.forget_node, with_who=True,
                               path_params=NODE_PARAM,
                               summary="forget a node (operator): out of the registry; "
                                       "its tasks stay")},
        "/v1/tasks": {
            "GET": endpoint(*read, h.tasks, query=TASK_QUERY,
                            summary="tasks, newest first, paged; no output tails"),
            "POST": endpoint("operator", "dispatching", h.dispatch, status=201, body=DISPATCH,
                             with_who=True, errors=(404, 503), carries="{tasks}",
                             summary="dispatch one task to nodes (operator)")},
        "/v1/task-batches": {"POST": endpoint(
            "operator", "dispatching", batches.dispatch, status=201, body=BATCH,
            with_who=True, errors=(404, 503), carries="{tasks}: every task made, in item order, "
                                                       "each with its `item`",
            summary=f"dispatch 1 to {MAX_ITEMS} distinct tasks, each item a POST /v1/tasks "
                    f"body, all or nothing in one transaction (operator)")},
        "/v1/tasks/{id}": {"GET": endpoint(
            *read, h.task, query=(Param("node", QUERY_TEXT, "node id"),),
            path_params=TASK_PARAM,
            errors=(409,), summary="the task on every node, with updates and output tails")},
        "/v1/tasks/{id}/cancel": {"POST": endpoint(
            "operator", "cancelling", h.cancel, body=CANCEL, with_who=True,
            path_params=TASK_PARAM, errors=(503,),
            summary="cancel (operator); 409 if already finished")},
        "/v1/jobs": {
            "GET": endpoint(*read, h.jobs, query=(LIMIT, TEXT_CURSOR),
                            summary="jobs, newest first, each with aggregated progress"),
            "POST": endpoint("operator", "dispatching", h.create_job, status=201, body=JOB,
                             with_who=True, errors=(404, 503), carries="the job",
                             summary="create a job (operator)")},
        "/v1/jobs/{id}": {"GET": endpoint(*read, h.job, path_params=JOB_PARAM,
                                          summary="a job with one aggregated progress row")},
        "/v1/jobs/{id}/targets": {"GET": endpoint(
            *read, h.job_targets, query=(LIMIT, TEXT_CURSOR), path_params=JOB_PARAM,
            summary="per-node, per-step states, paged")},
        "/v1/jobs/{id}/cancel": {"POST": endpoint(
            "operator", "cancelling", h.cancel_job, body=NOTHING, with_who=True,
            path_params=JOB_PARAM, errors=(503,),
            summary="cancel every open task of a job (operator)")},
        "/v1/tokens": {
            "GET": endpoint("admin", "managing tokens", lambda: {"tokens": h.store.tokens()},
                            summary="tokens (admin); never their values"),
            # never replayed: the answer holds the token, which the store must not keep
            "POST": endpoint("admin", "managing tokens", h.create_token, status=201,
                             body=NEW_TOKEN, with_who=True, carries="the token, shown once",
                             idempotent=False,
                             summary="create a token (admin); an Idempotency-Key is "
                                     "ignored: a retry gets 409 for the name")},
        "/v1/tokens/{name}": {"DELETE": endpoint(
            "admin", "managing tokens", h.revoke_token, with_who=True,
            path_params={"name": "token name"},
            summary="revoke a token (admin); its open streams close")},
        "/v1/stream-tickets": {"POST": endpoint(
            "viewer", "reading events", lambda who: h.tickets.issue(who), status=201,
            with_who=True, carries="{ticket, expires_in}",
            summary="a single-use ticket that opens one event stream within 30 s "
                    "(?ticket=), so no token goes in a URL")},
    }
