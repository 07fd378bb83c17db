"""What fleet, jobs and rollouts may do to the service: the one worker, the requests'
checks, sending to the broker and announcing a change.

`Service` (service.py) builds one `Core` and hands it to `Fleet`, `JobRunner` and
`RolloutEngine`; none of them sees the service itself. A task's path runs one way:
the API thread stores it (Service), the worker paces and claims it (Fleet), the
core sends it; the broker's confirm comes back to Fleet as work on the worker.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from edgerun.control.errors import BadRequest, BrokerUnreachable, SchedulerError
from edgerun.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Cancel,
    JSONObject,
    ProtocolError,
    Task,
    canonical_json,
    encode,
    format_time,
    parse_command,
)
from edgerun.scheduler.echoes import Echoes
from edgerun.scheduler.fleet.targets import parse_wheres, select_nodes
from edgerun.scheduler.fleet.tracker import Verdict
from edgerun.scheduler.messaging import Incoming, Messenger
from edgerun.scheduler.metrics import Metrics
from edgerun.scheduler.store.events import EventHub, task_event
from edgerun.scheduler.store.tasks import Change, Store
from edgerun.signing import Signer

log = logging.getLogger(__name__)
T = TypeVar("T")
Work = Incoming | Callable[[], None] | None
CALL_TIMEOUT_S = 600.0  # a rollout or job over tens of thousands of nodes is stored here


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
    """At most this many tasks outstanding per node; the rest wait queued (fleet/pacing.py)."""
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


class Core:
    """The worker thread and its inbox, and the outbound half of the service."""

    def __init__(self, store: Store, messenger: Messenger, cfg: ServiceConfig,
                 signer: Signer | None = None) -> None:
        self.store, self.messenger, self.cfg, self.signer = store, messenger, cfg, signer
        # its own tasks coming back on the tasks subscription: not parsed again
        self.echoes = Echoes() if cfg.record_external else None
        self.hub = EventHub(store)
        self.metrics = Metrics(self._snapshot)
        self.stopping = threading.Event()
        self._inbox: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._listeners: list[Callable[[Change], None]] = []

    # --- the worker ----------------------------------------------------------------------
    def start(self, handle: Callable[[Incoming], None]) -> None:
        self._worker = threading.Thread(target=self._work, args=(handle,),
                                        name="scheduler-worker", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self.stopping.set()
        self._inbox.put(None)
        if self._worker is not None:
            self._worker.join(10.0)

    def submit(self, work: Work) -> None:
        """Queue a message or a piece of work for the worker (any thread)."""
        self._inbox.put(work)

    def call(self, work: Callable[[], T]) -> T:
        """Run `work` on the worker thread and return its result (API threads)."""
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(work())
            except BaseException as exc:  # handed back to the caller
                future.set_exception(exc)
        self._inbox.put(run)
        return future.result(CALL_TIMEOUT_S)

    def _work(self, handle: Callable[[Incoming], None]) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            try:
                if isinstance(item, Incoming):
                    handle(item)
                else:
                    item()
            except SchedulerError as exc:
                log.error("%s", exc)
            except Exception:  # one bad message must not stop the service
                log.exception("internal error; the service goes on")

    # --- requests' checks (API threads) -------------------------------------------------
    def resolve(self, targets: Sequence[str], online: bool, where: Any = None) -> list[str]:
        """Node ids, globs, MAC addresses, --online and --where (fleet/targets.py)."""
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

    # --- outbound --------------------------------------------------------------------------
    def send(self, node: str, task: Task, on_sent: Callable[[], None]) -> None:
        """Hand a task to the broker; `on_sent` runs on the messenger's thread once the
        broker has it (queue work with `submit` from there, never block)."""
        self.messenger.send(node, self.wire(task), on_sent)

    def send_cancel(self, node: str, task_id: str, if_queued: bool = False) -> None:
        self.messenger.send(node, self.wire(Cancel(task_id, if_queued)),
                            self.metrics.dispatched.inc)

    def wire(self, message: Task | Cancel) -> bytes:
        """The bytes to send: signed when the service has a private key."""
        payload = encode(message) if self.signer is None else \
            canonical_json(self.signer.sign(message.to_dict()))
        if self.echoes is not None:
            self.echoes.sent(payload)
        return payload

    @staticmethod
    def task_of(row: JSONObject) -> Task:
        """The stored spec of a task row, as the contract's record."""
        task = parse_command(json.loads(json.dumps(row["spec"])))
        assert not isinstance(task, Cancel)
        return task

    # --- changes --------------------------------------------------------------------------
    def on_change(self, listener: Callable[[Change], None]) -> None:
        """Call `listener` after every change is announced (on the thread that made it)."""
        self._listeners.append(listener)

    def emit(self, change: Change) -> None:
        """Announce a stored change: followers, other instances, the listeners."""
        task = change.task
        self.metrics.changes.labels(task["state"]).inc()
        self.publish(task_event(change.previous, task), "tasks", task["node"], task["state"])
        for listener in self._listeners:
            listener(change)

    def publish(self, event: JSONObject, kind: str, node: str, state: str) -> None:
        """An event to the followers here and on the broker's event exchange."""
        self.hub.publish(event)
        self.messenger.publish_event(kind, node, state, canonical_json(event))

    def lose(self, task: JSONObject, verdict: Verdict) -> None:
        change = self.store.mark_lost(task["node"], task["id"], task["state"], verdict.code,
                                      verdict.message)
        if change is not None:
            log.warning("task %s on node %s is lost: %s", task["id"], task["node"],
                        verdict.message)
            self.emit(change)

    # --- metrics ---------------------------------------------------------------------------
    def broker_node(self) -> str | None:
        """host:port of the broker node (of a cluster's several) connected to now."""
        node = self.messenger.node
        return node.address if node is not None else None

    def _snapshot(self) -> dict[str, Any]:
        nodes = {"online": 0, "offline": 0, **self.store.count_nodes_by_state()}
        return {"tasks": self.store.count_by_state(), "nodes": nodes,
                "connected": 1 if self.messenger.connected.is_set() else 0,
                "broker_node": self.broker_node(),
                "subscribers": self.hub.subscribers}
