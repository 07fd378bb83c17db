"""The audit log: every task, every state change and every node, in SQLite or PostgreSQL.

Named queries, one file of them per back end (sql/sqlite.sql, sql/postgresql.sql, read
by queries.py; run by name through db.py), a versioned schema (schema.py), one
connection guarded by a lock (the intake thread writes, API threads read). Every change
of a task's state goes through `can_transition` on the row read `FOR UPDATE`, so
redelivered or out-of-order updates never move a task backwards, even when several
`serve` instances share one PostgreSQL database: the store is where at-least-once
delivery is deduped. On PostgreSQL each logged event (`append_event`) is also announced
with NOTIFY in the transaction that logs it (cluster.py hands those to the other
instances' event streams).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from edgerun.protocol import (
    JSONObject,
    State,
    Task,
    Update,
    can_transition,
    format_time,
    is_node_id,
    is_task_id,
    parse_time,
)
from edgerun.scheduler.errors import StoreError
from edgerun.scheduler.store.advance import (
    NEW,
    Plan,
    Stepper,
    by_key,
    update_columns,
)
from edgerun.scheduler.store.db import Database, open_database
from edgerun.scheduler.store.eventlog import TOP_SEQ, EventLogStore
from edgerun.scheduler.store.jobreads import JobReads
from edgerun.scheduler.store.nodes import NodeRegistry
from edgerun.scheduler.store.parts import json_or_none
from edgerun.scheduler.store.queries import Rows
from edgerun.scheduler.store.records import FINAL, TaskRow
from edgerun.scheduler.store.schema import MIGRATIONS, SCHEMA_VERSION
from edgerun.scheduler.store.tokens import TokenStore
from edgerun.scheduler.store.tx import Tx, flush_events, run_after

log = logging.getLogger(__name__)

PRUNE_BATCH = 2_000  # finished tasks deleted a transaction (retention)
UNKNOWN = object()


@cache
def _sources(state: State) -> tuple[str, ...]:
    """The states a task may move to `state` from ("__new__": known only so far)."""
    return tuple(("__new__" if s is None else str(s)) for s in (None, *State)
                 if can_transition(s, state))
LOG_KEEP = 100_000


@dataclass(frozen=True)
class Change:
    """A task moved from `previous` (None: first seen) to the state in `task`."""

    previous: str | None
    task: TaskRow


class Store(NodeRegistry, JobReads, TokenStore, EventLogStore):
    """`target`: a SQLite file name, or a postgresql:// URL. The node registry, jobs,
    API tokens and the event log are its parts (nodes.py, jobreads.py, tokens.py,
    eventlog.py); the tasks and their state machine are here."""

    def __init__(self, target: str) -> None:
        self.db: Database = open_database(target)
        self.path = self.db.name  # what /health shows: the URL has no password
        self.kind = self.db.kind
        self.origin = self.db.origin
        try:
            self.db.migrate(MIGRATIONS, SCHEMA_VERSION)
        except BaseException:
            self.db.close()
            raise
        self._lease: Any = None
        self._touched: dict[str, float] = {}
        self._local = threading.local()
        self.event_keep = LOG_KEEP
        self.on_events: Callable[[list[tuple[int, JSONObject]]], None] | None = None
        """Called after each commit with the events it logged, (id, event) in id order."""

    # --- plumbing -----------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        with self.read() as db:
            return db.schema_version()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """The calling thread's transaction: opened here, or joined when one is open
        already (then it commits with the outermost). Events logged in it (`log_event`)
        are written with it; `Tx.after_commit` callbacks run once it has committed."""
        tx: Tx | None = getattr(self._local, "tx", None)
        if tx is not None:
            yield tx
            return
        with self.db.write() as db:
            tx = Tx(db)
            self._local.tx = tx
            try:
                yield tx
                while tx.before:
                    tx.before.pop(0)()
                logged = flush_events(tx, origin=self.origin, shared=self.shared,
                                      keep=self.event_keep)
            finally:
                self._local.tx = None
        if logged and self.on_events is not None:
            try:
                self.on_events(logged)
            except Exception:  # the log has them; readers catch up from it
                log.exception("handing committed events to the hub")
        run_after(tx.after)
        if tx.touched:
            self._flush_touched(sorted(tx.touched))

    def _flush_touched(self, nodes: list[str]) -> None:
        """Refresh the last_seen of the nodes a transaction heard from, after it and in
        a transaction of their own: no node row stays locked through a batch (two
        instances taking them in different orders would deadlock). On PostgreSQL its
        COMMIT does not wait for the disk: a crash may lose the last second's last_seen,
        which the next message refreshes anyway, and each batch saves a disk flush."""
        stamp = format_time()
        try:
            with self.db.write() as db:
                if db.kind == "postgresql":
                    db.run("pg_async_commit")
                for start in range(0, len(nodes), 500):
                    db.run("touch_nodes", (stamp, nodes[start:start + 500]))
        except StoreError as exc:
            log.warning("refreshing last_seen: %s", exc)

    @property
    def in_transaction(self) -> bool:
        return getattr(self._local, "tx", None) is not None

    def after_commit(self, callback: Callable[[], None]) -> None:
        """`callback` after the open transaction commits; at once when none is open."""
        tx: Tx | None = getattr(self._local, "tx", None)
        if tx is None:
            callback()
        else:
            tx.after_commit(callback)

    @contextmanager
    def read(self) -> Iterator[Database]:
        """A read: on the open transaction of this thread if there is one (it sees its
        own writes), else outside any."""
        with self.db.read() as db:
            yield db

    def close(self) -> None:
        if self._lease is not None:
            self._lease.release()
        self.db.close()

    # --- several instances (cluster.py) -----------------------------------------------
    @property
    def shared(self) -> bool:
        """Whether other `serve` instances may use this store (PostgreSQL)."""
        return self.kind == "postgresql"

    def leads(self) -> bool:
        """Whether this process runs the periodic duties now: always on SQLite; on
        PostgreSQL while it holds the advisory lock (taken here when free)."""
        if not self.shared:
            return True
        if self._lease is None:
            from edgerun.scheduler.store.cluster import Lease
            self._lease = Lease(self.db.target)
        return bool(self._lease.check())

    def listen(self, deliver: Callable[[JSONObject], None],
               on_connect: Callable[[], None] | None = None, *, start: bool = True) -> Any:
        """Hear the other instances' changes (a cluster.Listener, started unless `start` is
        False); None on SQLite."""
        if not self.shared:
            return None
        from edgerun.scheduler.store.cluster import Listener
        listener = Listener(self.db.target, self.origin, deliver, on_connect)
        return listener.start() if start else listener

    # --- tasks: writes ------------------------------------------------------------
    def add_task(self, node: str, task: Task, *, source: str, state: State = State.QUEUED,
                 job_id: str | None = None, step: int | None = None,
                 deadline: float | None = None) -> Change | None:
        """Insert a task; None (and nothing written) when (node, id) is already known."""
        changes = self.add_tasks([node], task, source=source, state=state, job_id=job_id,
                                 step=step, deadline=deadline)
        return changes[0] if changes else None

    def add_tasks(self, nodes: list[str], task: Task, *, source: str,
                  state: State = State.QUEUED, job_id: str | None = None,
                  step: int | None = None, deadline: float | None = None,
                  retry: JSONObject | None = None, hold: str | None = None) -> list[Change]:
        """Insert one task for many nodes in a few multi-row statements; the changes of
        the rows inserted, in node order (a (node, id) already known is left out)."""
        if not nodes:
            return []
        spec = task.to_dict()
        now = format_time()
        expires = spec.get("expires_at")
        expires_ts = task.expires_at.timestamp() if task.expires_at and state != State.QUEUED \
            else None
        common = (task.id, task.type, json.dumps(spec), source, str(state), now, now,
                  now if state == State.DISPATCHED else None, task.timeout, expires,
                  expires_ts, deadline, job_id, step, json_or_none(retry), hold)
        with self.transaction() as tx:
            rows = tx.all("insert_tasks", (*common, list(nodes)))
        rows.sort(key=lambda r: int(r["seq"]))
        return [Change(None, TaskRow.from_row(r)) for r in rows]

    def note_task_seen(self, node: str, task: Task, *, deadline: float) -> Change | None:
        """A task message seen on the wire (ours echoed, or another client's).

        Unknown: recorded as `dispatched` by an external source. Known only
        from its updates: its spec is filled in. Known: nothing to do.
        """
        with self.transaction() as tx:
            row = tx.one("lock_task_spec", (node, task.id))
            if row is not None:
                if row["spec"] is None:
                    tx.run("fill_task_spec", (json.dumps(task.to_dict()), task.type,
                                              task.timeout, task.to_dict().get("expires_at"),
                                              node, task.id))
                return None
            return self.add_task(node, task, source="external", state=State.DISPATCHED,
                                 deadline=deadline)

    def mark_dispatched(self, node: str, task_id: str, deadline: float,
                        expires_ts: float | object | None = UNKNOWN) -> Change | None:
        """The broker took the task (PUBACK / publisher confirm). `expires_ts`: the task's
        expires_at as a timestamp, when the caller knows it (one statement less)."""
        with self.transaction() as tx:
            if expires_ts is UNKNOWN:
                row = tx.one("task_expires_at", (node, task_id))
                expires_ts = _expires_ts(row["expires_at"]) if row is not None else None
            return self._transition(node, task_id, State.DISPATCHED, "transition_dispatched",
                                    (format_time(), deadline, expires_ts))

    def apply_updates(self, updates: list[tuple[Update, JSONObject]], *, grace: float,
                      now: float) -> list[Change | None]:
        """`apply_update` for the updates that arrived together, in one transaction: their
        rows read once, stepped through the state machine in memory in arrival order
        and each written once (advance.py), the history rows of the applied ones in one
        multi-row INSERT; those that could not be stepped (unknown task, duplicate,
        late) go the one-by-one way afterwards, in their order."""
        if not updates:
            return []
        out: list[Change | None] = [None] * len(updates)
        with self.transaction() as tx:
            stepper = self._stepper(tx, {(u.node, str(u.id)) for u, _body in updates})
            received = format_time()
            for i, (update, body) in enumerate(updates):
                key = (update.node, str(update.id))
                row = stepper.current(key)
                cols = update_columns(update, body, grace, now,
                                      row["timeout"] if row is not None else None)
                stepper.step(i, key, update.state, cols,
                             (update.node, update.id, str(update.state), update.at,
                              received, json.dumps(body)))
            plan = self._write_steps(tx, stepper)
            for step in plan.steps:
                out[step.index] = Change(step.previous, step.task)
            if plan.rest:
                self._apply_rest(tx, stepper, updates, plan.rest, out, grace, now, received)
            return out

    def _apply_rest(self, tx: Tx, first: Stepper, updates: list[tuple[Update, JSONObject]],
                    rest: list[int], out: list[Change | None], grace: float, now: float,
                    received: str) -> None:
        """What the first pass refused, in order, as one at a time after it would be: a
        second pass over the rows as the first left them (one batch may hold `running`
        before `accepted`), then on a known row what is still refused is late or a
        duplicate, of which only the first copy of each state joins the history (one
        statement for all). A task not in the store goes the one-by-one way (its row is
        made from the update). Several instances get one task's updates spread over
        them, so late ones are common there; each cost two round trips before."""
        unknown = {(updates[i][0].node, str(updates[i][0].id)) for i in rest
                   if first.current((updates[i][0].node, str(updates[i][0].id))) is None}
        known = [i for i in rest if (updates[i][0].node, str(updates[i][0].id)) not in unknown]
        if known:
            keys = {(updates[i][0].node, str(updates[i][0].id)) for i in known}
            again = Stepper({k: row for k in keys if (row := first.current(k)) is not None},
                            _sources, format_time())
            late: list[tuple[Any, ...]] = []
            for i in known:
                update, body = updates[i]
                key = (update.node, str(update.id))
                row = again.current(key)
                assert row is not None
                history = (update.node, update.id, str(update.state), update.at, received,
                           json.dumps(body))
                if not again.step(i, key, update.state,
                                  update_columns(update, body, grace, now, row["timeout"]),
                                  history):
                    late.append((*history, *key, *key, str(update.state)))
            plan = self._write_steps(tx, again)
            for step in plan.steps:
                out[step.index] = Change(step.previous, step.task)
            if late:  # one round trip for all on PostgreSQL (a one-row statement each)
                tx.db.pipeline([("insert_late_update", args) for args in late])
        for i in rest:
            update, body = updates[i]
            if (update.node, str(update.id)) in unknown:
                out[i] = self.apply_update(update, body, grace=grace, now=now)

    def _stepper(self, tx: Tx, keys: set[tuple[str, str]]) -> Stepper:
        """The rows of `keys`, read (and locked on PostgreSQL) for stepping in memory."""
        ordered = sorted(keys)
        rows: list[Any] = []
        lock = self.kind == "postgresql"
        for start in range(0, len(ordered), 250):
            rows.extend(tx.all("lock_tasks_by_keys" if lock else "tasks_by_keys",
                               (Rows(ordered[start:start + 250], 2),)))
        return Stepper(by_key(rows), _sources, format_time())

    @staticmethod
    def _write_steps(tx: Tx, stepper: Stepper) -> Plan:
        """Each changed row once, the applied steps' history rows together."""
        plan = stepper.finish()
        if len(plan.writes) == 1:
            tx.run("write_task", plan.writes[0])
        elif plan.writes:  # one round trip for all on PostgreSQL
            tx.db.pipeline([("write_task", args) for args in plan.writes])
        history = [step.history for step in plan.steps if step.history is not None]
        if history:
            tx.db.run_many("insert_updates", history)
        return plan

    def mark_dispatched_many(self, confirms: list[tuple[str, str, float, float | None]]
                             ) -> list[Change | None]:
        """`mark_dispatched` for (node, task id, deadline, expires_ts) of many confirms: the
        rows read once, each written once (advance.py)."""
        if not confirms:
            return []
        stamp = format_time()
        with self.transaction() as tx:
            stepper = self._stepper(tx, {(node, task_id) for node, task_id, *_ in confirms})
            for i, (node, task_id, deadline, expires_ts) in enumerate(confirms):
                stepper.step(i, (node, task_id), State.DISPATCHED,
                             {"dispatched_at": stamp, "deadline": deadline,
                              "expires_ts": expires_ts}, None)
            plan = self._write_steps(tx, stepper)
        out: list[Change | None] = [None] * len(confirms)
        for step in plan.steps:
            out[step.index] = Change(step.previous, step.task)
        return out

    def apply_update(self, update: Update, body: JSONObject, *, grace: float,
                     now: float) -> Change | None:
        """Apply an agent's update if the state machine allows it; None when it is a
        duplicate or stale (a late `running` never reopens a final task). A task known
        only from its updates is recorded too; every state's first copy is kept in the
        history, which lists them in the agent's order (`updates`).

        An accepted or running task gets the deadline now + its timeout + grace
        (advance.update_columns, the one place that says what an update sets)."""
        assert update.id is not None
        node, task_id, state = update.node, update.id, update.state
        key = (node, task_id)
        history = (node, task_id, str(state), update.at, format_time(), json.dumps(body))
        with self.transaction() as tx:
            stepper = self._stepper(tx, {key})
            made = 0
            if stepper.current(key) is None:
                stamp = format_time()  # known only from its updates: recorded from this one
                made = tx.run("insert_placeholder_task",
                              (node, task_id, "update", NEW, stamp, stamp)).rowcount
                stepper = self._stepper(tx, {key})
            row = stepper.current(key)
            if row is not None and stepper.step(
                    0, key, state, update_columns(update, body, grace, now, row["timeout"]),
                    history):
                step = self._write_steps(tx, stepper).steps[0]
                return Change(step.previous, step.task)
            if made == 1:
                tx.run("delete_placeholder_task", (node, task_id))
                return None
            # Not applied (a duplicate, or late: with several instances `accepted` may be
            # handled after `running`), yet the first copy of each state is part of the
            # record. The task row is locked (FOR UPDATE), so two instances never both
            # insert it.
            tx.run("insert_late_update",
                   (*history, node, task_id, node, task_id, str(state)))
            return None

    def record_rejected_without_id(self, node: str, body: JSONObject) -> None:
        """A `rejected` update with `"id": null`: no task to attach it to, kept for the audit."""
        with self.transaction() as tx:
            tx.run("insert_rejected_update", (node, str(State.REJECTED), body.get("at"),
                                              format_time(), json.dumps(body)))

    def mark_lost(self, node: str, task_id: str, expected: str, code: str,
                  message: str) -> Change | None:
        """The tracker's verdict; applied only if the task is still in `expected`."""
        return self._verdict(node, task_id, expected, State.LOST, code, message)

    def cancel_queued(self, node: str, task_id: str, code: str, message: str) -> Change | None:
        """Cancel a task the scheduler never sent (a later job step)."""
        return self._verdict(node, task_id, str(State.QUEUED), State.CANCELED, code, message)

    def _verdict(self, node: str, task_id: str, expected: str, state: State, code: str,
                 message: str) -> Change | None:
        with self.transaction() as tx:
            change = self._transition(node, task_id, state, "transition_verdict",
                                      (code, message), expected=expected)
            if change is not None:
                body = {"v": 1, "kind": "update", "id": task_id, "node": node,
                        "state": str(state), "at": format_time(),
                        "error": {"code": code, "message": message}, "by": "scheduler"}
                tx.run("insert_update", (node, task_id, str(state), body["at"], body["at"],
                                         json.dumps(body)))
            return change

    def extend_deadlines(self, node: str, at_least: float) -> None:
        """A node came (back) online: its waiting tasks get a fresh chance to be taken."""
        with self.transaction() as tx:
            tx.run("extend_deadlines", (at_least, node, str(State.DISPATCHED), at_least))

    def _transition(self, node: str, task_id: str, state: State, query: str,
                    args: tuple[Any, ...], expected: str | None = None) -> Change | None:
        """One guarded UPDATE (the named `query`, a `transition_*` one, with `args` for
        what it sets): the new state only if the state machine allows the move from the
        row's current state (`expected`, if given, must be it); it returns the row with
        the state it left (`previous`). Under PostgreSQL's row lock a concurrent change
        re-checks the guard on the row's newest version, so two instances never both
        apply a move."""
        sources = [s for s in _sources(state) if expected is None or s == expected]
        if not sources:
            return None
        with self.transaction() as tx:
            row = tx.one(query, (str(state), format_time(), *args, node, task_id, sources))
            if row is None:
                return None
            previous = row["previous"]
            return Change(None if previous == "__new__" else previous, TaskRow.from_row(row))

    # --- tasks: reads ---------------------------------------------------------------
    def get(self, node: str, task_id: str) -> TaskRow | None:
        with self.read() as db:
            row = db.one("get_task", (node, task_id))
            return TaskRow.from_row(row) if row is not None else None

    def task_exists(self, task_id: str) -> bool:
        """Whether any node has a task with this id: one row, however many nodes do."""
        if not is_task_id(task_id):
            return False
        with self.read() as db:
            return db.one("task_exists", (task_id,)) is not None

    def find(self, task_id: str, node: str | None = None) -> list[TaskRow]:
        """Every task with this id (ids are unique per node; other clients may reuse them);
        with `node`, that node's one (a single-row read)."""
        if node is not None:
            if not is_node_id(node):  # (a NUL byte is an error on PostgreSQL, not a miss)
                return []
            task = self.get(node, task_id)
            return [task] if task is not None and task.state != NEW else []
        with self.read() as db:
            rows = db.all("find_tasks", (task_id,))
            return [TaskRow.from_row(r) for r in rows]

    def updates(self, node: str, task_id: str) -> list[JSONObject]:
        """A task's history in the agent's order: accepted < running < final, whatever
        order they arrived in; updates of the same rank in arrival order."""
        with self.read() as db:
            rows = db.all("task_history", (node, task_id))
            return [{**json.loads(r["body"]), "received_at": r["received_at"]} for r in rows]

    def tasks(self, *, node: str | None = None, state: str | None = None,
              job_id: str | None = None, limit: int = 100) -> list[TaskRow]:
        """Newest first."""
        with self.read() as db:
            return [TaskRow.from_row(r) for r in db.all(*_page(node, state, job_id, None, limit))]

    def due(self, now: float) -> list[TaskRow]:
        """Unfinished tasks past their deadline or expiry: for the tracker to judge."""
        with self.read() as db:
            rows = db.all("due_tasks", (now, now))
            return [TaskRow.from_row(r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        with self.read() as db:
            rows = db.all("count_tasks_by_state")
            return {r["state"]: int(r["n"]) for r in rows if r["state"] != "__new__"}

    # --- retention and re-sending ------------------------------------------------------
    def prune(self, keep_days: float, now: float | None = None,
              batch: int = PRUNE_BATCH) -> dict[str, int]:
        """Delete finished tasks (and their updates) last changed more than `keep_days`
        ago, id-less `rejected` updates as old, and jobs left with no task.

        In transactions of at most `batch` tasks (oldest first), so that retention of a
        large history never holds the store's writer for long: dispatch goes on between
        two batches."""
        stamp = format_time(datetime.fromtimestamp(now if now is not None else time.time(), UTC)
                            - timedelta(days=keep_days))
        out = {"tasks": 0, "updates": 0, "jobs": 0}
        while True:
            with self.transaction() as db:
                seqs = [int(r[0]) for r in db.all("prune_pick_tasks", (stamp, list(FINAL), batch))]
                if seqs:
                    out["updates"] += max(0, db.run("prune_task_updates", (seqs,)).rowcount)
                    out["tasks"] += max(0, db.run("prune_tasks", (seqs,)).rowcount)
            if len(seqs) < batch:
                break
        while True:
            with self.transaction() as db:
                gone = db.run("prune_orphan_updates", (stamp, batch)).rowcount
                out["updates"] += max(0, gone)
            if gone < batch:
                break
        with self.transaction() as db:
            out["jobs"] = max(0, db.run("prune_jobs", (stamp,)).rowcount)
        return out

    def stale_queued(self, older_than_s: float) -> list[TaskRow]:
        """Queued tasks (not job steps) created more than `older_than_s` ago: sent by an
        instance that died before the broker took them."""
        stamp = format_time(datetime.now(UTC) - timedelta(seconds=older_than_s))
        with self.read() as db:
            rows = db.all("stale_queued", (str(State.QUEUED), stamp))
            return [TaskRow.from_row(r) for r in rows]

    def unaccepted(self, node: str) -> list[TaskRow]:
        """Tasks sent to `node` that it has not acknowledged yet (state `dispatched`), oldest
        first: what a broker that lost its queue should get again."""
        with self.read() as db:
            rows = db.all("unaccepted", (node, str(State.DISPATCHED)))
            return [TaskRow.from_row(r) for r in rows]

    # --- jobs ------------------------------------------------------------------------
    def tasks_of(self, keys: list[tuple[str, str]]) -> list[TaskRow]:
        """The tasks of (node, id) keys that exist, a few statements for many."""
        ordered = sorted(set(keys))
        out: list[TaskRow] = []
        with self.read() as db:
            for start in range(0, len(ordered), 250):
                out.extend(TaskRow.from_row(r) for r in db.all(
                    "tasks_by_keys", (Rows(ordered[start:start + 250], 2),)))
        return out

    # --- reads for the API: keyset pages, id prefixes, job progress ---------------------
    def task_page(self, *, node: str | None = None, state: str | None = None,
                  job_id: str | None = None, before: int | None = None,
                  limit: int = 100) -> tuple[list[TaskRow], int | None]:
        """Newest first, at most `limit`, older than the cursor `before`; returns the
        tasks and the cursor of the next page (None at the end)."""
        with self.read() as db:
            rows = db.all(*_page(node, state, job_id, before, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        return [TaskRow.from_row(r) for r in rows], (int(rows[-1]["seq"]) if more else None)

    def task_ids_with_prefix(self, prefix: str, limit: int = 10) -> list[str]:
        """Distinct task ids that start with `prefix`, in order (for git-like short ids)."""
        with self.read() as db:
            rows = db.all("task_ids_with_prefix", (prefix, prefix + "\U0010ffff", limit))
            return [r["id"] for r in rows]

def _page(node: str | None, state: str | None, job_id: str | None, before: int | None,
          limit: int) -> tuple[str, dict[str, Any]]:
    """The named query of a filtered page of tasks and its arguments: the one led by
    the most selective filter given (its index), the others optional in it."""
    args = {"node": node, "state": state, "job": job_id, "limit": limit,
            "before": before if before is not None else TOP_SEQ}
    if node is not None:
        return "task_page_by_node", args
    if job_id is not None:
        return "task_page_by_job", args
    if state is not None:
        return "task_page_by_state", args
    return "task_page", args


def _expires_ts(expires_at: str | None) -> float | None:
    if not expires_at:
        return None
    return parse_time(expires_at).timestamp()

