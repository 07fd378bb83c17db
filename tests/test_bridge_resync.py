"""The bridge's re-sync listener (edgerun/bridge/resync.py) on its own, with a private
RabbitMQ: requests are answered, a burst is folded into one pass and the next one,
junk is ignored, and it listens again after RabbitMQ restarts."""

from __future__ import annotations

import threading
import time
import uuid

from edgerun.bridge.resync import Resync, resync_request
from edgerun.settings import parse_broker_url

from .brokers import wait_until
from .rabbit import Rabbit


class Counter:
    def __init__(self) -> None:
        self.calls: list[float] = []
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.calls.append(time.monotonic())

    def __len__(self) -> int:
        with self.lock:
            return len(self.calls)


def publish(rabbit: Rabbit, exchange: str, *bodies: bytes) -> None:
    conn = rabbit.connect()
    try:
        channel = conn.channel()
        for body in bodies:
            channel.basic_publish(exchange, "", body)
    finally:
        conn.close()


def test_junk_is_ignored_a_burst_is_folded_and_it_listens_again_after_a_restart(
        rabbit: Rabbit) -> None:
    exchange = f"control.{uuid.uuid4().hex[:6]}"
    counter = Counter()
    resync = Resync([parse_broker_url(rabbit.url, ("amqp",))], counter, exchange=exchange,
                    min_interval=1.0).start()
    try:
        assert wait_until(lambda: resync.link.consuming, 30), resync.link.last_error
        publish(rabbit, exchange, b"", b"\xff\xfe not json", b"[1, 2]", b'{"kind": "other"}',
                b"null")
        time.sleep(1.5)
        assert len(counter) == 0  # nothing but junk: no re-sync

        publish(rabbit, exchange, *(resync_request(f"s{n}") for n in range(10)))
        # the first at once, the other nine folded into one more after the interval
        assert wait_until(lambda: len(counter) == 2, 30), len(counter)
        time.sleep(1.5)
        assert len(counter) == 2
        assert counter.calls[1] - counter.calls[0] >= 0.9
        assert resync.count == 2

        rabbit.restart()
        assert wait_until(lambda: resync.link.consuming and resync.link.reconnects >= 1, 60), \
            resync.link.last_error
        publish(rabbit, exchange, resync_request("after"))
        assert wait_until(lambda: len(counter) == 3, 30), len(counter)
    finally:
        resync.stop()
