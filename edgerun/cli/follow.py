"""Dispatch, then follow: live output while tasks run, their final states, an exit code."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO
from urllib.parse import quote

from edgerun.cli.client import Client, EventStream, ServiceUnreachable
from edgerun.cli.render import Prefixer
from edgerun.control.errors import SchedulerError
from edgerun.control.retries import will_retry
from edgerun.protocol import State, is_final

# What `edgerun run` on one node exits with when the task has no exit code of its own.
STATE_EXIT = {State.TIMED_OUT: 124, State.LOST: 125, State.REJECTED: 126, State.CANCELED: 130}
FAILED = 1
MAX_RESUMES = 10_000


class Resuming:
    """An event stream that, cut off as a slow reader (a fan-out's burst of events can
    outrun a terminal), opens again from the last event id it read: the service's log
    gives what was missed, so nothing is lost or seen twice."""

    def __init__(self, client: Client, **query: Any) -> None:
        self.client, self.query = client, query
        self.stream: EventStream = client.events(**query)
        # the last event handed on (not the error's); at first where the stream began
        # (its hello, read when it opened)
        self.last_id: int | None = self.stream.last_id

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _ in range(MAX_RESUMES):
            cut = False
            for event in self.stream:
                kind = event.get("kind")
                if kind == "error" and event.get("code") == "slow_reader" \
                        and self.last_id is not None:
                    cut = True
                    break
                if isinstance(event.get("_id"), int) and kind not in ("error", "reset"):
                    self.last_id = event["_id"]
                yield event
            if not cut:
                return
            self.stream.close()
            self.stream = EventStream(self.client, self.query, last_event_id=self.last_id)

    def close(self) -> None:
        self.stream.close()


def _final(task: dict[str, Any]) -> bool:
    return is_final(State(task["state"]))


def attempt(task: dict[str, Any]) -> int:
    return int(task.get("attempt") or 1)


class Progress:
    """`37/200 done, 2 failed` on stderr while a fan-out runs: rewritten in place on a
    terminal, else a line when the count changed and at least `every` seconds passed."""

    def __init__(self, total: int, err: TextIO | None = None, every: float = 2.0) -> None:
        self.total, self.err, self.every = total, err or sys.stderr, every
        self.tty = self.err.isatty()
        self._shown: tuple[int, int] | None = None
        self._at = 0.0

    def show(self, done: int, failed: int, final: bool = False) -> None:
        if self.total < 2 or (done, failed) == self._shown:
            return
        now = time.monotonic()
        if not final and not self.tty and now - self._at < self.every:
            return
        self._shown, self._at = (done, failed), now
        line = f"{done}/{self.total} done, {failed} failed"
        if self.tty:
            self.err.write(f"\r\033[K{line}" + ("\n" if final else ""))
        else:
            self.err.write(f"edgerun: {line}\n")
        self.err.flush()


def dispatch_and_follow(client: Client, ids: Sequence[str], send: Callable[[], list[Any]],
                        prefixer: Prefixer | None) -> list[dict[str, Any]]:
    """Subscribe to the events of `ids`, call `send` (which returns the created tasks),
    and read events until every task is final. Returns the tasks' final records.
    Ctrl-C prints the tasks it leaves running, then goes on as KeyboardInterrupt."""
    # only the events that end a task (and alerts): a fan-out to 10,000 nodes sends the
    # follower 10,000 events, not 50,000
    stream = Resuming(client, task=list(ids), channel=["tasks", "output"], settled="true")
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    pending: set[tuple[str, str]] = set()
    try:
        created = send()
        latest = {(t["node"], t["id"]): t for t in created}
        pending = {key for key, t in latest.items() if not _final(t)}
        progress = Progress(len(latest))
        # counted as they change, not recounted per event: a fan-out to 10,000 nodes
        # would otherwise cost 10,000 x 10,000 steps here
        failed = sum(1 for t in latest.values() if _final(t) and t["state"] != State.SUCCEEDED)
        open_on: dict[str, int] = {}
        for node, _task_id in pending:
            open_on[node] = open_on.get(node, 0) + 1
        for event in stream if pending else ():
            if event.get("kind") == "error":
                raise ServiceUnreachable(f"the service closed the event stream: "
                                         f"{event.get('error')}; see `edgerun tasks`")
            if event.get("kind") == "output" and prefixer is not None:
                prefixer.write(event["node"], event["stream"], event["data"])
            elif event.get("kind") == "task_event":
                task = event["task"]
                # a retry attempt (retries.py) carries on its first attempt's place
                key = (task["node"], task.get("root") or task["id"])
                if key not in latest or attempt(task) < attempt(latest[key]):
                    continue
                if key not in pending and attempt(task) == attempt(latest[key]):
                    continue  # ended already: a final is final
                if event.get("alert") and prefixer is not None:
                    sys.stderr.write(f"edgerun: {task['node']}: {event['alert']['message']}\n")
                    sys.stderr.flush()
                latest[key] = task
                if _final(task) and not will_retry(task):
                    pending.discard(key)
                    failed += task["state"] != State.SUCCEEDED
                    open_on[key[0]] -= 1
                    progress.show(len(latest) - len(pending), failed, not pending)
                    if prefixer is not None and open_on[key[0]] == 0:
                        prefixer.flush(task["node"])
            if not pending:
                break
        if pending:
            raise ServiceUnreachable("the service closed the event stream before every task "
                                     "finished; see `edgerun tasks`")
    except KeyboardInterrupt:
        left = sorted(pending)
        if left:
            sys.stderr.write(f"\nedgerun: interrupted; {len(left)} task(s) go on:\n")
            for node, task_id in left:
                sys.stderr.write(f"  {task_id} on {node}   (edgerun logs -f {task_id} "
                                 f"--node {node}; edgerun cancel {task_id})\n")
            sys.stderr.flush()
        raise
    finally:
        stream.close()
    tasks = list(latest.values())
    if prefixer is not None:
        _replay_missed_output(client, tasks, prefixer)
    return tasks


def _replay_missed_output(client: Client, tasks: Sequence[dict[str, Any]],
                          prefixer: Prefixer) -> None:
    """Live output is best effort (QoS 0): show the recorded tail where none came live.
    Events carry no output tails, so the tail is read from the task's detail."""
    for task in tasks:
        result = task.get("result") or {}
        if task["node"] in prefixer.seen or not any((result.get("output") or {}).values()):
            continue
        try:
            [detail] = client.get(f"/tasks/{quote(task['id'], safe='')}",
                                  node=task["node"])["tasks"]
        except (SchedulerError, ValueError):
            continue
        result = detail.get("result") or {}
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
