"""What fleet, jobs and rollouts may do to the service: the one worker, the requests'
checks, sending to the broker and announcing a change.

`Service` (service.py) builds one `Core` and hands it to `Fleet`, `JobRunner` and
`RolloutEngine`; none of them sees the service itself. A task's path runs one way:
the API thread stores it (Service), the worker paces and claims it (Fleet), the
core sends it; the broker's confirm comes back to Fleet as work on the worker.

Group commit: the worker takes everything waiting in its inbox (up to BATCH_MAX)
and records it in one transaction (store/tx.py). What must follow the commit
waits for it: acks to the broker (so at-least-once is unchanged: a message is
acked only once what it changed is durable), sends, events to readers, answers
to API calls. If the batch fails (a database error), it is rolled back and each
item is done again in a transaction of its own, so one bad item costs only
itself. An API call (`call`) always runs in a transaction of its own.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from functools import partial
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
from edgerun.scheduler.fleet.targets import (
    Bare,
    Known,
    glob_prefix,
    is_glob,
    is_mac,
    parse_wheres,
    select_nodes,
)
from edgerun.scheduler.fleet.tracker import Verdict
from edgerun.scheduler.errors import StoreError
from edgerun.scheduler.messaging import Incoming, Messenger
from edgerun.scheduler.metrics import Metrics
from edgerun.scheduler.store.events import EventHub, task_event
from edgerun.scheduler.store.records import TaskRow
from edgerun.scheduler.store.tasks import Change, Store
from edgerun.signing import Signer

log = logging.getLogger(__name__)
T = TypeVar("T")
CALL_TIMEOUT_S = 600.0  # a rollout or job over tens of thousands of nodes is stored here
BATCH_MAX = 256  # items a transaction: long enough to share a commit, short enough not to
# keep the API's reads waiting on the store's lock


class _Retry(Exception):
    """A database error inside a batch: roll it back and do its items one by one."""


@dataclass(eq=False)
class _Call:
    work: Callable[[], Any]
    future: Future[Any]


Work = Incoming | Callable[[], None] | _Call | None


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
        store.on_events = self.hub.committed
        self.metrics = Metrics(self._snapshot)
        self.stopping = threading.Event()
        self._inbox: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._listeners: list[Callable[[Change], None]] = []
        self._handle_many: Callable[[list[Incoming]], None] | None = None

    # --- the worker ----------------------------------------------------------------------
    def start(self, handle: Callable[[Incoming], None],
              handle_many: Callable[[list[Incoming]], None] | None = None) -> None:
        """`handle` takes one message; `handle_many`, if given, the messages that arrived
        together (in one transaction; it must keep their order's meaning)."""
        self._handle_many = handle_many
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
        """Run `work` on the worker thread in a transaction of its own and return its
        result once that has committed (API threads); its exception, all of it undone."""
        future: Future[T] = Future()
        self._inbox.put(_Call(work, future))
        return future.result(CALL_TIMEOUT_S)

    def _work(self, handle: Callable[[Incoming], None]) -> None:
        while True:
            batch: list[Any] = [self._inbox.get()]
            while batch[-1] is not None and len(batch) < BATCH_MAX:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is None
            group: list[Any] = []
            for item in batch[:-1] if stop else batch:
                if isinstance(item, _Call):
                    self._group(group, handle)
                    group = []
                    self._call(item)
                else:
                    group.append(item)
            self._group(group, handle)
            if stop:
                return

    def _group(self, items: list[Any], handle: Callable[[Incoming], None]) -> None:
        """Items in one transaction; after a database error, each in its own."""
        if not items:
            return
        if len(items) > 1:
            try:
                with self.store.transaction():
                    run: list[Incoming] = []
                    for item in items:
                        if isinstance(item, Incoming) and self._handle_many is not None:
                            run.append(item)
                            continue
                        self._many(run)
                        run = []
                        self._one(item, handle, strict=True)
                    self._many(run)
                return
            except Exception as exc:  # _Retry, a failed COMMIT, work done before it
                log.warning("a batch of %d was rolled back (%s); recording them one by one",
                            len(items), exc.__cause__ or exc)
        for item in items:
            try:
                with self.store.transaction():
                    self._one(item, handle, strict=False)
            except SchedulerError as exc:
                log.error("%s", exc)
            except Exception:  # one bad message must not stop the service
                log.exception("internal error; the service goes on")

    def _many(self, messages: list[Incoming]) -> None:
        """Messages that arrived together, to `handle_many`; any failure rolls the whole
        batch back, to be done one by one."""
        if not messages or self._handle_many is None:
            return
        try:
            self._handle_many(messages)
        except Exception as exc:  # the one-by-one way says which message, and why
            raise _Retry(str(exc).strip().splitlines()[0] if str(exc).strip()
                         else type(exc).__name__) from exc

    def _one(self, item: Any, handle: Callable[[Incoming], None], strict: bool) -> None:
        try:
            if isinstance(item, Incoming):
                handle(item)
            else:
                item()
        except self._db_errors as exc:
            if strict:  # the transaction may be unusable now (PostgreSQL): start again
                raise _Retry(str(exc).strip().splitlines()[0] if str(exc).strip()
                             else type(exc).__name__) from exc
            raise
        except SchedulerError as exc:
            log.error("%s", exc)
        except Exception:  # one bad message must not stop the service
            log.exception("internal error; the service goes on")

    @property
    def _db_errors(self) -> tuple[type[BaseException], ...]:
        return (StoreError, *self.store.db.errors)

    def _call(self, call: _Call) -> None:
        try:
            with self.store.transaction():
                result = call.work()
        except BaseException as exc:  # handed back to the caller
            call.future.set_exception(exc)
        else:
            call.future.set_result(result)

    # --- requests' checks (API threads) -------------------------------------------------
    def resolve(self, targets: Sequence[str], online: bool, where: Any = None) -> list[str]:
        """Node ids, globs, MAC addresses, --online and --where (fleet/targets.py)."""
        return [n.node for n in self.select(targets, online, where)]

    def select(self, targets: Sequence[str], online: bool, where: Any = None) -> list[Known]:
        """The chosen nodes, in `resolve`'s order: their id and state, and their facts
        where they were read. Only what the targets need is read: named ids' states (a
        few statements for many), a glob the ids and states in its literal prefix's
        range of the primary key; every node's facts only for --where or a MAC address
        that is not a node id. A task to one node among 100,000, or a page of 'rack7-*',
        does not read and parse every node's record."""
        wheres = parse_wheres(where)
        nodes = self._candidates(targets, bool(wheres))
        chosen = select_nodes(targets, nodes, online_only=online, where=wheres)
        by_id = {n.node: n for n in nodes}
        return [by_id[n] for n in chosen]

    def _candidates(self, targets: Sequence[str], wheres: bool) -> Sequence[Known]:
        if wheres or not all(isinstance(t, str) and t for t in targets):
            return self.store.nodes()  # (a bad target: select_nodes says why)
        unique = list(dict.fromkeys(targets))
        named = [t for t in unique if not is_glob(t)]
        found: dict[str, Known] = {node: Bare(node, state) for node, state in
                                   self.store.node_states_of(named)} if named else {}
        if any(is_mac(t) and t not in found for t in named):
            return self.store.nodes()  # a MAC address: found by every node's facts
        prefixes = {glob_prefix(t) for t in unique if is_glob(t)} if targets else {""}
        for prefix in sorted(prefixes):
            for node, state in self.store.node_states(prefix):
                found.setdefault(node, Bare(node, state))
        return list(found.values())

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
        """Hand a task to the broker once the open transaction (its claim) has committed;
        `on_sent` runs on the messenger's thread once the broker has it (queue work with
        `submit` from there, never block)."""
        self._after_commit("sends", (node, self.wire(task), on_sent), self.messenger.send_many)

    def send_cancel(self, node: str, task_id: str, if_queued: bool = False) -> None:
        payload = self.wire(Cancel(task_id, if_queued))
        self._after_commit("sends", (node, payload, self.metrics.dispatched.inc),
                           self.messenger.send_many)

    def ack(self, message: Incoming) -> None:
        """The broker may forget `message` once the open transaction has committed."""
        self._after_commit("acks", message, self.messenger.ack_many)

    def _after_commit(self, kind: str, item: T, hand_over: Callable[[list[T]], None]) -> None:
        """`item` to `hand_over` once the open transaction has committed, with the other
        items of its kind from that transaction: a batch of 256 updates is one hand-over
        to the messenger's thread (one wake-up), not 256. At once when none is open."""
        if not self.store.in_transaction:
            hand_over([item])
            return
        with self.store.transaction() as tx:
            items: list[T] | None = tx.scratch.get(kind)
            if items is None:
                items = tx.scratch[kind] = []
                tx.after_commit(partial(hand_over, items))
            items.append(item)

    def wire(self, message: Task | Cancel) -> bytes:
        """The bytes to send: signed when the service has a private key."""
        payload = encode(message) if self.signer is None else \
            canonical_json(self.signer.sign(message.to_dict()))
        if self.echoes is not None:
            self.echoes.sent(payload)
        return payload

    @staticmethod
    def task_of(spec: JSONObject | None) -> Task:
        """The stored spec of a task row (TaskRow.spec), as the contract's record."""
        task = parse_command(json.loads(json.dumps(spec)))
        assert not isinstance(task, Cancel)
        return task

    # --- changes --------------------------------------------------------------------------
    def on_change(self, listener: Callable[[Change], None]) -> None:
        """Call `listener` after every change is committed (on the thread that made it)."""
        self._listeners.append(listener)

    def emit(self, change: Change) -> None:
        """Announce a stored change: logged with the transaction that made it (call it
        inside that one), then, once committed, to followers, other instances and the
        listeners."""
        task = change.task
        self.metrics.changes.labels(task.state).inc()
        with self.store.transaction():
            self.publish(task_event(change.previous, task.to_json()), "tasks", task.node,
                         task.state)
            for listener in self._listeners:
                self.store.after_commit(partial(listener, change))

    def publish(self, event: JSONObject, kind: str, node: str, state: str) -> None:
        """An event to the log (with the open transaction), then to the followers here and
        on the broker's event exchange."""
        with self.store.transaction():
            self.hub.publish(event)
            self._after_commit("events", (kind, node, state, canonical_json(event)),
                               self.messenger.publish_events)

    def lose(self, task: TaskRow, verdict: Verdict) -> None:
        with self.store.transaction():
            change = self.store.mark_lost(task.node, task.id, task.state,
                                          verdict.code, verdict.message)
            if change is not None:
                log.warning("task %s on node %s is lost: %s", task.id, task.node,
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
