"""Relaying the other instances' events (issue 22): an instance with no reader reads none
of them back from the log, and a reader it gets later (fresh, resuming at 0 or at any
id, even at the very moment relays are being skipped) still sees every committed event
exactly once, in id order, its own instance's and the others' alike.

Against a real PostgreSQL (tests/pg.py); the "instances" are Store objects with
connections of their own, each with its hub and its LISTEN relay, as `serve` has them.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from edgerun.scheduler.store.cluster import relay
from edgerun.scheduler.store.events import EventHub
from edgerun.scheduler.store.tasks import Store

from . import instancekit
from .instancekit import Reader
from .brokers import wait_until
from .pg import fresh_database, pg_database  # noqa: F401  (fixture)


class Instance(instancekit.Instance):
    """The shared test instance, with a writer of tagged events."""

    def write(self, batches: list[int], tag: str) -> None:
        for k, size in enumerate(batches):
            with self.store.transaction():
                for j in range(size):
                    self.store.log_event("tasks", {"kind": "task_event", "node": tag,
                                                   "id": f"{tag}-{k}-{j}"})


def test_an_idle_instance_reads_nothing_back_and_its_later_readers_miss_nothing(
        pg_database: str) -> None:  # noqa: F811
    url = fresh_database(pg_database)
    writer, idle = Instance(url), Instance(url)
    try:
        writer.write([1, 7, 3, 40, 1, 1, 25], "w")
        total = 78
        assert wait_until(lambda: idle.hub.last_id == total, 20, 0.02)
        assert idle.listener.rows_read == 0  # no reader: the hub knows the id, reads none

        fresh = Reader(idle, None)
        assert fresh.start == total  # a fresh reader starts at the latest, not behind it
        from_zero, from_mid = Reader(idle, 0), Reader(idle, 31)
        idle.write([2, 5], "i")  # its own events, and the writer's after them
        writer.write([4, 9, 1], "w")
        total += 21
        assert wait_until(lambda: idle.hub.last_id == total, 20, 0.02)
        for reader in (fresh, from_zero, from_mid):
            reader.leave()
            reader.check(total)
        rows_with_readers = idle.listener.rows_read
        assert rows_with_readers > 0  # the writer's events were relayed to them

        # idle again: the writer's next events are not read back; a reader resuming at an
        # id of the earlier run still gets them all, from the log
        writer.write([10, 10, 10], "w")
        total += 30
        assert wait_until(lambda: idle.hub.last_id == total, 20, 0.02)
        assert idle.listener.rows_read == rows_with_readers
        late = Reader(idle, 50)
        writer.write([3], "w")
        total += 3
        assert wait_until(lambda: late.sub.queue.qsize() >= 3, 20, 0.02)
        late.leave()
        late.check(total)
        assert [i for i, _ in idle.store.events_after(0, 1000)] == list(range(1, total + 1))
    finally:
        writer.close()
        idle.close()


def test_readers_coming_and_going_while_relays_are_skipped_miss_nothing(
        pg_database: str) -> None:  # noqa: F811
    url = fresh_database(pg_database)
    instances = [Instance(url) for _ in range(3)]
    rng = random.Random(22)
    batches = {i: [rng.randint(1, 12) for _ in range(150)] for i in range(3)}
    total = sum(sum(b) for b in batches.values())
    gone: list[Reader] = []
    staying: list[Reader] = []
    done = threading.Event()

    def come_and_go() -> None:
        """On the two instances that do not write most, readers that subscribe and leave
        again and again (each hub keeps going from none to some readers), fresh ones and
        ones resuming anywhere; some stay to the end."""
        open_: list[Reader] = []
        while not done.is_set():
            inst = instances[rng.choice((1, 2))]
            since = None if rng.random() < 0.5 else rng.randint(0, inst.hub.last_id)
            open_.append(Reader(inst, since))
            for reader in open_:
                reader.drain()
            if len(open_) > 2 or rng.random() < 0.5:
                leaving = open_.pop(rng.randrange(len(open_)))
                leaving.leave()
                gone.append(leaving)
            done.wait(rng.random() * 0.01)
        if not open_:
            open_.append(Reader(instances[1], rng.randint(0, instances[1].hub.last_id)))
        staying.extend(open_)

    writers = [threading.Thread(target=instances[i].write, args=(batches[i], f"n{i}"))
               for i in range(3)]
    churn = threading.Thread(target=come_and_go)
    try:
        churn.start()
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        done.set()
        churn.join()
        assert wait_until(lambda: all(x.hub.last_id == total for x in instances), 30, 0.05)
        assert len(gone) > 20
        for reader in gone:
            reader.check()  # up to where it left: no gap, no repeat
        for reader in staying:
            assert wait_until(lambda r=reader: r.caught_up(total), 20, 0.02)
            reader.check(total)
        assert [i for i, _ in instances[0].store.events_after(0, 100_000)] == \
            list(range(1, total + 1))
    finally:
        done.set()
        for inst in instances:
            inst.close()


def test_notifications_that_came_together_are_relayed_with_one_read(
        pg_database: str) -> None:  # noqa: F811
    """While the listener is busy relaying, the other instances' commits go on: what
    they notified meanwhile is delivered as one range (one read of the log), and the
    reader still gets every event once, in order."""
    url = fresh_database(pg_database)
    writer = Instance(url)
    store = Store(url)
    hub = EventHub(store)
    store.on_events = hub.committed
    held, release = threading.Event(), threading.Event()
    listener: Any = None

    def deliver(message: dict[str, Any]) -> None:
        if not held.is_set():  # the first delivery waits until the writer is done
            held.set()
            release.wait(30)
        relay(hub, message, listener.read)
    listener = store.listen(deliver, start=False).start()
    try:
        assert listener.ready.wait(10)
        sub = hub.subscribe()
        writer.write([1], "w")
        assert held.wait(10)
        writer.write([2] * 40, "w")  # 40 commits, 40 notifications, while it is held
        release.set()
        total = 81
        assert wait_until(lambda: hub.last_id == total, 20, 0.02)
        got = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
        assert [item[0] for item in got if item is not None] == list(range(1, total + 1))
        assert listener.notes_heard == 41
        assert listener.notes_delivered <= 5  # the first, then the 40 together (a few
        # at most, as the server's packets split them)
    finally:
        release.set()
        listener.stop()
        store.close()
        writer.close()
