"""The store's records: a task row and a node row, typed, as the rest of the scheduler
reads them; JSON only at the edge (`to_json`: what the API, the events and the CLI see).

`TaskRow.from_row` / `NodeRow.from_row` read a database row (sqlite3.Row, db.PgRow, or a
dict of its columns, advance.py) by column name. `FleetTaskRow` is a task row read by the
fleet's queries (store/fleetdb.py), which also carry its claim (`not_before`) and its
position (`seq`); its JSON has those two keys more, as it always had.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self

from edgerun.protocol import FINAL_STATES, JSONObject
from edgerun.protocol.messages import Error

FINAL: tuple[str, ...] = tuple(sorted(str(state) for state in FINAL_STATES))
"""The protocol's final states as text, in order: the one list the store's queries take."""


class Row(Protocol):
    """A row read by column name (sqlite3.Row, db.PgRow, a dict of columns)."""

    def __getitem__(self, key: str) -> Any: ...


def _json(text: str | None) -> Any:
    return json.loads(text) if text else None


@dataclass(frozen=True, slots=True)
class TaskRow:
    """One task of one node, as stored."""

    id: str
    node: str
    type: str | None
    state: str
    source: str | None
    created_at: str
    updated_at: str
    dispatched_at: str | None
    timeout: float | None
    expires_at: str | None
    deadline: float | None
    exit_code: int | None
    error: Error | None
    result: JSONObject | None
    spec: JSONObject | None
    job: str | None
    step: int | None
    attempt: int
    parent: str | None
    root: str | None
    retry: JSONObject | None
    rollout: str | None
    hold: str | None
    """Only while queued (None once the task has left the queue)."""

    @classmethod
    def from_row(cls, row: Row) -> Self:
        return cls(**_task_fields(row))

    @property
    def final(self) -> bool:
        return self.state in FINAL

    @property
    def key(self) -> tuple[str, str]:
        return self.node, self.id

    def to_json(self) -> JSONObject:
        """The task as the API, the events and the CLI see it."""
        return {
            "id": self.id, "node": self.node, "type": self.type, "state": self.state,
            "source": self.source, "created_at": self.created_at,
            "updated_at": self.updated_at, "dispatched_at": self.dispatched_at,
            "timeout": self.timeout, "expires_at": self.expires_at,
            "deadline": self.deadline, "exit_code": self.exit_code,
            "error": self.error.to_dict() if self.error is not None else None,
            "result": self.result, "spec": self.spec, "job": self.job, "step": self.step,
            "attempt": self.attempt, "parent": self.parent, "root": self.root,
            "retry": self.retry, "rollout": self.rollout, "hold": self.hold,
        }


@dataclass(frozen=True, slots=True)
class FleetTaskRow(TaskRow):
    """A task row with its claim (`not_before`: when a claim or a back-off lapses) and
    its position in the store (`seq`)."""

    not_before: float | None
    seq: int

    @classmethod
    def from_row(cls, row: Row) -> Self:
        return cls(**_task_fields(row), not_before=row["not_before"], seq=int(row["seq"]))

    def to_json(self) -> JSONObject:
        return {**TaskRow.to_json(self), "not_before": self.not_before, "seq": self.seq}


def _task_fields(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"], "node": row["node"], "type": row["type"], "state": row["state"],
        "source": row["source"], "created_at": row["created_at"],
        "updated_at": row["updated_at"], "dispatched_at": row["dispatched_at"],
        "timeout": row["timeout"], "expires_at": row["expires_at"],
        "deadline": row["deadline"], "exit_code": row["exit_code"],
        "error": Error(row["error_code"], row["error_message"]) if row["error_code"]
        else None,
        "result": _json(row["result"]), "spec": _json(row["spec"]),
        "job": row["job_id"], "step": row["step"], "attempt": row["attempt"] or 1,
        "parent": row["parent_id"], "root": row["root_id"], "retry": _json(row["retry"]),
        "rollout": row["rollout_id"],
        "hold": row["hold"] if row["state"] == "queued" else None,
    }


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One node of the registry, as its last status message described it."""

    node: str
    state: str
    first_seen: str
    last_seen: str
    changed_at: str
    agent: str | None
    facts: JSONObject | None
    running: Sequence[Any]

    @classmethod
    def from_row(cls, row: Row) -> Self:
        return cls(node=row["node"], state=row["state"], first_seen=row["first_seen"],
                   last_seen=row["last_seen"], changed_at=row["changed_at"],
                   agent=row["agent"], facts=_json(row["facts"]),
                   running=json.loads(row["running"]) if row["running"] else [])

    def to_json(self) -> JSONObject:
        """The node as the API, the events and the CLI see it."""
        return {"node": self.node, "state": self.state, "first_seen": self.first_seen,
                "last_seen": self.last_seen, "changed_at": self.changed_at,
                "agent": self.agent, "facts": self.facts, "running": self.running}


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job: its targets and steps as created, and its tasks (empty when read without)."""

    id: str
    created_at: str
    nodes: list[str]
    steps: list[JSONObject]
    tasks: list[TaskRow]

    @classmethod
    def from_row(cls, row: Row, tasks: list[TaskRow]) -> Self:
        return cls(id=row["id"], created_at=row["created_at"], nodes=json.loads(row["nodes"]),
                   steps=json.loads(row["steps"]), tasks=tasks)
