"""The AMQP messenger: RabbitMQ, through the bridge (PROTOCOL.md, "AMQP side").

Tasks go to exchange `edgerun.tasks` with routing key `node.{node}`
(application/json, persistent, publisher-confirmed). One durable queue takes
`node.*.updates` and `node.*.status` from `edgerun.events` and, to record tasks
other clients dispatched, `node.*` from `edgerun.tasks`; live output comes
through a second, exclusive queue (it is worthless once the reader is gone).

It runs on the shared AMQP transport (`edgerun.amqp.AmqpLink`), as the bridge
does: one thread owns the connection; other threads queue commands and wake
it. Publishes are confirmed in a window (up to `confirm_window` awaiting their
confirm at once), `on_done` runs at the confirm; what a lost channel did not
confirm is published again on the next one, and a nacked publish after a pause.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from queue import Empty, SimpleQueue

import pika

from edgerun.amqp import AmqpError, AmqpLink, QueueSpec, Topology
from edgerun.amqpconfirms import ConfirmTracker
from edgerun.bridge.resync import CONTROL_EXCHANGE, resync_request
from edgerun.protocol import (
    AUDIT_EXCHANGE,
    EVENTS_EXCHANGE,
    SCHEDULER_QUEUE,
    TASKS_EXCHANGE,
    Channel,
    binding,
    parse_routing_key,
    routing_key,
)
from edgerun.scheduler.messaging.acks import DeliveryAcks
from edgerun.scheduler.messaging.base import Incoming, Messenger, OnDone
from edgerun.settings import BrokerURL, TLSFiles

log = logging.getLogger(__name__)

JSON = "application/json"
NACK_PAUSE = 1.0  # seconds before a refused publish goes out again
STOP_FLUSH = 5.0  # seconds stop() waits for queued publishes to be confirmed


@dataclass(frozen=True)
class _Publish:
    exchange: str
    key: str
    payload: bytes
    on_done: OnDone | None


@dataclass(frozen=True)
class _Ack:
    generation: int
    tag: int


class AmqpMessenger(Messenger):
    kind = "amqp"

    def __init__(self, url: BrokerURL | Sequence[BrokerURL], *,
                 tasks_exchange: str = TASKS_EXCHANGE, events_exchange: str = EVENTS_EXCHANGE,
                 audit_exchange: str = AUDIT_EXCHANGE, queue: str = SCHEDULER_QUEUE,
                 record_external: bool = True, tls: TLSFiles | None = None,
                 prefetch: int = 500, confirm_window: int = 1000,
                 queue_type: str = "classic") -> None:
        urls = (url,) if isinstance(url, BrokerURL) else tuple(url)
        super().__init__(urls[0])
        self.tasks_exchange, self.events_exchange = tasks_exchange, events_exchange
        self.audit_exchange, self.queue = audit_exchange, queue
        self.record_external, self.prefetch = record_external, prefetch
        self.window = confirm_window
        self._inbox: SimpleQueue[_Publish | _Ack] = SimpleQueue()
        self._backlog: deque[_Publish] = deque()  # link thread only
        self._unconfirmed: ConfirmTracker[_Publish] = ConfirmTracker()
        self._acks = DeliveryAcks()  # link thread only
        self._paused = False
        self._outstanding = 0  # publishes queued and not yet confirmed, under _count_lock
        self._count_lock = threading.Lock()
        self._deliver: Callable[[Incoming], None] | None = None
        self._props = pika.BasicProperties(content_type=JSON, delivery_mode=2)
        bindings = [(events_exchange, binding(Channel.UPDATES)),
                    (events_exchange, binding(Channel.STATUS))]
        if record_external:
            bindings.append((tasks_exchange, binding(Channel.TASKS)))
        # quorum: replicated over a RabbitMQ cluster's nodes (the live-output queue is
        # exclusive, hence classic: it dies with this connection anyway)
        self.main_queue = QueueSpec(queue, tuple(bindings), arguments=(
            (("x-queue-type", "quorum"),) if queue_type == "quorum" else ()))
        self.live_queue = QueueSpec(f"{queue}.live.{uuid.uuid4().hex[:8]}",
                                    ((events_exchange, binding(Channel.OUTPUT)),), durable=False,
                                    exclusive=True, auto_delete=True, auto_ack=True)
        exchanges = tuple((e, "topic") for e in dict.fromkeys(
            (tasks_exchange, events_exchange, audit_exchange)) if e)
        exchanges += ((CONTROL_EXCHANGE, "fanout"),)  # re-sync requests to the bridges
        # built once: a bad TLS file is a ConfigError at start-up, not at every reconnect
        self.link = AmqpLink(urls, Topology(exchanges, (self.main_queue, self.live_queue),
                                            prefetch), self, tls=tls, heartbeat=30,
                             name="edgerun-scheduler", blocked_connection_timeout=60)

    # --- other threads ------------------------------------------------------------
    def start(self, deliver: Callable[[Incoming], None]) -> None:
        self._deliver = deliver
        self.link.start()

    def stop(self) -> None:
        deadline = time.monotonic() + STOP_FLUSH
        while self._outstanding and self.link.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        self.link.stop()

    def send(self, node: str, payload: bytes, on_done: OnDone | None = None) -> None:
        self._submit(_Publish(self.tasks_exchange, routing_key(node), payload, on_done))

    def publish_event(self, subject: str, node: str, state: str, payload: bytes) -> None:
        if self.audit_exchange:
            key = f"{subject.rstrip('s')}.{node}.{state}"
            self._submit(_Publish(self.audit_exchange, key, payload, None))

    def ack(self, message: Incoming) -> None:
        generation, tag = message.token
        if tag is not None:
            self._inbox.put(_Ack(generation, tag))
            self.link.wake()

    @property
    def last_error(self) -> str | None:
        return self.link.last_error

    @property
    def node(self) -> BrokerURL | None:
        return self.link.node if self.connected.is_set() else None

    def _submit(self, item: _Publish) -> None:
        with self._count_lock:
            self._outstanding += 1
        self._inbox.put(item)
        self.link.wake()

    # --- the link thread: edgerun.amqp.Handler ------------------------------------------
    def on_ready(self) -> None:
        self._acks.reset()  # a new channel numbers its deliveries from 1
        self.connected.set()
        # ask the bridges to have the MQTT broker re-send every retained status
        # (edgerun/bridge/resync.py): this scheduler may have missed them
        self._submit(_Publish(CONTROL_EXCHANGE, "", resync_request(self.queue), None))
        self.on_wake()
        self.link.consume()

    def on_lost(self) -> None:
        """The channel died: what it did not confirm goes out again on the next one."""
        self.connected.clear()
        self._acks.reset()  # RabbitMQ requeues what the lost channel had delivered
        self._backlog.extendleft(reversed(self._unconfirmed.reset()))
        self._paused = False  # its timer died with the connection

    def on_wake(self) -> None:
        generation = self.link.generation
        while True:
            try:
                item = self._inbox.get_nowait()
            except Empty:
                break
            if isinstance(item, _Publish):
                self._backlog.append(item)
            elif item.generation != generation:
                pass  # that channel is gone, the message redelivered
            elif not self._acks.acked(item.tag):
                log.debug("ignored a second ack of delivery %d", item.tag)
        self._send_acks()
        self._publish_backlog()

    def _send_acks(self) -> None:
        """The acks the service made since the last wake-up, in as few frames as can be:
        one `multiple` ack for the oldest run, single ones past a message still open."""
        upto, singles = self._acks.settle()
        if upto is not None:
            self.link.ack(upto, multiple=True)
        for tag in singles:
            self.link.ack(tag)

    def on_confirm(self, tag: int, multiple: bool, ok: bool) -> None:
        settled = self._unconfirmed.settle(tag, multiple)
        if not ok:
            # the link (edgerun/amqp.py) warns once per episode, naming the election
            log.debug("RabbitMQ refused %d publish(es); sending again in %.0f s",
                      len(settled), NACK_PAUSE)
            self._backlog.extendleft(reversed(settled))
            if not self._paused:
                self._paused = True
                self.link.later(NACK_PAUSE, self._resume)
            return
        with self._count_lock:
            self._outstanding -= len(settled)
        for item in settled:
            if item.on_done is not None:
                try:
                    item.on_done()
                except Exception:  # the service's callback must not end the connection
                    log.exception("a publish callback failed")
        self._publish_backlog()

    def on_delivery(self, queue: QueueSpec, tag: int, routing_key: str, body: bytes) -> None:
        parsed = parse_routing_key(routing_key)
        auto = queue.auto_ack
        if parsed is None or self._deliver is None:
            log.warning("ignored a message with routing key %r", routing_key[:200])
            if not auto:
                self.link.ack(tag)
            return
        node, channel = parsed
        if not auto:
            self._acks.delivered(tag)
        self._deliver(Incoming(node, channel, body,
                               (self.link.generation, None if auto else tag)))

    def _resume(self) -> None:
        self._paused = False
        self._publish_backlog()

    def _publish_backlog(self) -> None:
        link = self.link
        while not self._paused and self._backlog and link.ready \
                and len(self._unconfirmed) < self.window:
            item = self._backlog.popleft()
            try:
                tag = link.publish(item.exchange, item.key, item.payload, self._props)
            except AmqpError as exc:
                log.debug("%s; keeping the message for the next connection", exc)
                self._backlog.appendleft(item)
                return
            self._unconfirmed.add(tag, item)
