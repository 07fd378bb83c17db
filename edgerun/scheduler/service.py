"""`edgerun serve`: dispatch, record, follow every task to a final state.

Threads: the messenger's own (network, never blocks: it only queues), one
worker that applies everything in arrival order (messages, broker receipts,
the tracker's verdicts, job steps), the tracker, and the API's request
threads, which read the store and call `dispatch`, `cancel` and `create_job`.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from edgerun.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES, Cancel, Channel, ErrorCode, JSONObject, ProtocolError, State, Task,
    canonical_json, decode_bounded, encode, format_time, is_final, is_task_id, parse_command,
    parse_output, parse_status, parse_update,
)

from edgerun.signing import Signer

from .errors import BadRequest, BrokerUnreachable, Conflict, NotFound, SchedulerError
from .echoes import Echoes
from .events import EventHub, node_event, task_event
from .fleet import Fleet
from .messaging import Incoming, Messenger
from .metrics import Metrics
from .cluster import relay
from .store import Change, Store
from .retries import check_room, parse_retry
from .targets import parse_wheres, select_nodes
from .tracker import Tracker, Verdict

log = logging.getLogger(__name__)
_BAD = ErrorCode.BAD_MESSAGE

Work = Incoming | Callable[[], None] | None


@dataclass(frozen=True)
class ServiceConfig:
    grace: float = 30.0
    """Seconds past a task's timeout before it is declared lost."""
    tick: float = 1.0
    """How often the tracker looks for tasks past their deadline."""
    default_expiry: float = 86_400.0
    """expires_at = dispatch + this when a request gives none (0: never expires)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    pace: int = 8
    """At most this many tasks outstanding per node; the rest wait queued (fleet.py)."""
    offline_grace: float = 120.0
    """Seconds a node may stay offline before its accepted and running tasks are lost."""
    keep_days: float = 0.0
    """Finished tasks older than this are pruned (0: kept forever)."""
    resend_unaccepted: bool = False
    """Send a node's `dispatched` tasks again when it comes online (the embedded broker
    forgets queued tasks when it restarts; agents run an id at most once)."""
    stale_after: float = 15.0
    """Several instances: a task still `queued` this long was stored by an instance that
    died before sending it; the duties holder sends it."""
    record_external: bool = True
    """The messenger also receives every task sent (other clients'; our own come back and
    are recognised by their bytes, echoes.py)."""


class Service:
    def __init__(self, store: Store, messenger: Messenger,
                 cfg: ServiceConfig | None = None, signer: Signer | None = None) -> None:
        self.store, self.messenger, self.signer = store, messenger, signer
        self.cfg = cfg or ServiceConfig()
        # its own tasks coming back on the tasks subscription: not parsed again
        self.echoes = Echoes() if self.cfg.record_external else None
        self.hub = EventHub(store)
        self.metrics = Metrics(self._snapshot)
        self._inbox: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.fleet = Fleet(self)
        self.tracker = Tracker(store, store.online_nodes,
                               lambda t, v: self._inbox.put(lambda: self._lose(t, v)),
                               self._stop, self.cfg.tick, duties=self._duties,
                               keep_days=self.cfg.keep_days)
        self._listener: Any = None

    # --- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="scheduler-worker", daemon=True)
        self._worker.start()
        self.messenger.seed(n["node"] for n in self.store.nodes())  # for its re-sync
        self.messenger.start(self._inbox.put)
        self.fleet.start()
        self.tracker.start()  # its first round sends again what never reached the broker
        self._listener = self.store.listen(  # other instances' events (PostgreSQL only)
            lambda message: relay(self.hub, message, self.store.event))

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._worker is not None:
            self._worker.join(10.0)
        self.tracker.join(5.0)
        self.fleet.join(5.0)
        self.messenger.stop()
        if self._listener is not None:
            self._listener.stop()
        self.hub.close()

    def health(self) -> JSONObject:
        return {"broker": str(self.messenger.url), "messenger": self.messenger.kind,
                "connected": self.messenger.connected.is_set(),
                "broker_node": self._broker_node(),
                "last_error": self.messenger.last_error, "store": self.store.path,
                "schema_version": self.store.schema_version}

    def _snapshot(self) -> dict[str, Any]:
        nodes = {"online": 0, "offline": 0, **self.store.count_nodes_by_state()}
        return {"tasks": self.store.count_by_state(), "nodes": nodes,
                "connected": 1 if self.messenger.connected.is_set() else 0,
                "broker_node": self._broker_node(),
                "subscribers": self.hub.subscribers}

    def _broker_node(self) -> str | None:
        """host:port of the broker node (of a cluster's several) connected to now."""
        node = self.messenger.node
        return node.address if node is not None else None

    # --- requests (API threads) ------------------------------------------------------
    def resolve(self, targets: Sequence[str], online: bool, where: Any = None) -> list[str]:
        """Node ids, globs, MAC addresses, --online and --where (targets.py)."""
        return select_nodes(targets, self.store.nodes(), online_only=online,
                            where=parse_wheres(where))

    def build_task(self, spec: Any, task_id: str | None = None, *,
                   expiry: bool = True) -> Task:
        """A task from a request's spec, validated by the contract's own parser."""
        if not isinstance(spec, dict):
            raise BadRequest("the task must be a JSON object")
        obj = {**spec, "v": 1, "kind": "task", "id": task_id or spec.get("id")
               or str(uuid.uuid4())}
        if expiry and "expires_at" not in obj and self.cfg.default_expiry > 0:
            expires = datetime.now(UTC) + timedelta(seconds=self.cfg.default_expiry)
            obj["expires_at"] = format_time(expires)
        try:
            task = parse_command(obj)
        except ProtocolError as exc:
            raise BadRequest(f"bad task: {exc.message}") from None
        if isinstance(task, Cancel):
            raise BadRequest("bad task: `kind` must be task")
        return task

    def require_broker(self) -> None:
        if not self.messenger.connected.is_set():
            why = self.messenger.last_error or "not connected yet"
            raise BrokerUnreachable(f"the scheduler cannot reach its broker "
                                    f"{self.messenger.url}: {why}; nothing was dispatched")

    def dispatch(self, targets: Sequence[str], online: bool, spec: Any, *,
                 where: Any = None, retry: Any = None) -> list[JSONObject]:
        """Store the task for each node; the worker sends it, paced (fleet.py)."""
        nodes = self.resolve(targets, online, where)
        task = self.build_task(spec)
        policy = parse_retry(retry)
        check_room(task.id, policy)
        self.require_broker()
        for node in nodes:
            if self.store.get(node, task.id) is not None:
                raise Conflict(f"task id {task.id!r} already exists for node {node}; "
                                 f"leave the id out to get a fresh one")
        out = []
        for node in nodes:
            change = self.store.add_task(node, task, source="api")
            if change is None:
                raise Conflict(f"task id {task.id!r} already exists for node {node}")
            if policy is not None:
                change = self.fleet.with_retry(change, policy)
            self._emit(change)
            out.append(change.task)
        self._inbox.put(lambda: self.fleet.pump_nodes(nodes))
        return out

    def create_job(self, targets: Sequence[str], online: bool, steps: Sequence[JSONObject],
                   job_id: str | None = None, *, where: Any = None) -> JSONObject:
        """An ordered list of tasks per node, or a graph of named steps (jobs.py)."""
        if job_id is not None and self.store.job(job_id) is not None:
            raise Conflict(f"job {job_id} already exists")
        return self.fleet.jobs.create(targets, online, steps, job_id, where=where)

    def cancel(self, task_id: str, node: str | None = None) -> list[JSONObject]:
        if not is_task_id(task_id):
            raise BadRequest(f"{task_id!r} is not a task id")
        found = [t for t in self.store.find(task_id) if node is None or t["node"] == node]
        if not found:
            raise NotFound(f"no task {task_id!r}" + (f" for node {node}" if node else ""))
        open_tasks = [t for t in found if not is_final(State(t["state"]))]
        if not open_tasks:
            states = ", ".join(sorted({t["state"] for t in found}))
            raise Conflict(f"task {task_id} has already finished ({states}); "
                             f"nothing to cancel")
        self.require_broker()
        for task in open_tasks:
            if task["state"] == State.QUEUED:
                self._inbox.put(self._canceler(task))
            else:
                self.messenger.send(task["node"], self._wire(Cancel(task_id)),
                                    self.metrics.dispatched.inc)
        return open_tasks

    def _canceler(self, task: JSONObject) -> Callable[[], None]:
        return lambda: self.fleet.cancel_queued(task, "canceled by request before it was sent")

    # --- the worker --------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            try:
                if isinstance(item, Incoming):
                    self._handle(item)
                else:
                    item()
            except SchedulerError as exc:
                log.error("%s", exc)
            except Exception:  # one bad message must not stop the service
                log.exception("internal error; the service goes on")

    def _handle(self, msg: Incoming) -> None:
        self.metrics.messages.labels(str(msg.channel)).inc()
        if msg.channel == Channel.TASKS and self.echoes is not None \
                and self.echoes.take(msg.payload):
            self.messenger.ack(msg)  # our own task, stored before it was sent (echoes.py)
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
        self.messenger.ack(msg)

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
        self._emit(change)

    def _on_status(self, node: str, obj: JSONObject) -> None:
        status = parse_status(obj)
        if status.node != node:
            raise ProtocolError(_BAD, f"status names node {status.node} but came on node "
                                      f"{node}'s topic")
        previous, info = self.store.apply_status(status)
        if status.state == "online":
            self.store.extend_deadlines(node, time.time() + self.cfg.grace)
            if self.cfg.resend_unaccepted:
                for row in self.store.unaccepted(node):
                    self._send(node, self._task_of(row))
        if previous != status.state:
            log.info("node %s is %s", node, status.state)
            self.fleet.on_status(node, previous, status.state)
            event = node_event(previous, info)
            self.hub.publish(event)
            self.messenger.publish_event("nodes", node, status.state, canonical_json(event))

    def _on_task(self, node: str, obj: JSONObject) -> None:
        command = parse_command(obj)
        if isinstance(command, Cancel):
            return
        deadline = time.time() + command.timeout + self.cfg.grace
        change = self.store.note_task_seen(node, command, deadline=deadline)
        if change is not None:
            log.info("recorded task %s for node %s, dispatched by another client", command.id,
                     node)
            self._emit(change)

    def _dispatched(self, node: str, task_id: str, timeout: float) -> None:
        self.metrics.dispatched.inc()
        change = self.store.mark_dispatched(node, task_id,
                                            time.time() + timeout + self.cfg.grace)
        if change is not None:
            self._emit(change)
        self.fleet.on_dispatched(node, task_id)

    def _lose(self, task: JSONObject, verdict: Verdict) -> None:
        change = self.store.mark_lost(task["node"], task["id"], task["state"], verdict.code,
                                      verdict.message)
        if change is not None:
            log.warning("task %s on node %s is lost: %s", task["id"], task["node"],
                        verdict.message)
            self._emit(change)

    def _cancel_queued(self, task: JSONObject, why: str) -> None:
        change = self.store.cancel_queued(task["node"], task["id"], "canceled", why)
        if change is not None:
            self._emit(change)

    def _emit(self, change: Change) -> None:
        task = change.task
        self.metrics.changes.labels(task["state"]).inc()
        event = task_event(change.previous, task)
        self.hub.publish(event)
        self.messenger.publish_event("tasks", task["node"], task["state"], canonical_json(event))
        self.fleet.on_change(change)

    def _send(self, node: str, task: Task) -> None:
        self.messenger.send(node, self._wire(task), lambda: self._inbox.put(
            lambda: self._dispatched(node, task.id, task.timeout)))

    def _wire(self, message: Task | Cancel) -> bytes:
        """The bytes to send: signed when the service has a private key."""
        payload = encode(message) if self.signer is None else \
            canonical_json(self.signer.sign(message.to_dict()))
        if self.echoes is not None:
            self.echoes.sent(payload)
        return payload

    def _task_of(self, row: JSONObject) -> Task:
        task = parse_command(json.loads(json.dumps(row["spec"])))
        assert not isinstance(task, Cancel)
        return task

    def _resume(self) -> None:
        """After a start: what is free to go is sent, paced; held steps wait (fleet.py)."""
        self.fleet.resume()

    def _duties(self, first: bool) -> None:
        """The tracker's, on the instance that runs the periodic duties (tracker.py)."""
        if first:
            self._inbox.put(self._resume)
        elif self.store.shared and self.messenger.connected.is_set():
            self._inbox.put(self._send_stale)

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
