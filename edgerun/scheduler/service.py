"""`edgerun serve`: dispatch, record, follow every task to a final state.

Threads: the messenger's own (network, never blocks: it only queues), one
worker that applies everything in arrival order (messages, broker receipts,
the tracker's verdicts, job steps: core.py), the tracker, and the API's request
threads, which read the store and call `dispatch`, `cancel` and `create_job`.

The parts, each knowing only those below it: `Service` (requests in, messages
in) -> `JobRunner`, `RolloutEngine` -> `Fleet` (pacing, liveness, retries) ->
`Core` (the worker, sending, announcing) -> the store and the messenger.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgerun.control.errors import BadRequest, Conflict, NotFound
from edgerun.control.retries import check_room, parse_retry
from edgerun.protocol import (
    Cancel,
    Channel,
    ErrorCode,
    JSONObject,
    ProtocolError,
    State,
    decode_bounded,
    is_task_id,
    parse_command,
    parse_output,
    parse_status,
    parse_update,
    Update,
)
from edgerun.scheduler.core import Core, ServiceConfig
from edgerun.scheduler.fleet.jobs import JobRunner
from edgerun.scheduler.fleet.pacing import Fleet
from edgerun.scheduler.fleet.rollout import RolloutEngine
from edgerun.scheduler.fleet.targets import Known
from edgerun.scheduler.fleet.tracker import Tracker
from edgerun.scheduler.messaging import Incoming, Messenger
from edgerun.scheduler.store.cluster import Listener, relay
from edgerun.scheduler.store.events import node_event
from edgerun.scheduler.store.records import JobRow, TaskRow
from edgerun.scheduler.store.tasks import Store
from edgerun.signing import Signer

log = logging.getLogger(__name__)
_BAD = ErrorCode.BAD_MESSAGE

__all__ = ["Service", "ServiceConfig"]


class Service:
    def __init__(self, store: Store, messenger: Messenger,
                 cfg: ServiceConfig | None = None, signer: Signer | None = None) -> None:
        self.cfg = cfg or ServiceConfig()
        self.store, self.messenger = store, messenger
        self.core = Core(store, messenger, self.cfg, signer)
        self.hub, self.metrics = self.core.hub, self.core.metrics
        self.fleet = Fleet(self.core)
        self.rollouts = RolloutEngine(self.core, self.fleet)
        self.jobs = JobRunner(self.core, self.fleet)
        self.fleet.extend(self.rollouts)
        self.fleet.extend(self.jobs)
        core = self.core
        self.tracker = Tracker(store, store.online_nodes,
                               lambda t, v: core.submit(lambda: core.lose(t, v)),
                               core.stopping, self.cfg.tick, duties=self._duties,
                               keep_days=self.cfg.keep_days)
        self._listener: Listener | None = None

    # --- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        self.core.start(self._handle, self._handle_many)
        self.messenger.seed(n.node for n in self.store.nodes())  # for its re-sync
        self.messenger.start(self.core.submit)
        self.fleet.start()
        self.tracker.start()  # its first round sends again what never reached the broker
        listener: Listener | None = self.store.listen(  # other instances' (PostgreSQL only)
            lambda message: relay(self.hub, message, listener.read) if listener else None,
            lambda: self.hub.catch_up(listener.latest(), listener.read) if listener else None,
            start=False)
        if listener is not None:
            self._listener = listener.start()

    def stop(self) -> None:
        self.core.stop()
        self.tracker.join(5.0)
        self.fleet.join(5.0)
        self.messenger.stop()
        if self._listener is not None:
            self._listener.stop()
        self.hub.close()

    def health(self) -> JSONObject:
        return {"broker": str(self.messenger.url), "messenger": self.messenger.kind,
                "connected": self.messenger.connected.is_set(),
                "broker_node": self.core.broker_node(),
                "last_error": self.messenger.last_error, "store": self.store.path,
                "schema_version": self.store.schema_version}

    # --- requests (API threads) ------------------------------------------------------
    def resolve(self, targets: Sequence[str], online: bool, where: Any = None) -> list[str]:
        return self.core.resolve(targets, online, where)

    def select(self, targets: Sequence[str], online: bool, where: Any = None) -> list[Known]:
        return self.core.select(targets, online, where)

    def dispatch(self, targets: Sequence[str], online: bool, spec: Any, *,
                 where: Any = None, retry: Any = None, pump: bool = True,
                 announce: Callable[[list[TaskRow]], None] | None = None) -> list[TaskRow]:
        """Store the task for each node; the worker sends it, paced (fleet.py). `pump`
        False: the caller pumps the nodes once for many dispatches (api/batch.py).
        `announce(tasks)` runs in the same transaction (the API's audit record commits
        with the tasks: one commit a request, not two)."""
        nodes = list(dict.fromkeys(self.core.resolve(targets, online, where)))
        task = self.core.build_task(spec)
        policy = parse_retry(retry)
        check_room(task.id, policy)
        self.core.require_broker()
        # one transaction, a few multi-row statements: every task and its event, or none
        with self.store.transaction():
            changes = self.store.add_tasks(nodes, task, source="api",
                                           retry=policy.to_json() if policy else None)
            if len(changes) != len(nodes):
                made = {c.task.node for c in changes}
                node = next(n for n in nodes if n not in made)
                raise Conflict(f"task id {task.id!r} already exists for node {node}; "
                               f"leave the id out to get a fresh one")
            for change in changes:
                self.core.emit(change)
            if announce is not None:
                announce([change.task for change in changes])
            if pump:
                self.pump_after_commit(nodes)
        return [change.task for change in changes]

    def pump_after_commit(self, nodes: list[str]) -> None:
        """Once the open transaction commits, the worker sends the nodes' queued tasks."""
        self.store.after_commit(lambda: self.core.submit(lambda: self.fleet.pump_nodes(nodes)))

    def create_job(self, targets: Sequence[str], online: bool, steps: Sequence[JSONObject],
                   job_id: str | None = None, *, where: Any = None, creator: str | None = None,
                   announce: Callable[[JobRow], None] | None = None) -> JobRow:
        """An ordered list of tasks per node, or a graph of named steps (jobs.py)."""
        if job_id is not None and self.store.job_head(job_id) is not None:
            raise Conflict(f"job {job_id} already exists")
        return self.jobs.create(targets, online, steps, job_id, where=where, creator=creator,
                                announce=announce)

    def cancel(self, task_id: str, node: str | None = None) -> list[TaskRow]:
        if not is_task_id(task_id):
            raise BadRequest(f"{task_id!r} is not a task id")
        found = self.store.find(task_id, node)  # with a node: one row
        if not found:
            raise NotFound(f"no task {task_id!r}" + (f" for node {node}" if node else ""))
        open_tasks = [t for t in found if not t.final]
        if not open_tasks:
            states = ", ".join(sorted({t.state for t in found}))
            raise Conflict(f"task {task_id} has already finished ({states}); "
                             f"nothing to cancel")
        self.core.require_broker()
        for task in open_tasks:
            if task.state == State.QUEUED:
                self.core.submit(self._canceler(task))
            else:
                self.core.send_cancel(task.node, task_id)
        return open_tasks

    def _canceler(self, task: TaskRow) -> Callable[[], None]:
        return lambda: self.fleet.cancel_queued(task.node, task.id,
                                                "canceled by request before it was sent")

    # --- messages (the worker) --------------------------------------------------------
    def _handle_many(self, messages: list[Incoming]) -> None:
        """Messages that arrived together (one transaction, core.py): runs of plain task
        updates are applied together (Store.apply_updates: one round trip for their
        state changes); anything else is handled on its own, in its place."""
        run: list[tuple[Incoming, Update, JSONObject]] = []
        for msg in messages:
            parsed = self._plain_update(msg)
            if parsed is None:
                self._apply_run(run)
                run = []
                self._handle(msg)
            else:
                run.append((msg, *parsed))
        self._apply_run(run)

    def _plain_update(self, msg: Incoming) -> tuple[Update, JSONObject] | None:
        """An update of a task on its own node's topic; None for anything else (which
        `_handle` takes, with its checks and its answers to bad input)."""
        if msg.channel != Channel.UPDATES or not msg.payload:
            return None
        try:
            obj = decode_bounded(msg.payload, self.cfg.max_message_bytes)
            update = parse_update(obj)
        except ProtocolError:
            return None
        if update.node != msg.node or update.id is None or update.of is not None:
            return None
        return update, obj

    def _apply_run(self, run: list[tuple[Incoming, Update, JSONObject]]) -> None:
        if not run:
            return
        changes = self.store.apply_updates([(u, obj) for _m, u, obj in run],
                                           grace=self.cfg.grace, now=time.time())
        for (msg, update, _obj), change in zip(run, changes, strict=True):
            self.metrics.messages.labels(str(msg.channel)).inc()
            self.store.touch_node(update.node)
            if change is None:
                self.metrics.ignored.inc()
            else:
                self.core.emit(change)
            self.core.ack(msg)

    def _handle(self, msg: Incoming) -> None:
        self.metrics.messages.labels(str(msg.channel)).inc()
        echoes = self.core.echoes
        if msg.channel == Channel.TASKS and echoes is not None and echoes.take(msg.payload):
            self.core.ack(msg)  # our own task, stored before it was sent (echoes.py)
            return
        try:
            if msg.channel == Channel.OUTPUT:
                out = parse_output(decode_bounded(msg.payload, self.cfg.max_message_bytes))
                self.hub.publish(out.to_dict())
            elif msg.payload:  # an empty payload clears a retained message: nothing to record
                obj = decode_bounded(msg.payload, self.cfg.max_message_bytes)
                handler = {Channel.UPDATES: self._on_update, Channel.STATUS: self._on_status,
                           Channel.TASKS: self._on_task}[msg.channel]
                handler(msg.node, obj)
        except ProtocolError as exc:
            self.metrics.bad_messages.inc()
            log.warning("dropped a bad %s message from node %s: %s", msg.channel, msg.node,
                        exc.message)
        self.core.ack(msg)  # once what it changed has committed (core.py)

    def _on_update(self, node: str, obj: JSONObject) -> None:
        update = parse_update(obj)
        if update.node != node:
            raise ProtocolError(_BAD, f"update names node {update.node} but came on node "
                                      f"{node}'s topic")
        if update.id is None:
            self.store.record_rejected_without_id(node, obj)
            log.warning("node %s rejected a message it could not read: %s", node,
                        update.error.message if update.error else "?")
            return
        if update.of is not None:  # a refused cancel: it says nothing of the task's state
            self.store.record_rejected_without_id(node, obj)
            log.warning("node %s refused a %s for task %s: %s", node, update.of, update.id,
                        update.error.message if update.error else "?")
            return
        change = self.store.apply_update(update, obj, grace=self.cfg.grace, now=time.time())
        self.store.touch_node(node)
        if change is None:
            self.metrics.ignored.inc()
            return
        self.core.emit(change)

    def _on_status(self, node: str, obj: JSONObject) -> None:
        status = parse_status(obj)
        if status.node != node:
            raise ProtocolError(_BAD, f"status names node {status.node} but came on node "
                                      f"{node}'s topic")
        previous, info = self.store.apply_status(status)
        if status.state == "online":
            self.store.extend_deadlines(node, time.time() + self.cfg.grace)
            if self.cfg.resend_unaccepted:
                self.fleet.resend_unaccepted(node)
        if previous != status.state:
            log.info("node %s is %s", node, status.state)
            self.fleet.on_status(node, previous, status.state)
            self.core.publish(node_event(previous, info.to_json()), "nodes", node,
                              status.state)

    def _on_task(self, node: str, obj: JSONObject) -> None:
        command = parse_command(obj)
        if isinstance(command, Cancel):
            return
        deadline = time.time() + command.timeout + self.cfg.grace
        change = self.store.note_task_seen(node, command, deadline=deadline)
        if change is not None:
            log.info("recorded task %s for node %s, dispatched by another client", command.id,
                     node)
            self.core.emit(change)

    def _duties(self, first: bool) -> None:
        """The tracker's, on the instance that runs the periodic duties (tracker.py)."""
        if first:
            self.core.submit(self.fleet.resume)
        elif self.store.shared and self.messenger.connected.is_set():
            self.core.submit(self._send_stale)

    def _send_stale(self) -> None:
        """Queued tasks an instance that died never sent go like any other: paced, and
        held ones (job steps, rollout targets, retry back-offs) only in their turn."""
        stale = self.store.stale_queued(self.cfg.stale_after)
        if stale:
            log.info("%d tasks were stored by an instance that never sent them; sending "
                     "them paced", len(stale))
        self.fleet.pump_all()

    def forget_node(self, node: str) -> JSONObject:
        """`edgerun nodes forget ID`: remove a node from the registry (its tasks stay)."""
        if not self.store.forget_node(node):
            raise NotFound(f"no node {node!r}")
        log.info("node %s forgotten", node)
        return {"node": node, "forgotten": True}
