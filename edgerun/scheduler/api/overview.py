"""Read-only aggregates for the console's overview and job views, counted by the database.

    GET /v1/overview              nodes online / offline / recently lost; tasks running,
                                  queued, failed in the last hour; the latest failures
    GET /v1/overview/series       task outcomes per minute (last 60 min) and nodes online
                                  every 15 min over 24 h, for the charts
    GET /v1/jobs/{id}/tasks       a job's tasks filtered by state, failures first, with the
                                  job's creator, start and end (`?state=&limit=&cursor=`)

The SQL is the store's named queries (`overview_*`, `job_*` in store/sql/, one file per
back end), run through its public `db.read()`; nothing here writes. Nodes online over
time are rebuilt from the durable event log (node transitions), walking back from
today's count: as far back as the log keeps (its retention) and flat before that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from edgerun.control.errors import NotFound
from edgerun.protocol import JSONObject, format_time
from edgerun.scheduler.api import edge
from edgerun.scheduler.api.handlers import Handlers
from edgerun.scheduler.api.routes import Param
from edgerun.scheduler.api.table import LIMIT
from edgerun.scheduler.fleet.jobs import progress_of
from edgerun.scheduler.store.records import FINAL
from edgerun.scheduler.store.tasks import Store

FAILED = ("failed", "timed_out", "lost", "rejected")
BAD = (*FAILED, "canceled")
ACTIVE = ("dispatched", "accepted", "running")
LOST_WINDOW = timedelta(hours=1)
OUTCOME_MINUTES = 60
ONLINE_STEP = timedelta(minutes=15)
ONLINE_SPAN = timedelta(hours=24)
FAILURES_SHOWN = 10


def _at(moment: datetime) -> str:
    return format_time(moment)


class Overview:
    """The aggregates, each one short read of the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def summary(self, now: datetime | None = None) -> JSONObject:
        now = now or datetime.now(UTC)
        hour_ago = _at(now - LOST_WINDOW)
        with self.store.db.read() as db:
            states = {r["state"]: int(r["n"]) for r in db.all(
                "count_tasks_in_states", (["queued", *ACTIVE],))}
            failed = int(db.one("overview_failed_since", (hour_ago, list(FAILED)))["n"])
            failures = [_failure(r) for r in db.all(
                "overview_latest_failures", {"states": list(FAILED),
                                             "limit": FAILURES_SHOWN})]
            nodes = {r["state"]: int(r["n"]) for r in db.all("count_nodes_by_state")}
            lost = db.all("overview_recently_lost", (hour_ago,))
        online = nodes.get("online", 0)
        total = sum(n for state, n in nodes.items() if state != "__new__")
        return {
            "at": _at(now),
            "nodes": {"total": total, "online": online, "offline": total - online,
                      "recently_lost": len(lost),
                      "lost": [{"node": n["node"], "at": n["changed_at"]} for n in lost[:10]]},
            "tasks": {"running": sum(states.get(s, 0) for s in ACTIVE),
                      "queued": states.get("queued", 0), "failed_last_hour": failed},
            "failures": failures,
        }

    def series(self, now: datetime | None = None) -> JSONObject:
        now = now or datetime.now(UTC)
        first = now.replace(second=0, microsecond=0) - timedelta(minutes=OUTCOME_MINUTES - 1)
        minutes = [_at(first + timedelta(minutes=i))[:16] for i in range(OUTCOME_MINUTES)]
        by_minute: dict[str, dict[str, int]] = {m: {} for m in minutes}
        start = now - ONLINE_SPAN
        with self.store.db.read() as db:
            for r in db.all("overview_outcomes", (_at(first), list(FINAL))):
                if r["minute"] in by_minute:
                    by_minute[r["minute"]][r["state"]] = int(r["n"])
            online_now = sum(int(r["n"]) for r in db.all("count_nodes_by_state")
                             if r["state"] == "online")
            moves = [(r["at"], *move) for r in db.all("overview_node_events", (_at(start),))
                     if (move := _transition(r["body"])) is not None]
        outcomes = [{"minute": m + ":00.000Z", "succeeded": c.get("succeeded", 0),
                     "failed": sum(c.get(s, 0) for s in FAILED),
                     "canceled": c.get("canceled", 0)} for m, c in by_minute.items()]
        return {"at": _at(now), "outcomes": outcomes,
                "online": _online_over(online_now, moves, now, start)}


# the head of a node event's JSON: "previous" then "state", before the node's facts
_MOVE = re.compile(r'"previous":\s*(?:null|"([a-z_]+)"),\s*"state":\s*"([a-z_]+)"')


def _transition(body: str) -> tuple[str | None, str | None] | None:
    """(previous, state) of a logged node event that changed the node's state, else None.
    Read from the head of its JSON (a node's facts can be kilobytes); parsed in full only
    when the head is not as expected."""
    found = _MOVE.search(body, 0, 400)
    if found is not None:
        was, became = found.group(1), found.group(2)
    else:
        event = json.loads(body)
        was, became = event.get("previous"), event.get("state")
    return (was, became) if was != became else None


def _online_over(online_now: int, moves: list[tuple[str, str | None, str | None]],
                 now: datetime, start: datetime) -> list[JSONObject]:
    """Nodes online at each 15-minute mark from `start` to `now`: today's count, undone
    transition by transition going back (`moves` newest first)."""
    points: list[JSONObject] = []
    count, i = online_now, 0
    mark = now
    while mark >= start:
        text = _at(mark)
        while i < len(moves) and moves[i][0] > text:
            _, was, became = moves[i]
            count += (was == "online") - (became == "online")
            i += 1
        points.append({"at": text, "online": max(count, 0)})
        mark -= ONLINE_STEP
    points.reverse()
    return points


def _audit_pattern(job_id: str) -> str:
    """LIKE pattern of the audit event that created the job: its id literal (`_` and `%`
    escaped, they are LIKE's wildcards)."""
    literal = json.dumps(job_id).replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return f'%"action": "job"%"job": {literal}%'


def _failure(r: Any) -> JSONObject:
    return {"node": r["node"], "id": r["id"], "type": r["type"], "state": r["state"],
            "exit_code": r["exit_code"], "updated_at": r["updated_at"], "job": r["job_id"],
            "error": {"code": r["error_code"], "message": r["error_message"]}
            if r["error_code"] else None}


class JobTasks:
    """A job's tasks for the console's job view: filtered by state, failures first."""

    def __init__(self, h: Handlers) -> None:
        self.h, self.store = h, h.store

    def about(self, job: JSONObject) -> JSONObject:
        """The job's creator (recorded with the job since schema 6; before, from the audit
        log while it keeps it), start and end."""
        with self.store.db.read() as db:
            times = db.one("job_times", (list(FINAL), job["id"]))
            creator = db.one("job_created_by", (job["id"],))["created_by"]
            row = None if creator else db.one("job_creator_from_audit",
                                              (_audit_pattern(job["id"]),))
        if row is not None:
            creator = json.loads(row["body"]).get("by")
        open_tasks = int(times["open"] or 0)
        return {"id": job["id"], "name": job["id"], "creator": creator,
                "created_at": job["created_at"], "started_at": times["started"],
                "ended_at": times["ended"] if times["ended"] and not open_tasks else None,
                "graph": any(isinstance(s, dict) and s.get("name") for s in job["steps"])}

    def tasks(self, job_id: str, q: dict[str, list[str]]) -> JSONObject:
        with self.store.db.read() as db:  # the job's row only, not its 1,000 tasks
            row = db.one("job_row", (job_id,))
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        job = {"id": row["id"], "created_at": row["created_at"],
               "nodes": json.loads(row["nodes"]), "steps": json.loads(row["steps"])}
        state = edge.one(q, "state")
        wanted: tuple[str, ...] = ()
        if state == "bad":
            wanted = BAD
        elif state == "active":
            wanted = ("queued", *ACTIVE)
        elif state:
            wanted = (edge.state(q) or state,)
        size = edge.limit(q, 100)
        offset = edge.cursor_int(q) or 0
        with self.store.db.read() as db:
            counts = {r["state"]: int(r["n"]) for r in db.all("job_state_counts", (job_id,))}
            rows = db.all("job_tasks_page", {"job": job_id, "states": list(wanted) or None,
                                             "bad": list(BAD), "active": list(ACTIVE),
                                             "limit": size + 1, "offset": offset})
        total = sum(n for s, n in counts.items() if not wanted or s in wanted)
        page = [{"node": r["node"], "id": r["id"], "step": r["step"], "state": r["state"],
                 "exit_code": r["exit_code"], "updated_at": r["updated_at"],
                 "error": {"code": r["error_code"], "message": r["error_message"]}
                 if r["error_code"] else None} for r in rows[:size]]
        counts_by_step = self.store.job_progress(job_id)
        return {"job": {**self.about(job), "steps": job["steps"],
                        "nodes": len(job["nodes"]),
                        "progress": progress_of(counts_by_step, len(job["steps"]),
                                                len(job["nodes"]))},
                "counts": counts, "total": total, "tasks": page,
                "next": str(offset + size) if len(rows) > size else None}


def overview_routes(h: Handlers, endpoint: Callable[..., Any]) -> dict[str, dict[str, Any]]:
    """The overview's and job view's read routes, in the API's route table shape, each
    with what the OpenAPI document says of it."""
    overview, jobs = Overview(h.store), JobTasks(h)
    states = ["bad", "active", "queued", "dispatched", "accepted", "running", "succeeded",
              "failed", "timed_out", "canceled", "rejected", "lost"]
    return {
        "/v1/overview": {"GET": endpoint(
            "viewer", "reading", lambda: overview.summary(),
            carries="{at, nodes, tasks, failures}",
            summary="nodes online/offline/lost in the last hour; tasks running, queued and "
                    "failed in the last hour; the latest failures")},
        "/v1/overview/series": {"GET": endpoint(
            "viewer", "reading", lambda: overview.series(), carries="{at, outcomes, online}",
            summary="task outcomes per minute over 60 min; nodes online every 15 min over "
                    "24 h (from the event log, as far back as it keeps)")},
        "/v1/jobs/{id}/tasks": {"GET": endpoint(
            "viewer", "reading", jobs.tasks, path_params={"id": "job id"},
            query=(Param("state", {"enum": states}, "a state, bad or active"), LIMIT,
                   Param("cursor", {"type": "string", "pattern": "^[0-9]{0,18}$"},
                         "`next` of the previous page")),
            carries="{job, counts, total, tasks, next}",
            summary="a job's tasks, failures first, by state (bad: failed, lost, canceled "
                    "...; active: queued or running), with creator, start and end")},
    }
