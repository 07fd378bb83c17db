"""Fleet re-sync: a scheduler asks, the bridge has the MQTT broker send every retained status
again, so a scheduler started after the agents (or with a new or restored store) knows
every node's current status within seconds.

The retained statuses live in the MQTT broker. A scheduler in AMQP mode sees them only
as the bridge forwards them, and statuses published before its queue existed went
nowhere. So a scheduler publishes one small message on the fanout exchange
`edgerun.control` whenever its connection comes up; each bridge has an exclusive queue
bound to it and answers by subscribing again to every topic filter of its route table:
MQTT 3.1.1 replaces an existing subscription with the same filter and sends the
retained messages that match it again [MQTT-3.8.4-3], without a gap in delivery (an
unsubscribe + subscribe would have one). The statuses then flow through the normal
route to every scheduler queue; the store makes recording one twice harmless.

Requests within `min_interval` seconds of the last re-sync are folded into one, so
several schedulers starting at once (or a restart loop) cost one pass. The control
connection is an `AmqpLink` (edgerun/amqp.py) of its own, with its own thread and
back-off; on that thread a request asks the MQTT connection (whose own thread does the
work) to subscribe, which only queues a command and never blocks.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from edgerun.settings import BrokerURL, TLSFiles

if TYPE_CHECKING:
    from edgerun.amqp import QueueSpec

log = logging.getLogger(__name__)

CONTROL_EXCHANGE = "edgerun.control"
RESYNC = "resync"


def resync_request(sender: str) -> bytes:
    """The body a scheduler publishes on CONTROL_EXCHANGE to ask for a re-sync."""
    return json.dumps({"v": 1, "kind": RESYNC, "from": sender,
                       "id": uuid.uuid4().hex}).encode()


def is_resync(body: bytes) -> bool:
    try:
        message = json.loads(body)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("kind") == RESYNC


class Resync:
    """Answers re-sync requests by calling `resubscribe()` (thread-safe, non-blocking).

    Its connection is an `AmqpLink` of its own (the shared transport, edgerun/amqp.py),
    whose thread declares the exchange and a private queue after every connect and
    hands each request to `on_delivery`; requests are folded there, on that thread.
    """

    def __init__(self, urls: Sequence[BrokerURL], resubscribe: Callable[[], None], *,
                 tls: TLSFiles | None = None, exchange: str = CONTROL_EXCHANGE,
                 min_interval: float = 2.0) -> None:
        from edgerun.amqp import AmqpLink, QueueSpec, Topology

        self.urls, self.resubscribe, self.tls = list(urls), resubscribe, tls
        self.exchange, self.min_interval = exchange, min_interval
        self.count = 0
        self._last = 0.0
        self._due = False  # a request is folded into a re-sync not yet made (link thread)
        self._carried = False  # one was, when the connection (and its timer) went
        # exclusive: it dies with the connection, and the next one declares it again;
        # requests made while the bridge was away are answered by its own resubscribe
        # after the MQTT connection comes back, or by the scheduler's next request
        queue = QueueSpec(f"edgerun.bridge.resync.{uuid.uuid4().hex[:12]}",
                          ((exchange, ""),), durable=False, exclusive=True,
                          auto_delete=True, auto_ack=True)
        self.link = AmqpLink(self.urls, Topology(((exchange, "fanout"),), (queue,), 10),
                             self, tls=tls, heartbeat=30, name="edgerun-bridge-resync")

    def start(self) -> Resync:
        self.link.start()
        return self

    def stop(self) -> None:
        self.link.stop(5.0)

    # --- the link's thread: edgerun.amqp.Handler --------------------------------------
    def on_ready(self) -> None:
        log.info("re-sync: listening on exchange %s", self.exchange)
        self.link.consume()
        if self._carried:
            self._carried = False
            self._request()

    def on_lost(self) -> None:
        self._carried, self._due = self._carried or self._due, False  # its timer died

    def on_wake(self) -> None:
        pass

    def on_confirm(self, tag: int, multiple: bool, ok: bool) -> None:
        pass  # it publishes nothing

    def on_delivery(self, queue: QueueSpec, tag: int, routing_key: str, body: bytes) -> None:
        if is_resync(body):
            self._request()

    def _request(self) -> None:
        if self._due:
            return
        wait = self._last + self.min_interval - time.monotonic()
        if wait <= 0:
            self._resync()
        else:  # folded into one re-sync when the interval is over
            self._due = True
            self.link.later(wait, self._resync)

    def _resync(self) -> None:
        self._due = False
        self._last = time.monotonic()
        self.count += 1
        log.info("re-sync requested: subscribing again so the broker re-sends retained "
                 "statuses")
        self.resubscribe()


def resubscriber(mqtt: Any, subscriptions: Sequence[tuple[str, int]]) -> Callable[[], None]:
    """What answers a re-sync on a bridge: subscribe again to each filter. A shared filter
    (`$share/GROUP/...`) gets no retained messages, so its plain filter is subscribed and
    at once unsubscribed instead (the broker sends the retained ones in between)."""
    def run() -> None:
        for topic, qos in subscriptions:
            if topic.startswith("$share/"):
                plain = topic.split("/", 2)[2]
                mqtt.subscribe(plain, qos)
                mqtt.unsubscribe(plain)
            else:
                mqtt.subscribe(topic, qos)
    return run
