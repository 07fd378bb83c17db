"""The API's work, one method per route, synchronous (run in the thread pool), and the
one place where errors become answers (`classify`). server.py maps routes to them."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgerun.control.errors import (
    BadRequest,
    BrokerUnreachable,
    Conflict,
    Forbidden,
    NotFound,
    SchedulerError,
    Unauthorized,
    UnknownNode,
)
from edgerun.protocol import JSONObject, encode, is_node_id
from edgerun.scheduler.api import edge
from edgerun.scheduler.api.auth import Principal, authenticate, create_token
from edgerun.scheduler.api.tickets import Tickets
from edgerun.scheduler.fleet.jobs import progress_of
from edgerun.scheduler.fleet.targets import MAX_EXPRESSIONS, Known, Where, parse_where
from edgerun.scheduler.service import Service
from edgerun.scheduler.store.events import audit_event, without_tails
from edgerun.scheduler.store.records import TaskRow

log = logging.getLogger(__name__)
TOUCH_EVERY_S = 60.0
BROKER_HOLD_S = 5.0  # a dispatch during a broker failover waits this long before a 503
WIRE_MARGIN = 512  # what the wire adds to a checked task: a signature, an expires_at
# `?fact=` of the node list: `--where`'s language (fleet/targets.py), in the printable form
# this pattern allows. The OpenAPI document publishes the same pattern (table.py), so what
# it calls valid is taken and the rest refused: after = or != a value with no control
# character and no operator in it, nothing blank at its ends; after < <= > >= a plain
# decimal. Blanks are spelled out (Python's \s and ECMAScript's differ: U+0085, U+FEFF).
_FACT_PATH = "[A-Za-z0-9_][A-Za-z0-9_-]*(\\.[A-Za-z0-9_-]+)*"
_FACT_NOT = "\\u0000-\\u001f\\u007f-\\u009f=<>!\\ufffd"
_FACT_BLANK = "\\u0020\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff"
_FACT_NUMBER = "[-+]?([0-9]{1,15}(\\.[0-9]{0,15})?|\\.[0-9]{1,15})([eE][-+]?[0-9]{1,2})?"
FACT_FILTER = re.compile(
    f"^ *{_FACT_PATH} *(=|!=) *[^{_FACT_NOT}{_FACT_BLANK}]"
    f"([^{_FACT_NOT}]*[^{_FACT_NOT}{_FACT_BLANK}])? *$"
    f"|^ *{_FACT_PATH} *(>=|<=|>|<) *{_FACT_NUMBER} *$")


def fact_filters(texts: list[str]) -> list[Where]:
    """The node list's `?fact=` values, each a `--where` expression (all must hold);
    Invalid naming `fact` for one that is not (HTTP 422, its message says why)."""
    if len(texts) > MAX_EXPRESSIONS:
        raise edge.Invalid("fact", f"{len(texts)} fact filters; the limit is "
                                   f"{MAX_EXPRESSIONS}")
    wheres = []
    for text in texts:
        try:
            where = parse_where(text, "fact filter")
        except BadRequest as exc:
            raise edge.Invalid("fact", str(exc)) from None
        if FACT_FILTER.fullmatch(text) is None:  # as ECMAScript's $ (Python's takes a \n)
            raise edge.Invalid("fact", f"bad fact filter {text!r}: after = or != the value "
                                       f"must be printable text (no control characters "
                                       f"such as a tab); after < <= > >= a plain decimal "
                                       f"number such as 32, -1.5 or 4e9")
        wheres.append(where)
    return wheres


def attempts_of(service: Service, task: TaskRow) -> list[JSONObject] | None:
    """Every attempt of a retried task (oldest first), for its detail; None if it has none."""
    if not task.retry and task.attempt == 1:
        return None
    return [{"id": a.id, "attempt": a.attempt, "state": a.state, "parent": a.parent,
             "error": a.error.to_dict() if a.error is not None else None}
            for a in service.fleet.db.attempts(task.node, task.root or task.id)]


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
    if isinstance(exc, edge.BadJson):
        return error_body(400, "bad_json", str(exc))
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
        self.tickets = Tickets(self.store)
        self.on_revoke: Callable[[int], None] | None = None  # closes the token's streams

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
        it clashes with what exists, so it is a conflict, not a bad field). An exact id
        is one row's read, even when 10,000 nodes have it."""
        if self.store.task_exists(given):
            return given
        found = self.store.task_ids_with_prefix(given, 11)
        if not found:
            raise NotFound(f"no task {given!r}")
        if 1 < len(found) <= 10:  # the attempts of one retry chain: its first attempt
            roots = {t.root or t.id for i in found for t in self.store.find(i)}
            if len(roots) == 1 and roots <= set(found):
                return str(roots.pop())
        if len(found) > 1:
            raise ApiError(409, "ambiguous", f"{given!r} is the start of several task ids; "
                           f"give more of it", candidates=found[:10])
        return found[0]

    def node_id(self, given: str) -> str:
        """The full node id for `given` (exact, else a unique prefix): one row, else a
        range of the primary key, never the whole registry."""
        if not is_node_id(given):  # (nor the start of one: no row can match)
            raise UnknownNode(f"unknown node {given!r}")
        if self.store.node(given) is not None:
            return given
        found = self.store.node_ids_with_prefix(given, 11)
        if not found:
            raise UnknownNode(f"unknown node {given!r}")
        if len(found) > 1:
            raise ApiError(409, "ambiguous", f"{given!r} is the start of several node ids; "
                           f"give more of it", candidates=found[:10])
        return found[0]

    # --- reads -------------------------------------------------------------------------
    def nodes(self, q: dict[str, list[str]]) -> JSONObject:
        wheres = fact_filters(q.get("fact", []))  # checked before any work
        state = edge.one(q, "state")
        if state is not None and state not in ("online", "offline"):
            raise edge.Invalid("state", "`state` must be online or offline")
        if not (q.get("match") or q.get("where") or wheres or edge.one(q, "q")):
            # a page by state and cursor alone: read as a page (100,000 nodes are not
            # all read and parsed for each page of 500)
            if edge.boolean(q, "online"):
                if state == "offline":
                    return {"nodes": [], "total": 0, "next": None}
                state = "online"
            size = edge.limit(q, 500)
            page, total = self.store.node_page(state=state, after=edge.one(q, "cursor"),
                                               limit=size + 1)
            return {"nodes": [n.to_json() for n in page[:size]], "total": total,
                    "next": page[size - 1].node if len(page) > size else None}
        text = (edge.one(q, "q") or "").lower()
        chosen = q.get("match") or q.get("where")
        light = not (wheres or text)  # no filter over facts: only the chosen are read whole
        nodes: Sequence[Known]
        if chosen and light:
            nodes = sorted(self.service.select(q.get("match", []), edge.boolean(q, "online"),
                                               q.get("where")), key=lambda n: n.node)
        elif chosen:
            picked = set(self.service.resolve(q.get("match", []), edge.boolean(q, "online"),
                                              q.get("where")))
            nodes = [n for n in self.store.nodes() if n.node in picked]
        else:
            nodes = self.store.nodes()
            if edge.boolean(q, "online"):
                nodes = [n for n in nodes if n.state == "online"]
        if state is not None:
            nodes = [n for n in nodes if n.state == state]
        if text:
            nodes = [n for n in nodes if text in n.node.lower()
                     or text in json.dumps(n.facts or {}).lower()]
        if wheres:
            nodes = [n for n in nodes if all(w.matches(n.facts) for w in wheres)]
        total = len(nodes)
        after = edge.one(q, "cursor")
        if after:
            nodes = [n for n in nodes if n.node > after]
        size = edge.limit(q, 500)
        ids = [n.node for n in nodes[:size]]
        # the page's records whole, by id (a choice by ids and globs read ids and states)
        return {"nodes": [n.to_json() for n in self.store.nodes_by_ids(ids)], "total": total,
                "next": ids[-1] if len(nodes) > size else None}

    def node(self, node: str) -> JSONObject:
        found = self.store.node(self.node_id(node))
        assert found is not None
        tasks, _ = self.store.task_page(node=found.node, limit=20)
        return {**found.to_json(), "tasks": [without_tails(t.to_json()) for t in tasks]}

    def tasks(self, q: dict[str, list[str]]) -> JSONObject:
        tasks, more = self.store.task_page(
            node=edge.one(q, "node"), state=edge.state(q), job_id=edge.one(q, "job"),
            before=edge.cursor_int(q), limit=edge.limit(q, 100))
        return {"tasks": [without_tails(t.to_json()) for t in tasks],
                "next": str(more) if more is not None else None}

    def task(self, given: str, q: dict[str, list[str]]) -> JSONObject:
        task_id = self.task_id(given)
        node = edge.one(q, "node")
        found = self.store.find(task_id, node)  # with a node: one row
        if not found:
            raise NotFound(f"no task {task_id!r}" + (f" on node {node}" if node else ""))
        out = []
        for task in found:
            detail = {**task.to_json(), "updates": self.store.updates(task.node, task_id)}
            if not task.final:  # for `logs -f` attached late
                detail["live_output"] = self.service.hub.recent_output.of(task.node, task_id)
            attempts = attempts_of(self.service, task)
            if attempts is not None:
                detail["attempts"] = attempts
            out.append(detail)
        return {"tasks": out}

    def jobs(self, q: dict[str, list[str]]) -> JSONObject:
        size = edge.limit(q, 50)
        jobs = self.store.jobs(before=edge.one(q, "cursor"), limit=size + 1)
        page = [{**j, "progress": self.progress(j["id"], len(j["steps"]), j["nodes"])}
                for j in jobs[:size]]
        return {"jobs": page, "next": jobs[size - 1]["created_at"] if len(jobs) > size
                else None}

    def progress(self, job_id: str, steps: int, nodes: int) -> JSONObject:
        """One row for the whole job, counted by the database: per step and in total."""
        return progress_of(self.store.job_progress(job_id), steps, nodes)

    def job(self, job_id: str) -> JSONObject:
        job = self.store.job_head(job_id)  # its row, not its 10,000 tasks
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return {"id": job.id, "created_at": job.created_at, "steps": job.steps,
                "nodes": len(job.nodes),
                "progress": self.progress(job_id, len(job.steps), len(job.nodes))}

    def job_targets(self, job_id: str, q: dict[str, list[str]]) -> JSONObject:
        if self.store.job_head(job_id) is None:
            raise NotFound(f"no job {job_id!r}")
        size = edge.limit(q, 100)
        rows = self.store.job_targets(job_id, edge.one(q, "cursor"), size + 1)
        page = rows[:size]
        return {"targets": page, "next": page[-1]["node"] if len(rows) > size else None}

    # --- writes ------------------------------------------------------------------------
    def check_spec(self, spec: JSONObject, field: str) -> None:
        """The contract's own parser on a request's task; its complaint names the field."""
        try:
            task = self.service.core.build_task(spec, spec.get("id") or "check", expiry=False)
        except edge.Invalid:
            raise
        except BadRequest as exc:
            message = str(exc).removeprefix("bad task: ")
            raise edge.Invalid(f"{field}.{edge.field_of(message, 'type')}",
                               f"`{field}`: {message}") from None
        # the agent refuses a message over its limit (too_large): refuse it here instead,
        # before anything is stored; the margin is the signature and the expiry
        limit = self.service.cfg.max_message_bytes
        size = len(encode(task)) + WIRE_MARGIN
        if size > limit:
            raise ApiError(413, "too_large", f"`{field}` would be a {size}-byte message; "
                           f"the agents take at most {limit} bytes (max_message_bytes)",
                           field=field)

    def hold_for_broker(self) -> None:
        """Through a broker failover (a reconnect of a second or two), a request that must
        reach the broker waits for the link, up to BROKER_HOLD_S, before it is refused
        503; a client that retries with its Idempotency-Key then never runs twice."""
        self.service.messenger.connected.wait(BROKER_HOLD_S)

    def dispatch(self, who: Principal, body: JSONObject) -> JSONObject:
        targets, online, spec = edge.dispatch_body(body)
        self.check_spec(spec, "task")
        self.hold_for_broker()
        def announce(created: list[TaskRow]) -> None:  # committed with the tasks
            self.audit(who, "dispatch", tasks=sorted({t.id for t in created}),
                       nodes=[t.node for t in created][:1000], count=len(created),
                       type=spec["type"], node=created[0].node if len(created) == 1 else None)
        created = self.service.dispatch(targets, online, spec, where=body.get("where"),
                                        retry=body.get("retry"), announce=announce)
        return {"tasks": [without_tails(t.to_json()) for t in created]}

    def create_job(self, who: Principal, body: JSONObject) -> JSONObject:
        job_id, targets, online, steps = edge.job_body(body)
        for i, step in enumerate(steps):
            self.check_spec({k: v for k, v in step.items() if k != "id"}, f"steps.{i}")
        self.hold_for_broker()
        job = self.service.create_job(
            targets, online, steps, job_id, where=body.get("where"), creator=who.name,
            announce=lambda job: self.audit(who, "job", job=job.id, nodes=job.nodes[:1000],
                                            count=len(job.nodes), steps=len(steps), tasks=[]))
        # answered from the tasks just made (no read that would wait for their sending)
        counts: dict[int, dict[str, int]] = {}
        for task in job.tasks:
            by_state = counts.setdefault(task.step or 0, {})
            by_state[task.state] = by_state.get(task.state, 0) + 1
        return {"id": job.id, "created_at": job.created_at, "steps": job.steps,
                "nodes": len(job.nodes),
                "progress": progress_of(counts, len(job.steps), len(job.nodes)),
                "tasks": [without_tails(t.to_json()) for t in job.tasks]}

    def cancel(self, who: Principal, given: str, body: JSONObject) -> JSONObject:
        edge.check_keys(body, ("node",), "a cancel request")
        node = body.get("node")
        if node is not None and not isinstance(node, str):
            raise edge.Invalid("node", "`node` must be a node id")
        task_id = self.task_id(given)
        self.hold_for_broker()
        canceled = self.service.cancel(task_id, node)
        self.audit(who, "cancel", tasks=[task_id], nodes=[t.node for t in canceled],
                   node=canceled[0].node if len(canceled) == 1 else None)
        return {"tasks": [without_tails(t.to_json()) for t in canceled]}

    def cancel_job(self, who: Principal, job_id: str, body: JSONObject) -> JSONObject:
        edge.check_keys(body, (), "a job cancel request")
        job = self.store.job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        open_tasks = [t for t in job.tasks if not t.final]
        if not open_tasks:
            raise Conflict(f"job {job_id} has already finished; nothing to cancel")
        sent: list[TaskRow] = []
        for task_id in sorted({t.id for t in open_tasks}):  # one call per step, not per node
            others = [t for t in self.store.find(task_id) if t.job != job_id]
            nodes: list[str | None] = [None]
            if others:
                nodes = [*sorted({t.node for t in open_tasks if t.id == task_id})]
            for node in nodes:
                try:
                    sent.extend(self.service.cancel(task_id, node))
                except Conflict:
                    continue  # it finished meanwhile
        self.audit(who, "cancel", job=job_id, tasks=sorted({t.id for t in sent}),
                   nodes=sorted({t.node for t in sent})[:1000], count=len(sent))
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
            raise NotFound(f"no live token named {name[:64]!r}")
        if self.on_revoke is not None:
            self.on_revoke(int(record["id"]))
        self.audit(who, "token_revoke", token=name)
        return record


# --- the ASGI application ----------------------------------------------------------------
Route = tuple[str, str, str, Callable[..., Any]]  # method, path, role, work
