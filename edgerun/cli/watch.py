"""Following what may change under the CLI's feet: retries and rollouts.

`run --retries` says each retry as it happens; a followed rollout says when it is paused,
resumed or aborted, and its progress line is the rollout's own counts (so the last line
agrees with the summary: skipped targets are skipped, not failed). An abort ends in one
line for every target it skipped, not one line each.

The event stream is read on its own thread ("events"), which owns it from the moment the
subscription is made (before the tasks are sent, so no event falls between); the command's
thread reads the rollout's state every second meanwhile.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from edgerun.cli.client import Client, EventStream, ServiceUnreachable, quoted
from edgerun.cli.render import Prefixer
from edgerun.control.retries import policy_of, will_retry
from edgerun.protocol import State, is_final

POLL_S = 1.0
SKIPPED = "rollout_aborted"


def _final(task: dict[str, Any]) -> bool:
    return is_final(State(task["state"]))


def _attempt(task: dict[str, Any]) -> int:
    return int(task.get("attempt") or 1)


class Line:
    """`37/200 done, 2 failed[, 5 skipped]` on stderr: in place on a terminal, else a line
    when the figures changed and `every` seconds passed (always at the end)."""

    def __init__(self, total: int, err: TextIO, every: float = 2.0) -> None:
        self.total, self.err, self.every = total, err, every
        self.tty = err.isatty()
        self._shown: tuple[int, int, int] | None = None
        self._at = 0.0

    def show(self, done: int, failed: int, skipped: int = 0, final: bool = False) -> None:
        figures = (done, failed, skipped)
        if self.total < 2 or figures == self._shown:
            return
        now = time.monotonic()
        if not final and not self.tty and now - self._at < self.every:
            return
        self._shown, self._at = figures, now
        line = f"{done}/{self.total} done, {failed} failed" + (
            f", {skipped} skipped" if skipped else "")
        if self.tty:
            self.err.write(f"\r\033[K{line}" + ("\n" if final else ""))
        else:
            self.err.write(f"edgerun: {line}\n")
        self.err.flush()

    def note(self, text: str) -> None:
        """A line of its own (a retry, a pause), not overwritten by the progress line."""
        self.err.write(("\r\033[K" if self.tty else "") + f"edgerun: {text}\n")
        self.err.flush()


def retry_note(task: dict[str, Any]) -> str:
    """What a follower says when an attempt ended and another follows."""
    policy = policy_of(task)
    total = (policy.retries + 1) if policy else _attempt(task) + 1
    error = task.get("error") or {}
    why = f" (exit {task['exit_code']})" if task.get("exit_code") else (
        f" ({error['code']})" if error.get("code") else "")
    return (f"{task['node']}: attempt {_attempt(task)} of {total} {task['state']}{why}; "
            f"retrying as attempt {_attempt(task) + 1}")


def _reader(stream: EventStream, out: queue.Queue[dict[str, Any] | None],
            stop: threading.Event) -> None:
    try:
        for event in stream:
            out.put(event)
            if stop.is_set():
                break
    finally:
        out.put(None)
        stream.close()


def follow(client: Client, ids: Sequence[str], send: Callable[[], list[dict[str, Any]]],
           prefixer: Prefixer | None, rollout: bool,
           err: TextIO | None = None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Subscribe, send, follow until every task (and the rollout) ended. Returns the tasks'
    final records and the rollout's last state (None without one)."""
    err = err or sys.stderr
    stream = client.events(task=list(ids), channel=["tasks", "output"])
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()
    stop = threading.Event()
    try:
        created = send()
    except BaseException:
        stream.close()
        raise
    threading.Thread(target=_reader, args=(stream, events, stop), name="events",
                     daemon=True).start()
    latest = {(t["node"], t["id"]): t for t in created}
    pending = {key for key, t in latest.items() if not _final(t)}
    line = Line(len(latest), err)
    rollout_id = next((t.get("_rollout") for t in created if t.get("_rollout")), None) \
        if rollout else None
    state: dict[str, Any] | None = None
    said = "running"
    next_poll = 0.0
    try:
        while True:
            if rollout_id is not None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL_S
                state = client.get(f"/rollouts/{quoted(rollout_id)}")
                if state["state"] != said:
                    line.note(_rollout_change(rollout_id, said, state))
                    said = state["state"]
                c = state["counts"]
                line.show(c["succeeded"] + c["failed"] + c["skipped"], c["failed"],
                          c["skipped"], final=state["state"] in ("finished", "aborted")
                          and not pending)
                if not pending and state["state"] in ("finished", "aborted"):
                    break
            elif rollout_id is None and not pending:
                break
            try:
                event = events.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if event is None:
                raise ServiceUnreachable("the service closed the event stream before every "
                                         "task finished; see `edgerun tasks`")
            if event.get("kind") == "error":
                raise ServiceUnreachable(f"the service closed the event stream: "
                                         f"{event.get('error')}; see `edgerun tasks`")
            if event.get("kind") == "output" and prefixer is not None:
                prefixer.write(event["node"], event["stream"], event["data"])
                continue
            if event.get("kind") != "task_event":
                continue
            task = event["task"]
            key = (task["node"], task.get("root") or task["id"])
            if key not in latest or _attempt(task) < _attempt(latest[key]):
                continue
            latest[key] = task
            if not _final(task):
                continue
            if will_retry(task):
                line.note(retry_note(task))
                continue
            pending.discard(key)
            if rollout_id is None:
                failed = sum(1 for t in latest.values()
                             if _final(t) and t["state"] != State.SUCCEEDED)
                line.show(len(latest) - len(pending), failed, final=not pending)
            if prefixer is not None and not any(
                    k[0] == task["node"] and k in pending for k in latest):
                prefixer.flush(task["node"])
    except KeyboardInterrupt:
        left = sorted(pending)
        if left:
            err.write(f"\nedgerun: interrupted; {len(left)} task(s) go on:\n")
            for node, task_id in left:
                err.write(f"  {task_id} on {node}   (edgerun logs -f {task_id} --node {node}; "
                          f"edgerun cancel {task_id})\n")
            err.flush()
        raise
    finally:
        stop.set()
    return list(latest.values()), state


def _rollout_change(rollout_id: str, was: str, now: dict[str, Any]) -> str:
    c = now["counts"]
    figures = (f"{c['succeeded']} succeeded, {c['failed']} failed, {c['active']} active, "
               f"{c['pending']} pending")
    if now["state"] == "paused":
        return f"rollout {rollout_id} paused ({figures}); `edgerun rollout resume {rollout_id}`"
    if now["state"] == "running" and was == "paused":
        return f"rollout {rollout_id} resumed ({figures})"
    if now["state"] == "aborted":
        return f"rollout {rollout_id} aborted: {now.get('reason') or 'by request'}"
    return f"rollout {rollout_id} {now['state']} ({figures})"


def explain_rollout(tasks: Sequence[dict[str, Any]], err: TextIO | None = None) -> None:
    """One line per target that failed; the targets an abort skipped in one line."""
    err = err or sys.stderr
    skipped = [t for t in tasks if (t.get("error") or {}).get("code") == SKIPPED]
    for task in tasks:
        if task["state"] == State.SUCCEEDED or task in skipped:
            continue
        error = task.get("error") or {}
        why = f" ({error.get('code')}): {error.get('message')}" if error else ""
        err.write(f"edgerun: {task['node']}: task {task['id']} {task['state']}{why}\n")
    if skipped:
        nodes = sorted(t["node"] for t in skipped)
        shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
        err.write(f"edgerun: {len(skipped)} target(s) skipped because the rollout was "
                  f"aborted: {shown}\n")
    err.flush()
