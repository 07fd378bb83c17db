"""Full-data events: what changed, with everything known, so no reader needs a second lookup.

`EventHub` numbers every node, task and audit event through the store's durable
event log (`Store.append_event`, the one append point) and fans it out to live
subscribers through bounded queues. Live `output` is best effort (QoS 0 on the
wire) and is not logged: it carries the id of the latest logged event, so a
reader resuming from it misses no logged event. A subscriber that falls
`QUEUE_LIMIT` events behind is cut off with a reason rather than slowing the
service down or holding unbounded memory.

Readers on an asyncio loop (the API's SSE and WebSocket streams) pass `wake`, a
thread-safe callable the hub calls after each put, so the loop never blocks on
the queue.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from edgerun.protocol import JSONObject, format_time

log = logging.getLogger(__name__)

TASK_EVENT = "task_event"
NODE_EVENT = "node_event"
OUTPUT = "output"
AUDIT = "audit"
KINDS = frozenset({TASK_EVENT, NODE_EVENT, OUTPUT, AUDIT})
# the WebSocket and SSE channel names of each kind (docs/EVENTS.md)
CHANNELS = {"tasks": TASK_EVENT, "nodes": NODE_EVENT, "output": OUTPUT, "audit": AUDIT}
QUEUE_LIMIT = 10_000
LOG_KEEP = 100_000
LIVE_OUTPUT_FIELDS = ("stdout", "stderr")


def task_event(previous: str | None, task: JSONObject) -> JSONObject:
    return {"v": 1, "kind": TASK_EVENT, "at": format_time(), "node": task["node"],
            "id": task["id"], "previous": previous, "state": task["state"], "task": task}


def node_event(previous: str | None, node: JSONObject) -> JSONObject:
    return {"v": 1, "kind": NODE_EVENT, "at": format_time(), "node": node["node"],
            "previous": previous, "state": node["state"], "info": node}


def audit_event(action: str, by: str | None, role: str | None, **details: object) -> JSONObject:
    """Who did what through the API: `dispatch`, `job`, `cancel`, `token_create`, ..."""
    return {"v": 1, "kind": AUDIT, "at": format_time(), "action": action, "by": by,
            "role": role, **details}


def without_tails(task: JSONObject) -> JSONObject:
    """The task record as lists and streams carry it: the output tails stay in the detail."""
    result = task.get("result")
    if not isinstance(result, dict) or not any(k in result for k in LIVE_OUTPUT_FIELDS):
        return task
    trimmed = {k: v for k, v in result.items() if k not in LIVE_OUTPUT_FIELDS}
    trimmed["output"] = {k: len(result[k]) for k in LIVE_OUTPUT_FIELDS
                         if isinstance(result.get(k), str)}
    return {**task, "result": trimmed}


class EventLog(Protocol):
    def append_event(self, channel: str, node: str | None, task_id: str | None,
                     body: JSONObject, keep: int) -> int: ...

    def event_horizon(self) -> tuple[int, int]: ...


@dataclass(eq=False)
class Subscription:
    """Events whose `id` is in `ids` (if given), `node` in `nodes` (if given), `kind` in `kinds`.

    Items are (event id, event); None marks the end (service stopping). `closed`
    is the reason the hub cut the reader off, if it did."""

    ids: frozenset[str] = frozenset()
    nodes: frozenset[str] = frozenset()
    kinds: frozenset[str] = KINDS
    queue: queue.Queue[tuple[int, JSONObject] | None] = field(
        default_factory=lambda: queue.Queue(maxsize=QUEUE_LIMIT))
    wake: Callable[[], None] | None = None
    closed: str | None = None

    @property
    def overflowed(self) -> bool:
        return self.closed is not None

    def wants(self, event: JSONObject) -> bool:
        if event.get("kind") not in self.kinds:
            return False
        if self.ids and event.get("id") not in self.ids and not (
                event.get("kind") == AUDIT and self.ids & set(event.get("tasks") or ())):
            return False
        return not self.nodes or event.get("node") in self.nodes or (
            event.get("kind") == AUDIT and bool(self.nodes & set(event.get("nodes") or ())))

    def _put(self, item: tuple[int, JSONObject] | None) -> bool:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            return False
        if self.wake is not None:
            self.wake()
        return True


class EventHub:
    def __init__(self, store: EventLog | None = None, keep: int = LOG_KEEP) -> None:
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()  # ids reach readers in the order they were given
        self._store, self._keep = store, keep
        self.last_id = 0
        if store is not None:
            self.last_id = store.event_horizon()[1]

    def subscribe(self, ids: Iterable[str] = (), nodes: Iterable[str] = (),
                  kinds: Iterable[str] | None = None,
                  wake: Callable[[], None] | None = None) -> Subscription:
        sub = Subscription(ids=frozenset(ids), nodes=frozenset(nodes), wake=wake)
        if kinds is not None:
            sub.kinds = frozenset(kinds)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def publish(self, event: JSONObject) -> int:
        """Log the event (not live output) and hand it to every subscriber that wants it.
        Returns its id: for output, the id of the latest logged event."""
        kind = event.get("kind")
        if kind == TASK_EVENT and isinstance(event.get("task"), dict):
            event = {**event, "task": without_tails(event["task"])}
        with self._publish_lock:
            if kind != OUTPUT and self._store is not None:
                try:
                    self.last_id = self._store.append_event(
                        _channel(kind), event.get("node"), event.get("id"), event, self._keep)
                except Exception as exc:  # the live stream goes on; resuming may then miss it
                    log.error("event log: %s", exc)
            event_id = self.last_id
            self._fan_out(event_id, event)
        return event_id

    def deliver(self, event_id: int, event: JSONObject) -> None:
        """An event another instance logged (id `event_id`): to this hub's readers, without
        logging it again (cluster.py's relay of PostgreSQL notifications)."""
        with self._publish_lock:
            self.last_id = max(self.last_id, event_id)
            self._fan_out(event_id, event)

    def _fan_out(self, event_id: int, event: JSONObject) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            if sub.closed or not sub.wants(event):
                continue
            if not sub._put((event_id, event)):
                sub.closed = (f"this reader fell {QUEUE_LIMIT} events behind and was cut "
                              f"off; resume from the last event id it read (the log keeps "
                              f"the newest {self._keep}), or read the current state again")
                self.unsubscribe(sub)
                if sub.wake is not None:
                    sub.wake()

    def close(self) -> None:
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            if not sub._put(None):
                sub.closed = "the service is stopping"
                if sub.wake is not None:
                    sub.wake()

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)


def _channel(kind: object) -> str:
    for channel, each in CHANNELS.items():
        if each == kind:
            return channel
    return str(kind)
