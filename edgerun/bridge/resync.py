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
connection is a small pika connection of its own on its own thread; the consumer
callback only sets a flag, and the thread asks the MQTT connection (whose own thread
does the work) to subscribe.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from edgerun.backoff import Backoff
from edgerun.settings import BrokerURL, TLSFiles

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
    """Answers re-sync requests by calling `resubscribe()` (thread-safe, non-blocking)."""

    def __init__(self, urls: Sequence[BrokerURL], resubscribe: Callable[[], None], *,
                 tls: TLSFiles | None = None, exchange: str = CONTROL_EXCHANGE,
                 min_interval: float = 2.0) -> None:
        self.urls, self.resubscribe, self.tls = list(urls), resubscribe, tls
        self.exchange, self.min_interval = exchange, min_interval
        self.count = 0
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._last = 0.0
        self._thread = threading.Thread(target=self._run, name="bridge-resync", daemon=True)

    def start(self) -> Resync:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        import pika
        import pika.exceptions

        from edgerun.amqp import connection_parameters
        backoff = Backoff(self._stop, cap=30.0)
        index = 0
        while not self._stop.is_set():
            url = self.urls[index % len(self.urls)]
            conn: Any = None
            try:
                conn = pika.BlockingConnection(connection_parameters(
                    url, self.tls, name="edgerun-bridge-resync", heartbeat=30))
                channel = conn.channel()
                channel.exchange_declare(self.exchange, "fanout", durable=True)
                queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
                channel.queue_bind(queue, self.exchange)
                channel.basic_consume(queue, self._on_message, auto_ack=True)
                backoff.reset()
                log.info("re-sync: listening on exchange %s", self.exchange)
                while not self._stop.is_set():
                    conn.process_data_events(time_limit=0.5)
                    self._maybe_resync()
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.warning("re-sync: connection to %s: %s", url.address, exc or type(exc))
                index += 1
            finally:
                if conn is not None and conn.is_open:
                    try:
                        conn.close()
                    except Exception as exc:  # already broken
                        log.debug("re-sync: closing: %s", exc)
            if self._stop.is_set() or backoff.wait():
                break

    def _on_message(self, _channel: Any, _method: Any, _props: Any, body: bytes) -> None:
        if is_resync(body):  # never block here: the loop above does the work
            self._wanted.set()

    def _maybe_resync(self) -> None:
        if not self._wanted.is_set() or time.monotonic() - self._last < self.min_interval:
            return
        self._wanted.clear()
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
