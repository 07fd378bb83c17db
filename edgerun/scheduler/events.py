"""Full-data events: what changed, with everything known, so no reader needs a second lookup.

`EventHub` fans events out to live subscribers (the API's stream) through
bounded queues; a subscriber that falls too far behind is cut off rather than
slowing the service down.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from edgerun.protocol import JSONObject, format_time

TASK_EVENT = "task_event"
NODE_EVENT = "node_event"
OUTPUT = "output"


def task_event(previous: str | None, task: JSONObject) -> JSONObject:
    return {"v": 1, "kind": TASK_EVENT, "at": format_time(), "node": task["node"],
            "id": task["id"], "previous": previous, "state": task["state"], "task": task}


def node_event(previous: str | None, node: JSONObject) -> JSONObject:
    return {"v": 1, "kind": NODE_EVENT, "at": format_time(), "node": node["node"],
            "previous": previous, "state": node["state"], "info": node}


@dataclass
class Subscription:
    """Events whose `id` is in `ids` (if given), `node` in `nodes` (if given), `kind` in `kinds`."""

    ids: frozenset[str] = frozenset()
    nodes: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset({TASK_EVENT, NODE_EVENT, OUTPUT})
    queue: queue.Queue[JSONObject | None] = field(
        default_factory=lambda: queue.Queue(maxsize=100_000))
    overflowed: bool = False

    def wants(self, event: JSONObject) -> bool:
        if event.get("kind") not in self.kinds:
            return False
        if self.ids and event.get("id") not in self.ids:
            return False
        return not self.nodes or event.get("node") in self.nodes


class EventHub:
    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()

    def subscribe(self, ids: Iterable[str] = (), nodes: Iterable[str] = (),
                  kinds: Iterable[str] | None = None) -> Subscription:
        sub = Subscription(ids=frozenset(ids), nodes=frozenset(nodes))
        if kinds is not None:
            sub.kinds = frozenset(kinds)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def publish(self, event: JSONObject) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            if sub.overflowed or not sub.wants(event):
                continue
            try:
                sub.queue.put_nowait(event)
            except queue.Full:
                sub.overflowed = True
                self.unsubscribe(sub)

    def close(self) -> None:
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            try:
                sub.queue.put_nowait(None)
            except queue.Full:
                pass

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)
