"""Many state changes of task rows worked out in memory, so that each row is written once.

The worker records what arrived together in one transaction (core.py). In a fan-out
an agent answers `accepted`, `running` and its final within milliseconds, so one
batch often holds several updates of one task; one guarded `UPDATE ... RETURNING *`
each wrote the row three times and parsed three copies of it. Instead the store
reads the batch's rows once (`FOR UPDATE`: no other instance can move them until
COMMIT; SQLite's writers are serialised anyway), steps each row through the
contract's state machine here, in arrival order, exactly as the guarded UPDATEs
would have, and writes each changed row once (the store's named query `write_task`).
Every step keeps its own history row and its own event, with the task as it was
after that step.

What cannot be stepped here (a task not in the store yet, an update the state
machine refuses: a duplicate or a late one) is left to the one-by-one path
(`Store.apply_update`), after these writes and in arrival order. That keeps the
outcome of sequential application: states only move forward, so an update refused
here is refused there too, and there its first copy is still kept in the history.

Pure: no I/O; the rows come in as dicts of their columns, the tasks go out as the
store's records (records.TaskRow).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edgerun.protocol import DEFAULT_TIMEOUT_S, JSONObject, State, Update, is_final
from edgerun.scheduler.store.records import TaskRow

RESULT_FIELDS = ("exit_code", "stdout", "stderr", "truncated", "duration_s", "bytes", "sha256",
                 "dest", "output_dropped")
NEW = "__new__"  # a row known only so far (an update came before the task)
# every column a change of state may set, in the order of `write_task`'s arguments
WRITTEN = ("previous", "state", "updated_at", "dispatched_at", "deadline", "expires_ts",
           "exit_code", "error_code", "error_message", "result")

Key = tuple[str, str]
Row = dict[str, Any]
Sources = Callable[[State], tuple[str, ...]]


@dataclass(frozen=True)
class Step:
    """One applied change: the batch position it came from, the state it left (None:
    first seen), the task after it, and its history row (None: none is kept)."""

    index: int
    previous: str | None
    task: TaskRow
    history: tuple[Any, ...] | None


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    writes: list[tuple[Any, ...]] = field(default_factory=list)
    """`write_task`'s arguments, one per changed row."""
    rest: list[int] = field(default_factory=list)
    """Batch positions to apply one by one, in this order."""


def update_columns(update: Update, body: JSONObject, grace: float, now: float,
                   timeout: float | None) -> Row:
    """The columns an agent's update sets: a final one keeps its result, an open one
    gets the deadline now + its timeout + grace. `exit_code` None means: keep the row's."""
    error = update.error
    cols: Row = {"error_code": error.code if error else None,
                 "error_message": error.message if error else None,
                 "exit_code": update.exit_code, "expires_ts": None}
    if is_final(update.state):
        cols["deadline"] = None
        cols["result"] = json.dumps({k: body[k] for k in RESULT_FIELDS if k in body})
    else:
        cols["deadline"] = now + (timeout if timeout is not None else DEFAULT_TIMEOUT_S) + grace
    return cols


class Stepper:
    """Rows read for a batch, stepped in memory; `finish()` says what to write."""

    def __init__(self, rows: dict[Key, Row], sources: Sources, stamp: str) -> None:
        self.rows, self.sources, self.stamp = rows, sources, stamp
        self._changed: dict[Key, Row] = {}
        self._base: dict[Key, TaskRow] = {}  # the task as read, parsed once
        self.plan = Plan()

    def current(self, key: Key) -> Row | None:
        return self._changed.get(key) or self.rows.get(key)

    def step(self, index: int, key: Key, state: State, cols: Row,
             history: tuple[Any, ...] | None) -> bool:
        """Move `key`'s row to `state` with `cols` if the state machine allows it from
        where it is now; False (and the batch position left to the one-by-one path) if
        the row is unknown or the move refused."""
        row = self.current(key)
        if row is None or row["state"] not in self.sources(state):
            self.plan.rest.append(index)
            return False
        if key not in self._base:
            self._base[key] = TaskRow.from_row(row)
        row = {**row, **{k: v for k, v in cols.items() if v is not None or k != "exit_code"}}
        previous = row["state"]
        row.update(previous=previous, state=str(state), updated_at=self.stamp)
        self._changed[key] = row
        self.plan.steps.append(Step(index, None if previous == NEW else previous,
                                    self._task(key, row), history))
        return True

    def _task(self, key: Key, row: Row) -> TaskRow:
        """The task after a step, as `TaskRow.from_row` makes it from the row, with the
        spec and retry policy (which no step changes) parsed once a row, not once a step."""
        base = self._base[key]
        return replace(TaskRow.from_row({**row, "spec": None, "retry": None}),
                       spec=base.spec, retry=base.retry)

    def finish(self) -> Plan:
        self.plan.writes = [(*(row[c] for c in WRITTEN), node, task_id)
                            for (node, task_id), row in self._changed.items()]
        return self.plan


def by_key(rows: Sequence[Any]) -> dict[Key, Row]:
    return {(r["node"], r["id"]): dict(zip(r.keys(), r, strict=True)) for r in rows}
