"""Fleet operations inside the service: per-node pacing, liveness, retries, and the
ticks that drive rollouts and back-offs (scheduler/README.md, "Fleet operations").

Everything here runs on the service's single worker thread, except
`on_change` (which only queues work) and `call` (which hands work to the worker
and waits for its answer). One worker means no two decisions about the same
node or rollout ever race.

- **Pacing**: a task is stored `queued` first; it is sent only while the node
  has fewer than `pace` tasks outstanding (dispatched, accepted, running, or
  claimed for sending and not yet confirmed by the broker). Each task that
  ends lets the next queued one of that node go, oldest first. So a backlog
  never fills an agent's queue (`busy`), as long as `pace` is below the agents'
  --queue-size. The claim is a row in the store (hold `sending:{instance}`),
  taken with the node's row locked, so several instances on one PostgreSQL
  never send a task twice nor more than `pace` together. A live instance
  renews its claims every tick from the ticker's own thread (a worker busy for
  a while never lets them lapse); those of an instance that died lapse after
  `stale_after` seconds and the task goes again.
- **Liveness**: when a node goes offline (its Last Will) or comes back, every
  follower of its tasks in flight is told at once: a `task_event` whose state
  did not change, with an `alert`. After `offline_grace` seconds offline, its
  accepted and running tasks end `lost`; a final update that still arrives
  later replaces `lost` (the store's state machine) and is kept in the history.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from edgerun.control.errors import SchedulerError
from edgerun.control.retries import RetryPolicy, attempt_id, policy_of, root_of, will_retry
from edgerun.protocol import ErrorCode, State, Task, format_time
from edgerun.scheduler.fleet.tracker import Verdict
from edgerun.scheduler.store.fleetdb import SENDING, AttemptState, FleetDB
from edgerun.scheduler.store.records import FleetTaskRow, TaskRow
from edgerun.scheduler.store.tasks import Change

if TYPE_CHECKING:
    from edgerun.scheduler.core import Core

log = logging.getLogger(__name__)


class Extension(Protocol):
    """What jobs and rollouts add to the fleet's rounds (registered with `Fleet.extend`)."""

    def on_final(self, task: TaskRow) -> None:
        """A task ended (on the worker, after pacing and retries had their turn)."""

    def tick(self) -> None:
        """Every tick, on the worker."""

    def restart(self) -> None:
        """Once after a start, on the worker."""


class Fleet:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.db = FleetDB(core.store)
        self.pace = max(1, int(core.cfg.pace))
        self.offline_grace = float(core.cfg.offline_grace)
        self.claim_ttl = max(float(core.cfg.stale_after), 5.0)
        self.owner = core.store.origin or "local"
        self._extensions: list[Extension] = []
        # claimed for sending and not yet confirmed: (node, id) -> the row's seq, renewed
        # by the ticker; nodes left with queued tasks beyond their pace at the last claim
        self._claims: dict[tuple[str, str], int] = {}
        self._claims_lock = threading.Lock()
        self._backlog: set[str] = set()
        self._thread: threading.Thread | None = None
        # tasks that ended, waiting for their follow-up (pump, retry, job): taken by one
        # piece of work on the worker however many pile up meanwhile
        self._finals: list[tuple[str, str]] = []
        self._finals_lock = threading.Lock()
        core.on_change(self.on_change)

    def extend(self, extension: Extension) -> None:
        self._extensions.append(extension)

    # --- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._tick_loop, name="fleet-ticker",
                                        daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _tick_loop(self) -> None:
        while not self.core.stopping.wait(self.core.cfg.tick):
            try:
                with self._claims_lock:
                    seqs = list(self._claims.values())
                self.db.renew_claims(self.owner, time.time() + self.claim_ttl, seqs)
            except SchedulerError as exc:
                log.error("fleet ticker: %s", exc)
            self.core.submit(self.tick)

    def resume(self) -> None:
        """After a start: send what is free to go, pick rollouts up where they were.
        Alone on its store, claims left by this service's previous run lapse at once."""
        if not self.core.store.shared:
            self.db.drop_claims()
        self.pump_all()
        for extension in self._extensions:
            extension.restart()

    # --- pacing ---------------------------------------------------------------------------
    def pump(self, node: str) -> int:
        """Send the node's free queued tasks while it has room; returns how many."""
        claimed = self.db.claim(node, self.pace, time.time(), self.claim_ttl, self.owner)
        self._claimed(claimed)
        if node in self.db.waiting:
            self._backlog.add(node)  # the next end or confirm of the node looks again
        else:
            self._backlog.discard(node)
        for row in claimed:
            self._send(node, self.core.task_of(row.spec))
        return len(claimed)

    def _claimed(self, rows: list[FleetTaskRow]) -> None:
        with self._claims_lock:
            for row in rows:
                self._claims[row.key] = row.seq

    def _send(self, node: str, task: Task) -> None:
        expires = task.expires_at.timestamp() if task.expires_at else None
        self.core.send(node, task, lambda: self.core.submit(
            lambda: self._dispatched(node, task.id, task.timeout, expires)))

    def _dispatched(self, node: str, task_id: str, timeout: float,
                    expires_ts: float | None) -> None:
        """The broker took the task: it now counts as dispatched; maybe room for more."""
        self.core.metrics.dispatched.inc()
        with self._claims_lock:
            self._claims.pop((node, task_id), None)
        # the confirms of one transaction (the worker's batch) are recorded together at
        # its end: one round trip for all on PostgreSQL (Store.mark_dispatched_many)
        with self.core.store.transaction() as tx:
            pending = tx.scratch.get("confirms")
            if pending is None:
                pending = tx.scratch["confirms"] = []
                tx.before_commit(lambda: self._record_confirms(pending))
            pending.append((node, task_id, time.time() + timeout + self.core.cfg.grace,
                            expires_ts))

    def _record_confirms(self, confirms: list[tuple[str, str, float, float | None]]) -> None:
        for change in self.core.store.mark_dispatched_many(confirms):
            if change is not None:
                self.core.emit(change)
        for node in dict.fromkeys(node for node, *_rest in confirms):
            if node in self._backlog:  # else nothing of it waits here (the tick finds
                self.pump(node)        # other instances')

    def resend_unaccepted(self, node: str) -> None:
        """The node came online: its `dispatched` tasks go again (--resend-unaccepted)."""
        for row in self.core.store.unaccepted(node):
            self._send(node, self.core.task_of(row.spec))

    def pump_nodes(self, nodes: list[str]) -> None:
        """`pump` for many nodes at once (a fan-out): a few statements per 500 nodes."""
        claimed = self.db.claim_many(nodes, self.pace, time.time(), self.claim_ttl,
                                     self.owner)
        self._claimed(claimed)
        self._backlog.difference_update(nodes)
        self._backlog.update(self.db.waiting)
        for row in claimed:
            self._send(row.node, self.core.task_of(row.spec))

    def pump_all(self) -> None:
        self.pump_nodes(self.db.nodes_with_ready(time.time(), self.pace))

    @staticmethod
    def is_sending(task: FleetTaskRow | AttemptState) -> bool:
        """Claimed for sending and not yet confirmed by the broker (the claim not lapsed)."""
        return (task.state == State.QUEUED and (task.hold or "").startswith(SENDING)
                and float(task.not_before or 0) > time.time())

    def cancel_queued(self, node: str, task_id: str, why: str) -> None:
        """A cancel request for a task still queued here: never sent, so canceled in the
        store; one being handed to the broker gets a `cancel` after it."""
        current = self.db.task(node, task_id)
        if current is not None and self.is_sending(current):
            self.core.send_cancel(node, task_id)
            return
        change = self.core.store.cancel_queued(node, task_id, "canceled", why)
        if change is not None:
            self.core.emit(change)

    # --- after every change ------------------------------------------------------------------
    def on_change(self, change: Change) -> None:
        """Called for every task change (any thread): work for final states is queued,
        the finals that end together in one piece of work (`_after_finals`)."""
        task = change.task
        if task.final:
            with self._finals_lock:
                self._finals.append(task.key)
                if len(self._finals) > 1:
                    return  # the work queued for the first takes this one too
            self.core.submit(self._after_finals)

    def _after_finals(self) -> None:
        """What follows tasks' ends: their nodes' next tasks (a few statements for all),
        then each one's retry and its job's next step."""
        with self._finals_lock:
            finals, self._finals = self._finals, []
        if not finals:
            return
        tasks = [t for t in self.core.store.tasks_of(finals) if t.final]
        self.pump_nodes(list(dict.fromkeys(t.node for t in tasks)))
        for task in tasks:
            if will_retry(task.to_json()):
                self._retry(task)
            for extension in self._extensions:
                extension.on_final(task)

    # --- retries ------------------------------------------------------------------------------
    def with_retry(self, change: Change, policy: RetryPolicy) -> Change:
        """Give a task just stored its retry policy; the change as followers should see it."""
        task = change.task
        self.db.set_fleet(task.node, task.id, retry=policy.to_json())
        stored = self.db.task(task.node, task.id)
        return Change(change.previous, stored if stored is not None else task)

    def _retry(self, task: TaskRow) -> None:
        policy = policy_of(task.to_json())
        assert policy is not None and task.spec is not None
        node, attempt, root = task.node, task.attempt + 1, root_of(task.to_json())
        new_id = attempt_id(root, attempt)
        if self.db.task(node, new_id) is not None:
            return  # made already (a late final update replaced `lost`)
        new = self.core.task_of({**task.spec, "id": new_id})
        if task.state == State.LOST:
            # ahead of the new attempt on the same topic: an agent that was only cut off
            # kills the lost attempt before it takes the next one
            self.core.send_cancel(node, task.id)
        change = self.core.store.add_task(node, new, source=task.source or "api")
        if change is None:
            return
        wait = policy.wait(attempt)
        self.db.set_fleet(node, new_id, attempt=attempt, parent_id=task.id, root_id=root,
                          retry=policy.to_json(), rollout_id=task.rollout,
                          not_before=time.time() + wait)
        log.info("task %s on node %s ended %s: attempt %d (%s) in %.1f s", task.id, node,
                 task.state, attempt, new_id, wait)
        created = self.db.task(node, new_id)
        assert created is not None
        self.core.emit(Change(None, created))

    # --- liveness -----------------------------------------------------------------------------
    def on_status(self, node: str, previous: str | None, state: str) -> None:
        """A node changed state: tell the followers of its tasks in flight at once."""
        if previous is None or previous == state:
            return
        for task in self.db.in_flight(node):
            if state == "offline":
                self._alert(task, "node_offline",
                            f"node {node} went offline (its Last Will) with this task "
                            f"{task.state}; unless the node returns within "
                            f"{self.offline_grace:g} s the task ends lost")
            elif state == "online":
                self._alert(task, "node_online", f"node {node} is back online")

    def _alert(self, task: FleetTaskRow, code: str, message: str) -> None:
        event = {"v": 1, "kind": "task_event", "at": format_time(), "node": task.node,
                 "id": task.id, "previous": task.state, "state": task.state,
                 "alert": {"code": code, "message": message}, "task": task.to_json()}
        self.core.publish(event, "tasks", task.node, task.state)

    def _stranded(self) -> None:
        now = time.time()
        cutoff = format_time(datetime.fromtimestamp(now - self.offline_grace, UTC))
        for task in self.db.stranded(cutoff):
            if task.state == State.DISPATCHED:
                verdict = Verdict(ErrorCode.TIMEOUT, f"node {task.node} went offline "
                                  f"before it took the task and stayed away for more than "
                                  f"{self.offline_grace:g} s; the rollout goes on without it")
                self.core.send_cancel(task.node, task.id)
            else:
                verdict = Verdict(ErrorCode.TIMEOUT, f"node {task.node} went offline "
                                  f"(its Last Will) with the task {task.state} and did "
                                  f"not return within {self.offline_grace:g} s "
                                  f"(--offline-grace)")
            self.core.lose(task, verdict)

    def _expire_held(self) -> None:
        for task in self.db.expired_queued(format_time()):
            change = self.core.store.mark_lost(
                task.node, task.id, "queued", ErrorCode.EXPIRED,
                f"the task waited here (node {task.node} had {self.pace} tasks "
                f"outstanding, or it was held) until it expired at {task.expires_at}")
            if change is not None:
                self.core.emit(change)

    # --- the tick ---------------------------------------------------------------------------------
    def tick(self) -> None:
        steps: list[Callable[[], None]] = [self._stranded, self._expire_held, self.pump_all,
                                           *(extension.tick for extension in self._extensions)]
        for step in steps:
            try:
                step()
            except SchedulerError as exc:
                log.error("fleet tick: %s", exc)
