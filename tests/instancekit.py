"""One `serve`'s store side for tests: a Store with its event hub and its LISTEN relay, and a
reader of its events as streams.py reads them."""

from __future__ import annotations

from typing import Any

from edgerun.scheduler.store.cluster import relay
from edgerun.scheduler.store.events import EventHub, Subscription
from edgerun.scheduler.store.tasks import Store


class Instance:
    """A Store with its hub and its LISTEN relay, as one `serve` has them."""

    def __init__(self, url: str) -> None:
        self.store = Store(url)
        self.hub = EventHub(self.store)
        self.store.on_events = self.hub.committed
        listener: Any = None

        def deliver(message: dict[str, Any]) -> None:
            relay(self.hub, message, listener.read)

        def caught_up() -> None:
            self.hub.catch_up(listener.latest(), listener.read)
        listener = self.store.listen(deliver, caught_up, start=False)
        self.listener = listener.start()
        assert self.listener.ready.wait(10)

    def close(self) -> None:
        self.listener.stop()
        self.store.close()


class Reader:
    """As streams.py reads: subscribe first; then, resuming (`since` given), every logged
    event after `since` from the log, or, fresh, nothing before the hub's latest id;
    then the live events above what it has."""

    def __init__(self, instance: Instance, since: int | None) -> None:
        self.instance = instance
        self.sub: Subscription = instance.hub.subscribe()
        self.ids: list[int] = []
        if since is None:
            self.start = self.seen_up_to = instance.hub.last_id
            return
        self.start = seen = since
        while True:
            page = instance.store.events_after(seen, 500)
            self.ids.extend(i for i, _ in page)
            if len(page) < 500:
                break
            seen = page[-1][0]
        self.seen_up_to = self.ids[-1] if self.ids else since

    def drain(self) -> None:
        while not self.sub.queue.empty():
            item = self.sub.queue.get_nowait()
            assert item is not None, self.sub.closed
            if item[0] > self.seen_up_to:
                self.ids.append(item[0])
                self.seen_up_to = item[0]

    def caught_up(self, through: int) -> bool:
        self.drain()
        return self.seen_up_to >= through

    def leave(self) -> None:
        self.drain()
        self.instance.hub.unsubscribe(self.sub)

    def check(self, through: int | None = None) -> None:
        """Every id from its start on, each once, in order (up to `through` if given)."""
        end = through if through is not None else self.seen_up_to
        assert self.ids == list(range(self.start + 1, end + 1)), \
            f"reader from {self.start}: a gap or a repeat"
