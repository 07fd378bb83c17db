"""Full-data events: what changed, with everything known, so no reader needs a second lookup.

`EventHub` hands every node, task and audit event to live subscribers through
bounded queues, once it is committed to the store's durable event log: the store
logs it in the transaction of the change it describes (`Store.log_event`,
store/tx.py) and gives it back with its id after the commit (`committed`); the
other instances' come through cluster.py. Ids are handed out in commit order with
no holes, so the hub delivers them strictly in id order, each once: an id that
arrives early (another thread's or instance's commit not handed over yet) makes
it read the ones before from the log first, unless the hub has no subscriber: then
it only counts them (`_skip_to`), since a reader that comes later starts from the
latest id or reads the log itself. Live `output` is best effort (QoS 0 on the
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
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from edgerun.protocol import FINAL_STATES, JSONObject, format_time

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
RECENT_OUTPUT_BYTES = 64 * 1024  # per task: what `logs -f` attached late shows first
RECENT_OUTPUT_TASKS = 2_000


def _seq(chunk: JSONObject) -> int:
    seq = chunk.get("seq")
    return seq if isinstance(seq, int) else 0


class RecentOutput:
    """The live output this instance heard of the tasks running lately (bounded: the
    last RECENT_OUTPUT_BYTES of each of the RECENT_OUTPUT_TASKS latest tasks), so that
    a follower attached late first gets what the task wrote before (with the `seq` of
    each chunk, to go on with the live ones without a gap or a repeat)."""

    def __init__(self) -> None:
        self._tasks: OrderedDict[tuple[str, str], list[JSONObject]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, event: JSONObject) -> None:
        node, task_id, data = event.get("node"), event.get("id"), event.get("data")
        if not isinstance(node, str) or not isinstance(task_id, str) or \
                not isinstance(data, str):
            return
        with self._lock:
            chunks = self._tasks.setdefault((node, task_id), [])
            self._tasks.move_to_end((node, task_id))
            chunks.append(event)
            size = sum(len(c["data"]) for c in chunks)
            while size > RECENT_OUTPUT_BYTES and len(chunks) > 1:
                size -= len(chunks.pop(0)["data"])
            while len(self._tasks) > RECENT_OUTPUT_TASKS:
                self._tasks.popitem(last=False)

    def of(self, node: str, task_id: str) -> list[JSONObject]:
        """The chunks kept of the task, in `seq` order."""
        with self._lock:
            chunks = list(self._tasks.get((node, task_id), ()))
        return sorted(chunks, key=_seq)


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
    # only what there is: {"stdout": 0} would read as "has output" (cli/follow.py)
    trimmed["output"] = {k: len(result[k]) for k in LIVE_OUTPUT_FIELDS
                         if isinstance(result.get(k), str) and result[k]}
    return {**task, "result": trimmed}


class EventLog(Protocol):
    def log_event(self, channel: str | None, event: JSONObject) -> None: ...

    def hold_live(self, event: JSONObject) -> bool: ...

    def event_horizon(self) -> tuple[int, int]: ...

    def events_after(self, after: int, limit: int = ...,
                     through: int | None = None) -> list[tuple[int, JSONObject]]: ...


ReadLog = Callable[[int, int], list[tuple[int, JSONObject]]]
"""(after, through) -> the logged events with after < id <= through, oldest first."""
CATCH_UP_PAGE = 1000


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
    settled: bool = False
    """Task events only where the task reached a final state or the event carries an
    alert (a follower that counts finals need not be sent every step of every task)."""

    @property
    def overflowed(self) -> bool:
        return self.closed is not None

    def wants(self, event: JSONObject) -> bool:
        if event.get("kind") not in self.kinds:
            return False
        if self.settled and event.get("kind") == TASK_EVENT and not _settled(event):
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
        self._publish_lock = threading.Lock()  # ids reach readers in id order, each once
        self._store, self._keep = store, keep
        self.last_id = 0
        self.skipped = 0  # logged events counted but not read: no subscriber then
        self.recent_output = RecentOutput()
        if store is not None:
            self.last_id = store.event_horizon()[1]

    def subscribe(self, ids: Iterable[str] = (), nodes: Iterable[str] = (),
                  kinds: Iterable[str] | None = None,
                  wake: Callable[[], None] | None = None,
                  settled: bool = False) -> Subscription:
        sub = Subscription(ids=frozenset(ids), nodes=frozenset(nodes), wake=wake,
                           settled=settled)
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
        """Live output: to the subscribers now (best effort, not logged), with the id of
        the latest logged event. Any other event: logged with the calling thread's open
        transaction (or one of its own), and handed out when that commits. Returns the
        latest id handed out."""
        kind = event.get("kind")
        if kind == TASK_EVENT and isinstance(event.get("task"), dict):
            event = {**event, "task": without_tails(event["task"])}
        if kind == OUTPUT:
            self.recent_output.add(event)
            if self._store is None or not self._store.hold_live(event):
                self._fan_out(self.last_id, event)
        elif self._store is not None:
            self._store.log_event(_channel(kind), event)
        else:  # no log (unit tests of readers): numbered here
            with self._publish_lock:
                self.last_id += 1
                self._fan_out(self.last_id, event)
        return self.last_id

    def committed(self, events: list[tuple[int, JSONObject]],
                  read: ReadLog | None = None) -> None:
        """Logged events, in id order, committed by this process or (cluster.py) another
        instance: to the readers in id order, each once. A hole before them is read
        from the log first (`read`, else the store): ids are dense and given in commit
        order, so every id below a committed one is committed too."""
        with self._publish_lock:
            for event_id, event in events:
                if event_id == 0:  # live only (output), in its place
                    self._fan_out(self.last_id, event)
                    continue
                if event_id > self.last_id + 1:
                    self._catch_up(event_id - 1, read)
                if event_id <= self.last_id:
                    continue  # handed out already (read from the log, or ours)
                self.last_id = event_id
                self._fan_out(event_id, event)

    def deliver(self, event_id: int, event: JSONObject) -> None:
        """One logged event (see `committed`)."""
        self.committed([(event_id, event)])

    def catch_up(self, through: int, read: ReadLog | None = None) -> None:
        """Hand out every logged event up to id `through` not handed out yet."""
        with self._publish_lock:
            self._catch_up(through, read)

    def _catch_up(self, through: int, read: ReadLog | None) -> None:
        if self.last_id >= through or self._skip_to(through):
            return
        if read is None:
            store = self._store
            if store is None:
                return

            def read(after: int, upto: int) -> list[tuple[int, JSONObject]]:
                assert store is not None
                return store.events_after(after, CATCH_UP_PAGE, upto)
        while self.last_id < through:
            try:
                page = read(self.last_id, through)
            except Exception as exc:  # the next commit tries again
                log.warning("event log: cannot read events after %d: %s", self.last_id, exc)
                return
            if not page:  # dropped by retention meanwhile: nothing left to hand out
                log.warning("event log: events %d-%d were dropped before they could be "
                            "handed out", self.last_id + 1, through)
                self.last_id = through
                return
            for event_id, event in page:
                if event_id > self.last_id:
                    self.last_id = event_id
                    self._fan_out(event_id, event)

    def _skip_to(self, through: int) -> bool:
        """With no subscriber, the ids up to `through` are only counted, not read from
        the log (the other instances' events are most of them): nobody is here to hand
        them to. Checked and counted under the subscribers' lock, so that a reader
        subscribing meanwhile either came first (and the events are read for it) or
        reads `last_id` after it moved (a fresh reader starts there, a resuming one reads
        the log itself: streams.py)."""
        with self._lock:
            if self._subs:
                return False
            self.skipped += through - self.last_id
            self.last_id = through
        return True

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


def _settled(event: JSONObject) -> bool:
    task = event.get("task")
    if event.get("alert") or not isinstance(task, dict):
        return True
    state = task.get("state")
    return isinstance(state, str) and state in FINAL_STATES


def _channel(kind: object) -> str:
    for channel, each in CHANNELS.items():
        if each == kind:
            return channel
    return str(kind)
