"""Dispatch, then follow: live output while tasks run, their final states, an exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from edgerun.protocol import State, is_final

from .client import Client, ServiceUnreachable
from .render import Prefixer

# What `edgerun run` on one node exits with when the task has no exit code of its own.
STATE_EXIT = {State.TIMED_OUT: 124, State.LOST: 125, State.REJECTED: 126, State.CANCELED: 130}
FAILED = 1


def _final(task: dict[str, Any]) -> bool:
    return is_final(State(task["state"]))


def dispatch_and_follow(client: Client, ids: Sequence[str], send: Callable[[], list[Any]],
                        prefixer: Prefixer | None) -> list[dict[str, Any]]:
    """Subscribe to the events of `ids`, call `send` (which returns the created tasks),
    and read events until every task is final. Returns the tasks' final records."""
    stream = client.events(id=list(ids), kind=["task_event", "output"])
    try:
        created = send()
        latest = {(t["node"], t["id"]): t for t in created}
        pending = {key for key, t in latest.items() if not _final(t)}
        for event in stream if pending else ():
            if event.get("kind") == "output" and prefixer is not None:
                prefixer.write(event["node"], event["stream"], event["data"])
            elif event.get("kind") == "task_event":
                task = event["task"]
                key = (task["node"], task["id"])
                if key not in latest:
                    continue
                latest[key] = task
                if _final(task):
                    pending.discard(key)
                    if prefixer is not None and not any(
                            k[0] == task["node"] and k in pending for k in latest):
                        prefixer.flush(task["node"])
            if not pending:
                break
        if pending:
            raise ServiceUnreachable("the service closed the event stream before every task "
                                     "finished; see `edgerun tasks`")
    finally:
        stream.close()
    tasks = list(latest.values())
    if prefixer is not None:
        _replay_missed_output(tasks, prefixer)
    return tasks


def _replay_missed_output(tasks: Sequence[dict[str, Any]], prefixer: Prefixer) -> None:
    """Live output is best effort (QoS 0): show the recorded tail where none came live."""
    for task in tasks:
        result = task.get("result") or {}
        if task["node"] in prefixer.seen:
            continue
        for stream in ("stdout", "stderr"):
            if result.get(stream):
                prefixer.write(task["node"], stream, result[stream])
        prefixer.flush(task["node"])


def exit_code(tasks: Sequence[dict[str, Any]]) -> int:
    """0 when all succeeded; for a single task its remote exit code, or 124 timed out,
    125 lost, 126 rejected, 130 canceled; otherwise 1."""
    if all(t["state"] == State.SUCCEEDED for t in tasks):
        return 0
    if len(tasks) == 1:
        task = tasks[0]
        if task["state"] == State.FAILED and task.get("exit_code"):
            return int(task["exit_code"]) & 0xFF or FAILED
        return STATE_EXIT.get(State(task["state"]), FAILED)
    return FAILED


def explain(tasks: Sequence[dict[str, Any]], err: TextIO | None = None) -> None:
    """One line per task that did not succeed, saying why."""
    err = err or sys.stderr
    for task in tasks:
        if task["state"] == State.SUCCEEDED:
            continue
        error = task.get("error") or {}
        why = f" ({error.get('code')}): {error.get('message')}" if error else ""
        err.write(f"edgerun: {task['node']}: task {task['id']} {task['state']}{why}\n")
