"""The audit log: every task, every state change and every node, in one SQLite file.

WAL mode, a versioned schema (schema.py), one connection guarded by a lock
(the intake thread writes, API threads read). Every change of a task's state
goes through `can_transition`, so redelivered or out-of-order updates never
move a task backwards: the store is where at-least-once delivery is deduped.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from edgerun.protocol import (
    DEFAULT_TIMEOUT_S, JSONObject, State, Status, Task, Update, can_transition, format_time,
    is_final, parse_time,
)

from .errors import StoreError
from .schema import MIGRATIONS, SCHEMA_VERSION

RESULT_FIELDS = ("exit_code", "stdout", "stderr", "truncated", "duration_s", "bytes", "sha256",
                 "dest")


@dataclass(frozen=True)
class Change:
    """A task moved from `previous` (None: first seen) to the state in `task`."""

    previous: str | None
    task: JSONObject


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                       timeout=10.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the task store {path}: {exc}") from None

    # --- plumbing -----------------------------------------------------------------
    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(f"the task store {self.path} has schema version {version}; this "
                             f"edgerun knows up to {SCHEMA_VERSION}: upgrade edgerun")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={target}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        with self._read() as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"task store {self.path}: {exc}") from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise StoreError(f"task store {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass

    # --- tasks: writes ------------------------------------------------------------
    def add_task(self, node: str, task: Task, *, source: str, state: State = State.QUEUED,
                 job_id: str | None = None, step: int | None = None,
                 deadline: float | None = None) -> Change | None:
        """Insert a task; None (and nothing written) when (node, id) is already known."""
        spec = task.to_dict()
        now = format_time()
        expires = spec.get("expires_at")
        with self._write() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO tasks (node, id, type, spec, source, state, created_at, "
                "updated_at, dispatched_at, timeout, expires_at, expires_ts, deadline, job_id, "
                "step) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (node, task.id, task.type, json.dumps(spec), source, str(state), now, now,
                 now if state == State.DISPATCHED else None, task.timeout, expires,
                 task.expires_at.timestamp() if task.expires_at and state != State.QUEUED
                 else None, deadline, job_id, step))
            if cur.rowcount == 0:
                return None
            return Change(None, self._task(db, node, task.id))

    def note_task_seen(self, node: str, task: Task, *, deadline: float) -> Change | None:
        """A task message seen on the wire (ours echoed, or another client's).

        Unknown: recorded as `dispatched` by an external source. Known only
        from its updates: its spec is filled in. Known: nothing to do.
        """
        with self._write() as db:
            row = db.execute("SELECT spec FROM tasks WHERE node=? AND id=?",
                             (node, task.id)).fetchone()
            if row is not None:
                if row["spec"] is None:
                    db.execute("UPDATE tasks SET spec=?, type=?, timeout=?, expires_at=? "
                               "WHERE node=? AND id=?",
                               (json.dumps(task.to_dict()), task.type, task.timeout,
                                task.to_dict().get("expires_at"), node, task.id))
                return None
        return self.add_task(node, task, source="external", state=State.DISPATCHED,
                             deadline=deadline)

    def mark_dispatched(self, node: str, task_id: str, deadline: float) -> Change | None:
        """The broker took the task (PUBACK / publisher confirm)."""
        def apply(db: sqlite3.Connection, row: sqlite3.Row) -> None:
            db.execute("UPDATE tasks SET dispatched_at=?, deadline=?, expires_ts=? "
                       "WHERE node=? AND id=?",
                       (format_time(), deadline, _expires_ts(row["expires_at"]), node, task_id))
        return self._transition(node, task_id, State.DISPATCHED, apply)

    def apply_update(self, update: Update, body: JSONObject, *, grace: float,
                     now: float) -> Change | None:
        """Apply an agent's update if the state machine allows it; None when it is a
        duplicate or stale. A task known only from its updates is recorded too.

        An accepted or running task gets the deadline now + its timeout + grace."""
        assert update.id is not None
        node, task_id, state = update.node, update.id, update.state
        final = is_final(state)
        error = update.error

        def apply(db: sqlite3.Connection, row: sqlite3.Row) -> None:
            result = {k: body[k] for k in RESULT_FIELDS if k in body} if final else None
            deadline = None if final else now + (row["timeout"] or DEFAULT_TIMEOUT_S) + grace
            db.execute(
                "UPDATE tasks SET deadline=?, expires_ts=NULL, exit_code=COALESCE(?, exit_code), "
                "error_code=?, error_message=?, result=COALESCE(?, result) "
                "WHERE node=? AND id=?",
                (deadline, update.exit_code, error.code if error else None,
                 error.message if error else None,
                 json.dumps(result) if result is not None else None, node, task_id))
            db.execute("INSERT INTO updates (node, task_id, state, at, received_at, body) "
                       "VALUES (?,?,?,?,?,?)",
                       (node, task_id, str(state), update.at, format_time(), json.dumps(body)))
        with self._write() as db:
            stamp = format_time()
            db.execute("INSERT OR IGNORE INTO tasks (node, id, source, state, created_at, "
                       "updated_at) VALUES (?,?,?,?,?,?)",
                       (node, task_id, "update", "__new__", stamp, stamp))
            change = self._transition_in(db, node, task_id, state, apply)
            db.execute("DELETE FROM tasks WHERE node=? AND id=? AND state='__new__'",
                       (node, task_id))
            return change

    def record_rejected_without_id(self, node: str, body: JSONObject) -> None:
        """A `rejected` update with `"id": null`: no task to attach it to, kept for the audit."""
        with self._write() as db:
            db.execute("INSERT INTO updates (node, task_id, state, at, received_at, body) "
                       "VALUES (?,NULL,?,?,?,?)", (node, str(State.REJECTED), body.get("at"),
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
        def apply(db: sqlite3.Connection, _row: sqlite3.Row) -> None:
            db.execute("UPDATE tasks SET deadline=NULL, expires_ts=NULL, error_code=?, "
                       "error_message=? WHERE node=? AND id=?", (code, message, node, task_id))
            body = {"v": 1, "kind": "update", "id": task_id, "node": node, "state": str(state),
                    "at": format_time(), "error": {"code": code, "message": message},
                    "by": "scheduler"}
            db.execute("INSERT INTO updates (node, task_id, state, at, received_at, body) "
                       "VALUES (?,?,?,?,?,?)", (node, task_id, str(state), body["at"],
                                                body["at"], json.dumps(body)))
        with self._write() as db:
            row = db.execute("SELECT state FROM tasks WHERE node=? AND id=?",
                             (node, task_id)).fetchone()
            if row is None or row["state"] != expected:
                return None
            return self._transition_in(db, node, task_id, state, apply)

    def extend_deadlines(self, node: str, at_least: float) -> None:
        """A node came (back) online: its waiting tasks get a fresh chance to be taken."""
        with self._write() as db:
            db.execute("UPDATE tasks SET deadline=MAX(deadline, ?) WHERE node=? AND state=? "
                       "AND deadline IS NOT NULL", (at_least, node, str(State.DISPATCHED)))

    def _transition(self, node: str, task_id: str, state: State,
                    apply: Any) -> Change | None:
        with self._write() as db:
            return self._transition_in(db, node, task_id, state, apply)

    def _transition_in(self, db: sqlite3.Connection, node: str, task_id: str, state: State,
                       apply: Any) -> Change | None:
        row = db.execute("SELECT * FROM tasks WHERE node=? AND id=?", (node, task_id)).fetchone()
        if row is None:
            return None
        current = None if row["state"] == "__new__" else State(row["state"])
        if not can_transition(current, state):
            return None
        db.execute("UPDATE tasks SET state=?, updated_at=? WHERE node=? AND id=?",
                   (str(state), format_time(), node, task_id))
        apply(db, row)
        return Change(str(current) if current else None, self._task(db, node, task_id))

    # --- tasks: reads ---------------------------------------------------------------
    def _task(self, db: sqlite3.Connection, node: str, task_id: str) -> JSONObject:
        row = db.execute("SELECT * FROM tasks WHERE node=? AND id=?", (node, task_id)).fetchone()
        return task_dict(row)

    def get(self, node: str, task_id: str) -> JSONObject | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM tasks WHERE node=? AND id=?",
                             (node, task_id)).fetchone()
            return task_dict(row) if row is not None else None

    def find(self, task_id: str) -> list[JSONObject]:
        """Every task with this id (ids are unique per node; other clients may reuse them)."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM tasks WHERE id=? ORDER BY seq", (task_id,))
            return [task_dict(r) for r in rows]

    def updates(self, node: str, task_id: str) -> list[JSONObject]:
        with self._read() as db:
            rows = db.execute("SELECT body, received_at FROM updates WHERE node=? AND task_id=? "
                              "ORDER BY seq", (node, task_id))
            return [{**json.loads(r["body"]), "received_at": r["received_at"]} for r in rows]

    def tasks(self, *, node: str | None = None, state: str | None = None,
              job_id: str | None = None, limit: int = 100) -> list[JSONObject]:
        """Newest first."""
        where, args = [], []
        for column, value in (("node", node), ("state", state), ("job_id", job_id)):
            if value is not None:
                where.append(f"{column}=?")
                args.append(value)
        sql = "SELECT * FROM tasks WHERE state != '__new__'"
        sql += "".join(f" AND {w}" for w in where) + " ORDER BY seq DESC LIMIT ?"
        with self._read() as db:
            return [task_dict(r) for r in db.execute(sql, (*args, limit))]

    def due(self, now: float) -> list[JSONObject]:
        """Unfinished tasks past their deadline or expiry: for the tracker to judge."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM tasks WHERE (deadline IS NOT NULL AND deadline <= ?)"
                              " OR (expires_ts IS NOT NULL AND expires_ts <= ?) ORDER BY seq",
                              (now, now))
            return [task_dict(r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state")
            return {r["state"]: int(r["n"]) for r in rows if r["state"] != "__new__"}

    # --- nodes ---------------------------------------------------------------------
    def apply_status(self, status: Status) -> tuple[str | None, JSONObject]:
        """Record a status message; returns (previous state or None, the node)."""
        now = format_time()
        with self._write() as db:
            row = db.execute("SELECT state FROM nodes WHERE node=?", (status.node,)).fetchone()
            previous = row["state"] if row is not None else None
            if row is None:
                db.execute("INSERT INTO nodes (node, state, first_seen, last_seen, changed_at, "
                           "agent, facts, running) VALUES (?,?,?,?,?,?,?,?)",
                           (status.node, status.state, now, now, now, status.agent,
                            _json_or_none(status.facts), _json_or_none(status.running)))
            else:
                db.execute("UPDATE nodes SET state=?, last_seen=?, changed_at=CASE WHEN state=? "
                           "THEN changed_at ELSE ? END, agent=COALESCE(?, agent), "
                           "facts=COALESCE(?, facts), running=? WHERE node=?",
                           (status.state, now, status.state, now, status.agent,
                            _json_or_none(status.facts),
                            _json_or_none(list(status.running)) if status.running is not None
                            else None, status.node))
            node = db.execute("SELECT * FROM nodes WHERE node=?", (status.node,)).fetchone()
            return previous, node_dict(node)

    def touch_node(self, node: str) -> None:
        """Any message from a node shows it alive: refresh `last_seen` of a known node."""
        with self._write() as db:
            db.execute("UPDATE nodes SET last_seen=? WHERE node=?", (format_time(), node))

    def nodes(self) -> list[JSONObject]:
        with self._read() as db:
            return [node_dict(r) for r in db.execute("SELECT * FROM nodes ORDER BY node")]

    def node(self, node: str) -> JSONObject | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM nodes WHERE node=?", (node,)).fetchone()
            return node_dict(row) if row is not None else None

    def count_nodes_by_state(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute("SELECT state, COUNT(*) AS n FROM nodes GROUP BY state")
            return {r["state"]: int(r["n"]) for r in rows}

    def online_nodes(self) -> set[str]:
        with self._read() as db:
            return {r["node"] for r in db.execute("SELECT node FROM nodes WHERE state='online'")}

    # --- jobs ------------------------------------------------------------------------
    def add_job(self, job_id: str, nodes: list[str], steps: list[JSONObject]) -> None:
        with self._write() as db:
            db.execute("INSERT INTO jobs (id, created_at, nodes, steps) VALUES (?,?,?,?)",
                       (job_id, format_time(), json.dumps(nodes), json.dumps(steps)))

    def job(self, job_id: str) -> JSONObject | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            tasks = db.execute("SELECT * FROM tasks WHERE job_id=? ORDER BY node, step",
                               (job_id,))
            return {"id": row["id"], "created_at": row["created_at"],
                    "nodes": json.loads(row["nodes"]), "steps": json.loads(row["steps"]),
                    "tasks": [task_dict(t) for t in tasks]}

    def job_steps(self, job_id: str, node: str) -> list[JSONObject]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM tasks WHERE job_id=? AND node=? ORDER BY step",
                              (job_id, node))
            return [task_dict(r) for r in rows]

    def queued_job_heads(self) -> list[JSONObject]:
        """Job steps that may go now: queued, and every earlier step of the node succeeded."""
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM tasks t WHERE t.job_id IS NOT NULL AND t.state='queued' AND NOT "
                "EXISTS (SELECT 1 FROM tasks p WHERE p.job_id=t.job_id AND p.node=t.node AND "
                "p.step < t.step AND p.state != 'succeeded') ORDER BY seq")
            return [task_dict(r) for r in rows]


    # --- API tokens (only their SHA-256 is kept) --------------------------------------
    def add_token(self, name: str, role: str, digest: str, hint: str,
                  created_by: str | None) -> JSONObject | None:
        """None when a token of that name exists already."""
        with self._write() as db:
            cur = db.execute("INSERT OR IGNORE INTO tokens (name, role, hash, hint, created_at, "
                             "created_by) VALUES (?,?,?,?,?,?)",
                             (name, role, digest, hint, format_time(), created_by))
            if cur.rowcount == 0:
                return None
            row = db.execute("SELECT * FROM tokens WHERE name=?", (name,)).fetchone()
            return _token_dict(row)

    def token_by_hash(self, digest: str) -> JSONObject | None:
        """The live (not revoked) token with this hash."""
        with self._read() as db:
            row = db.execute("SELECT * FROM tokens WHERE hash=? AND revoked_at IS NULL",
                             (digest,)).fetchone()
            return _token_dict(row) if row is not None else None

    def tokens(self) -> list[JSONObject]:
        with self._read() as db:
            return [_token_dict(r) for r in db.execute("SELECT * FROM tokens ORDER BY id")]

    def count_tokens(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT COUNT(*) FROM tokens").fetchone()[0])

    def revoke_token(self, name: str) -> JSONObject | None:
        """None when no live token has that name."""
        with self._write() as db:
            cur = db.execute("UPDATE tokens SET revoked_at=? WHERE name=? AND revoked_at IS NULL",
                             (format_time(), name))
            if cur.rowcount == 0:
                return None
            row = db.execute("SELECT * FROM tokens WHERE name=?", (name,)).fetchone()
            return _token_dict(row)

    def touch_token(self, token_id: int) -> None:
        with self._write() as db:
            db.execute("UPDATE tokens SET last_used_at=? WHERE id=?", (format_time(), token_id))

    # --- the event log (what /v1/events resumes from) -------------------------------
    def append_event(self, channel: str, node: str | None, task_id: str | None,
                     body: JSONObject, keep: int) -> int:
        """THE append point of the durable event log: returns the event's id, ids only
        increase. Keeps the newest `keep` events; the highest id dropped is remembered
        so a reader asking for older ones can be told (`events_dropped_through`)."""
        with self._write() as db:
            cur = db.execute("INSERT INTO events (at, channel, node, task_id, body) "
                             "VALUES (?,?,?,?,?)", (format_time(), channel, node, task_id,
                                                    json.dumps(body)))
            event_id = int(cur.lastrowid or 0)
            if keep > 0 and event_id % 500 == 0 and event_id > keep:
                horizon = event_id - keep
                db.execute("DELETE FROM events WHERE id <= ?", (horizon,))
                db.execute("INSERT INTO meta (key, value) VALUES ('events_dropped_through', ?) "
                           "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                           (str(horizon),))
            return event_id

    def events_after(self, after: int, limit: int = 1000) -> list[tuple[int, JSONObject]]:
        """(id, body) of logged events with id > `after`, oldest first."""
        with self._read() as db:
            rows = db.execute("SELECT id, body FROM events WHERE id > ? ORDER BY id LIMIT ?",
                              (after, limit))
            return [(int(r["id"]), json.loads(r["body"])) for r in rows]

    def event_horizon(self) -> tuple[int, int]:
        """(highest id dropped by retention, highest id written); 0 when none."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key='events_dropped_through'"
                             ).fetchone()
            last = db.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
            return (int(row["value"]) if row else 0, int(last["seq"]) if last else 0)


def _expires_ts(expires_at: str | None) -> float | None:
    if not expires_at:
        return None
    return parse_time(expires_at).timestamp()


def _json_or_none(value: Any) -> str | None:
    return json.dumps(value) if value is not None else None


def task_dict(row: sqlite3.Row) -> JSONObject:
    """A task as the API, the events and the CLI see it."""
    error = {"code": row["error_code"], "message": row["error_message"]} \
        if row["error_code"] else None
    return {
        "id": row["id"], "node": row["node"], "type": row["type"], "state": row["state"],
        "source": row["source"], "created_at": row["created_at"],
        "updated_at": row["updated_at"], "dispatched_at": row["dispatched_at"],
        "timeout": row["timeout"], "expires_at": row["expires_at"],
        "deadline": row["deadline"], "exit_code": row["exit_code"], "error": error,
        "result": json.loads(row["result"]) if row["result"] else None,
        "spec": json.loads(row["spec"]) if row["spec"] else None,
        "job": row["job_id"], "step": row["step"],
    }


def node_dict(row: sqlite3.Row) -> JSONObject:
    return {
        "node": row["node"], "state": row["state"], "first_seen": row["first_seen"],
        "last_seen": row["last_seen"], "changed_at": row["changed_at"], "agent": row["agent"],
        "facts": json.loads(row["facts"]) if row["facts"] else None,
        "running": json.loads(row["running"]) if row["running"] else [],
    }


def now() -> float:
    """Wall-clock seconds: deadlines are kept in the file and survive a restart."""
    return time.time()


def _token_dict(row: sqlite3.Row) -> JSONObject:
    """A token as `edgerun token list` shows it: never its hash."""
    return {"id": row["id"], "name": row["name"], "role": row["role"], "hint": row["hint"],
            "created_at": row["created_at"], "created_by": row["created_by"],
            "last_used_at": row["last_used_at"], "revoked_at": row["revoked_at"]}
