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
from edgerun.scheduler.api.routes import JSONSchema, Param
from edgerun.scheduler.api.table import (
    CHOOSE,
    LIMIT,
    NOTHING,
    RETRY,
    TARGETS,
    TASK,
    WHOLE,
    nullable,
)
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
        for key in ("batch", "rate"):
            if key in body and body[key] is None:
                raise edge.Invalid(key, f"`{key}` must not be null: give it or leave it out")
        spec = edge.task_spec(body["task"])
        self.h.check_spec(spec, "task")
        self.h.hold_for_broker()
        rollout = self.rollouts.create(
            edge.targets(body), edge.flag(body, "online"), spec,
            {k: body[k] for k in ("batch", "rate", "abort_after", "abort_min") if k in body},
            where=body.get("where"), retry=body.get("retry"))
        nodes = [t["node"] for t in rollout["targets"]]
        self.h.audit(who, "rollout", rollout=rollout["id"], tasks=[rollout["task_id"]],
                     nodes=nodes[:1000], count=len(nodes), type=spec["type"])
        tasks = self.rollouts.db.rollout_tasks(rollout["id"])
        return {**rollout, "tasks": [without_tails(t.to_json()) for t in tasks]}

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


ROLLOUT: JSONSchema = {
    "type": "object", "required": ["task"], "additionalProperties": False,
    # targets chosen one way at least (CHOOSE), and a pace: batch, rate or both
    "anyOf": [{**choice, "required": [*choice["required"], pace]}
              for choice in CHOOSE for pace in ("batch", "rate")],
    "properties": {
        **TARGETS, "task": TASK, "retry": nullable(RETRY),
        "batch": {"type": "integer", "minimum": 1, "maximum": WHOLE,
                  "description": "at most this many targets in progress at once"},
        "rate": {"type": "string", "pattern": "^[1-9][0-9]{0,3}/(s|sec|m|min|h|hour)$",
                 "description": "targets started per minute (N/min, N/s, N/h)"},
        "abort_after": {"oneOf": [
            {"type": "integer", "minimum": 1, "maximum": WHOLE},
            {"type": "string", "pattern": "^[1-9][0-9]{0,5}$|^([1-9][0-9]?|100)%$"},
            {"type": "null"}],
            "description": "abort after N failures, or P% of the finished targets"},
        "abort_min": {"type": "integer", "minimum": 1, "maximum": WHOLE,
                      "description": "finished targets before a percentage applies"}}}
ROLLOUT_ID = {"id": "rollout id"}


def rollout_routes(h: Handlers, endpoint: Callable[..., Any]) -> dict[str, dict[str, Any]]:
    """The /v1/rollouts routes, in the API's route table shape."""
    r = RolloutHandlers(h)
    routes: dict[str, dict[str, Any]] = {
        "/v1/rollouts": {
            "GET": endpoint("viewer", "reading", r.list, query=(
                Param("state", {"enum": list(STATES)}, "rollout state"), LIMIT),
                summary="rollouts, newest first"),
            "POST": endpoint("operator", "dispatching", r.create, status=201, body=ROLLOUT,
                             with_who=True, errors=(404, 503), carries="the rollout with its "
                             "tasks", summary="roll a task out in a sliding window and/or at a "
                                              "rate, with an abort rule (operator)")},
        "/v1/rollouts/{id}": {"GET": endpoint(
            "viewer", "reading", r.show, path_params=ROLLOUT_ID,
            summary="state, abort reason, counts and every target's phase")},
    }
    for name in ("pause", "resume", "abort"):
        routes[f"/v1/rollouts/{{id}}/{name}"] = {
            "POST": endpoint("operator", "dispatching", r.action(name), body=NOTHING,
                             with_who=True, path_params=ROLLOUT_ID,
                             summary=f"{name} the rollout (operator); 409 when its state does "
                                     f"not allow it")}
    return routes
