"""The HTTP side of rollouts (/v1/rollouts), thin: the work is in rollout.py.

    POST /v1/rollouts               {"targets", "where", "online", "task", "batch", "rate",
                                     "abort_after", "abort_min", "retry"} -> 201 the rollout
    GET  /v1/rollouts[?state=&limit=]
    GET  /v1/rollouts/{id}          the rollout, its counts and every target's state
    POST /v1/rollouts/{id}/pause | /resume | /abort
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgerun.protocol import JSONObject
from edgerun.scheduler.api import edge
from edgerun.scheduler.api.handlers import Handlers
from edgerun.scheduler.fleet.rollout import STATES
from edgerun.scheduler.store.events import without_tails

ROLLOUT_KEYS = ("targets", "where", "online", "task", "batch", "rate", "abort_after",
                "abort_min", "retry")


class RolloutHandlers:
    def __init__(self, h: Handlers) -> None:
        self.h, self.rollouts = h, h.service.rollouts

    def create(self, who: Any, body: JSONObject) -> JSONObject:
        edge.check_keys(body, ROLLOUT_KEYS, "a rollout")
        if "task" not in body:
            raise edge.Invalid("task", "`task` is missing: the task to roll out")
        spec = edge.task_spec(body["task"])
        self.h.check_spec(spec, "task")
        rollout = self.rollouts.create(
            edge.targets(body), edge.flag(body, "online"), spec,
            {k: body[k] for k in ("batch", "rate", "abort_after", "abort_min") if k in body},
            where=body.get("where"), retry=body.get("retry"))
        nodes = [t["node"] for t in rollout["targets"]]
        self.h.audit(who, "rollout", rollout=rollout["id"], tasks=[rollout["task_id"]],
                     nodes=nodes[:1000], count=len(nodes), type=spec["type"])
        tasks = self.rollouts.db.rollout_tasks(rollout["id"])
        return {**rollout, "tasks": [without_tails(t) for t in tasks]}

    def list(self, q: dict[str, list[str]]) -> JSONObject:
        state = edge.one(q, "state")
        if state is not None and state not in STATES:
            raise edge.Invalid("state", f"`state` must be one of {', '.join(STATES)}")
        return {"rollouts": self.rollouts.db.rollouts(state, edge.limit(q, 100))}

    def show(self, rollout_id: str) -> JSONObject:
        return self.rollouts.show(rollout_id)

    def action(self, name: str) -> Callable[..., JSONObject]:
        def act(who: Any, rollout_id: str, body: JSONObject) -> JSONObject:
            edge.check_keys(body, (), f"a rollout {name} request")
            result: JSONObject = getattr(self.rollouts, name)(rollout_id)
            self.h.audit(who, f"rollout_{name}", rollout=rollout_id, tasks=[])
            return result
        return act


def rollout_routes(h: Handlers, endpoint: Callable[..., Any]) -> dict[str, dict[str, Any]]:
    """The /v1/rollouts routes, in the API's route table shape."""
    r = RolloutHandlers(h)
    routes: dict[str, dict[str, Any]] = {
        "/v1/rollouts": {
            "GET": endpoint("viewer", "reading", r.list, query=("state", "limit")),
            "POST": endpoint("operator", "dispatching", r.create, status=201, body=True,
                             with_who=True)},
        "/v1/rollouts/{id}": {"GET": endpoint("viewer", "reading", r.show)},
    }
    for name in ("pause", "resume", "abort"):
        routes[f"/v1/rollouts/{{id}}/{name}"] = {
            "POST": endpoint("operator", "dispatching", r.action(name), body=True,
                             with_who=True)}
    return routes


# --- the OpenAPI document's part (openapi.py merges it) -------------------------------------
WHERE = {"type": "array", "items": {"type": "string"},
         "description": "fact expressions that must all hold: arch=x86_64, "
                        "'dmi.sys_vendor=Dell*', 'cpus>=32', 'macs=52:54:00:*'"}
RETRY = {"type": "object", "additionalProperties": False, "required": ["retries"],
         "properties": {"retries": {"type": "integer", "minimum": 0, "maximum": 20},
                        "on": {"type": "array", "items": {
                            "enum": ["failed", "timed_out", "lost", "busy"]}},
                        "delay": {"type": "number", "minimum": 0, "maximum": 600}}}
GRAPH_STEP_KEYS = {"name": {"type": "string"},
                   "needs": {"type": "array", "items": {"type": "string"}},
                   "targets": {"type": "array", "items": {"type": "string"}},
                   "where": WHERE, "online": {"type": "boolean"}}


def openapi_paths(ok: Callable[..., Any], err: Any, common: dict[str, Any],
                  body: Callable[[str], Any]) -> dict[str, Any]:
    one = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "rollout id"}
    paths: dict[str, Any] = {
        "/v1/rollouts": {
            "get": {"summary": "rollouts, newest first", "parameters": [
                {"name": "state", "in": "query", "schema": {"enum": list(STATES)}},
                {"name": "limit", "in": "query", "schema": {"type": "integer"}}],
                "responses": {**ok("{rollouts}"), **common}},
            "post": {"summary": "roll a task out in a sliding window and/or at a rate, with "
                                "an abort rule (operator)", "requestBody": body("Rollout"),
                     "responses": {**ok("the rollout with its tasks", "201"), "404": err,
                                   "409": err, "503": err, **common}}},
        "/v1/rollouts/{id}": {"get": {
            "summary": "state, abort reason, counts and every target's phase",
            "parameters": [one], "responses": {**ok("rollout"), "404": err, **common}}},
    }
    for action in ("pause", "resume", "abort"):
        paths[f"/v1/rollouts/{{id}}/{action}"] = {"post": {
            "summary": f"{action} the rollout (operator); 409 when its state does not allow "
                       f"it", "parameters": [one],
            "responses": {**ok("rollout"), "404": err, "409": err, **common}}}
    return paths


ROLLOUT_SCHEMA = {
    "type": "object", "required": ["task"], "additionalProperties": False,
    "properties": {"targets": {"type": "array", "items": {"type": "string"}},
                   "where": WHERE, "online": {"type": "boolean"},
                   "task": {"$ref": "#/components/schemas/TaskSpec"},
                   "batch": {"type": "integer", "minimum": 1},
                   "rate": {"type": "string", "description": "N/min, N/s or N/h"},
                   "abort_after": {"type": "string", "description": "N failures or P%"},
                   "abort_min": {"type": "integer", "minimum": 1}, "retry": RETRY}}
