"""Follows every unfinished task to a final state: deadlines, `lost`, expiry.

`judge` is the rule, pure; `Tracker` is a thread that asks the store for tasks
past their deadline or expiry now and then and hands each verdict to the
service, which applies it through the store's state machine (so a final update
that raced the verdict wins).

The tracker runs the periodic duties only while `store.leads()`: always on
SQLite; on PostgreSQL on the one `serve` instance holding the duties lock
(cluster.py), which moves to another instance within a tick of its holder's
death. On taking the lead it calls `duties(True)` (the service re-sends what was
never sent), then `duties(False)` every `sweep_every` seconds, and it prunes
finished tasks older than `keep_days` (0: never) every `prune_every` seconds.

The rules (scheduler/README.md, "Deadlines, lost and expiry"):
- `running`: no final update by running + timeout + grace: `lost`, code `timeout`;
- `accepted`: the same deadline, but only while the node is not online (an
  online agent still holds the task in its queue and will report);
- `dispatched`: past the task's `expires_at`: `lost`, code `expired` (the node
  stayed offline; the agent would reject it anyway); past dispatch + timeout +
  grace while the node is online: `lost`, code `timeout` (the task vanished).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgerun.control.errors import SchedulerError
from edgerun.protocol import ErrorCode, State, parse_time
from edgerun.scheduler.store.records import TaskRow
from edgerun.scheduler.store.tasks import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    code: ErrorCode
    message: str


def judge(task: TaskRow, online: bool, now: float) -> Verdict | None:
    """Whether an unfinished task is lost now, and why; None: not yet."""
    state, node = task.state, task.node
    deadline, expires = task.deadline, _expires(task.expires_at)
    late = deadline is not None and now >= deadline
    if state == State.DISPATCHED:
        if expires is not None and now >= expires:
            where = "was online but never took it" if online else "stayed offline"
            return Verdict(ErrorCode.EXPIRED, f"node {node} {where} until the task expired at "
                                              f"{task.expires_at}")
        if late and online:
            return Verdict(ErrorCode.TIMEOUT, f"node {node} is online but never acknowledged "
                                              f"the task within its timeout and grace")
        return None
    if state == State.ACCEPTED and late and not online:
        return Verdict(ErrorCode.TIMEOUT, f"node {node} accepted the task, then went offline; "
                                          f"no final update came within its timeout and grace")
    if state == State.RUNNING and late:
        where = "is online" if online else "is offline"
        return Verdict(ErrorCode.TIMEOUT, f"no final update from node {node} within the task's "
                                          f"timeout and grace (the node {where}); it may have "
                                          f"died mid-task")
    return None


def _expires(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return parse_time(text).timestamp()
    except ValueError:
        return None


class Tracker:
    """Every `interval` seconds: judge the due tasks, report verdicts to `on_lost`."""

    def __init__(self, store: Store, online: Callable[[], set[str]],
                 on_lost: Callable[[TaskRow, Verdict], None], stop: threading.Event,
                 interval: float = 1.0, *, duties: Callable[[bool], None] | None = None,
                 keep_days: float = 0.0, prune_every: float = 3600.0,
                 sweep_every: float = 10.0) -> None:
        self.store, self.online, self.on_lost = store, online, on_lost
        self.stop, self.interval = stop, interval
        self.duties, self.keep_days = duties, keep_days
        self.prune_every, self.sweep_every = prune_every, sweep_every
        self.leading = False
        self._next_prune = 0.0
        self._next_sweep = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tracker", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def check(self, now: float | None = None) -> int:
        """One pass; returns how many verdicts were handed on."""
        now = time.time() if now is None else now
        due = self.store.due(now)
        if not due:
            return 0
        online = self.online()
        count = 0
        for task in due:
            verdict = judge(task, task.node in online, now)
            if verdict is not None:
                self.on_lost(task, verdict)
                count += 1
        return count

    def tick(self, now: float | None = None) -> bool:
        """One round of the duties if this instance leads; returns whether it does."""
        now = time.monotonic() if now is None else now
        leading = self.store.leads()
        if leading != self.leading:
            self.leading = leading
            if leading:
                log.info("this instance runs the periodic duties now")
                self._next_sweep = now + self.sweep_every
                if self.duties is not None:
                    self.duties(True)
            else:
                log.warning("this instance no longer runs the periodic duties")
        if not leading:
            return False
        self.check()
        if self.duties is not None and now >= self._next_sweep:
            self._next_sweep = now + self.sweep_every
            self.duties(False)
        if self.keep_days > 0 and now >= self._next_prune:
            self._next_prune = now + self.prune_every
            pruned = self.store.prune(self.keep_days)
            if any(pruned.values()):
                log.info("retention (%g days): pruned %d tasks, %d updates, %d jobs",
                         self.keep_days, pruned["tasks"], pruned["updates"], pruned["jobs"])
        return True

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except SchedulerError as exc:
                log.error("tracker: %s", exc)
            except Exception:  # the tracker must outlive a bug in one pass
                log.exception("tracker: unexpected error")
            if self.stop.wait(self.interval):
                return
