"""The two directions, at least once each way, with windows of messages in flight.

MQTT -> AMQP: the MQTT thread only queues what arrives (manual ack, so the
broker keeps it). The AMQP thread publishes it with publisher confirms, up to
`confirm_window` unconfirmed at once, and acknowledges it to the MQTT broker
only when RabbitMQ confirmed every route it went to. A publish whose channel
died before its confirm is published again on the next one.

AMQP -> MQTT: a delivery (prefetch window) is published to MQTT at the route's
QoS; at the PUBACK, on the MQTT thread, its tag is handed back through the
inbox, and the AMQP thread acks it, on the same channel only: deliveries of a
dead channel are redelivered by RabbitMQ anyway.

Everything below runs on the AMQP link's thread except the `on_mqtt_*`
methods and `_on_puback` (the MQTT thread) and `begin_drain`/`drained`/
`status` (any thread), which only queue work or read counters.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from functools import partial

import pika

from edgerun.amqp import AmqpError, AmqpLink, QueueSpec
from edgerun.amqpconfirms import ConfirmTracker
from edgerun.mqtt import Inbound, MqttConnection

from .metrics import Metrics
from .routes import Route, RouteTable, Translation

log = logging.getLogger(__name__)

NACK_PAUSE = 1.0  # seconds


@dataclass
class _Job:
    """One MQTT message on its way to every route it matched."""

    message: Inbound
    remaining: int


@dataclass(frozen=True)
class _Publish:
    job: _Job
    route: Route
    routing_key: str


@dataclass(frozen=True)
class _Puback:
    generation: int  # the AMQP channel the delivery came on
    tag: int
    route: Route


@dataclass(frozen=True)
class _Session:
    present: bool
    generation: int  # the MQTT connection


class _Drain:
    pass


_Item = Inbound | _Puback | _Session | _Drain


class Pump:
    def __init__(self, routes: RouteTable, metrics: Metrics, confirm_window: int) -> None:
        self.routes, self.metrics, self.window = routes, metrics, confirm_window
        self._inbox: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._backlog: deque[_Publish] = deque()
        self._unconfirmed: ConfirmTracker[_Publish] = ConfirmTracker()
        self._stale: dict[int, int] = {}  # AMQP generation -> deliveries awaiting a PUBACK
        # deliveries of the current channel, in tag order -> PUBACKed yet; acked in runs
        self._outstanding: OrderedDict[int, bool] = OrderedDict()
        self._done_behind: list[int] = []  # PUBACKed while an older delivery still waits
        self.to_mqtt_in_flight = 0
        self.draining = False
        self._paused = False  # after a nack, publishing waits a moment instead of spinning
        self.progress = threading.Event()  # set whenever something in flight settles
        self._props = {r.name: pika.BasicProperties(
            content_type=r.content_type, delivery_mode=2 if r.persistent else None)
            for r in routes.mqtt_to_amqp}
        self._forwarded = {r.name: metrics.forwarded.labels(r.name, str(r.direction))
                           for r in routes.routes}  # children looked up once, not per message
        self.mqtt: MqttConnection | None = None
        self.link: AmqpLink | None = None

    def attach(self, mqtt: MqttConnection, link: AmqpLink) -> None:
        self.mqtt, self.link = mqtt, link

    # --- the MQTT thread: queue and wake, nothing else ------------------------------------
    def on_mqtt_message(self, message: Inbound) -> None:
        self._put(message)

    def on_mqtt_connected(self, session_present: bool) -> None:
        assert self.mqtt is not None
        self._put(_Session(session_present, self.mqtt.generation))

    def _on_puback(self, generation: int, tag: int, route: Route) -> None:
        self._put(_Puback(generation, tag, route))

    def _put(self, item: _Item) -> None:
        self._inbox.put(item)
        assert self.link is not None
        self.link.wake()

    # --- any thread ------------------------------------------------------------------------
    def begin_drain(self) -> None:
        self._put(_Drain())

    @property
    def to_amqp_in_flight(self) -> int:
        return len(self._unconfirmed) + len(self._backlog)

    def drained(self) -> bool:
        """Nothing in flight is still able to complete."""
        assert self.link is not None and self.mqtt is not None
        amqp_done = not self.link.ready or (self.draining and not self._unconfirmed)
        mqtt_done = not self.mqtt.connected.is_set() or self.to_mqtt_in_flight == 0
        return amqp_done and mqtt_done

    # --- the AMQP thread: amqp.Handler --------------------------------------------------------
    def on_ready(self) -> None:
        self.on_wake()
        self._maybe_consume()

    def on_lost(self) -> None:
        """The channel died: what it did not confirm goes out again on the next one."""
        self._backlog.extendleft(reversed(self._unconfirmed.reset()))
        self._outstanding.clear()  # RabbitMQ requeued them; the PUBACKs are just counted
        self._done_behind.clear()
        self._paused = False  # its timer died with the connection
        self.progress.set()

    def on_wake(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Inbound):
                self._take(item)
            elif isinstance(item, _Puback):
                self._puback(item)
            elif isinstance(item, _Session):
                self._session(item)
            else:
                self._drain()
        self._ack_deliveries()
        self._publish_backlog()

    def on_confirm(self, tag: int, multiple: bool, ok: bool) -> None:
        settled = self._unconfirmed.settle(tag, multiple)
        if not ok:
            for item in settled:
                self.metrics.nacked.labels(item.route.name).inc()
            log.warning("RabbitMQ refused %d publish(es) (a full queue?); sending again in "
                        "%.0f s", len(settled), NACK_PAUSE)
            self._backlog.extendleft(reversed(settled))
            if not self._paused:
                self._paused = True
                assert self.link is not None
                self.link.later(NACK_PAUSE, self._resume)
        else:
            for item in settled:
                self._forwarded[item.route.name].inc()
                item.job.remaining -= 1
                if item.job.remaining == 0 and item.job.message.qos > 0:
                    assert self.mqtt is not None
                    self.mqtt.ack(item.job.message)
        self.progress.set()
        self._publish_backlog()

    def on_delivery(self, queue: QueueSpec, tag: int, routing_key: str, body: bytes) -> None:
        assert self.link is not None and self.mqtt is not None
        route = self.routes.route_for_queue(queue.name)
        if route is None:  # not a queue of ours: cannot happen, but never lose the delivery
            return
        found = self.routes.from_amqp(route, routing_key)
        if found.destination is None:
            self._dropped(found, routing_key)
            self.link.reject(tag)
            return
        generation = self.link.generation
        self._outstanding[tag] = False
        self._stale[generation] = self._stale.get(generation, 0) + 1
        self.to_mqtt_in_flight += 1
        self.mqtt.publish(found.destination, body, route.qos, route.retain,
                          on_done=partial(self._on_puback, generation, tag, route))

    # --- the AMQP thread: the work ------------------------------------------------------------
    def _take(self, message: Inbound) -> None:
        if self.draining:
            return  # not acked: the broker redelivers it to the next run
        found = self.routes.from_mqtt(message.topic)
        good = [t for t in found if t.destination is not None]
        for bad in (t for t in found if t.destination is None):
            self._dropped(bad, message.topic)
        if not found:
            self.metrics.drop("none", "no_route", f"no route matches topic {message.topic!r}")
        if not good:
            if message.qos > 0:
                assert self.mqtt is not None
                self.mqtt.ack(message)
            return
        job = _Job(message, len(good))
        self._backlog.extend(_Publish(job, t.route, t.destination or "") for t in good)

    def _resume(self) -> None:
        self._paused = False
        self._publish_backlog()

    def _publish_backlog(self) -> None:
        link = self.link
        assert link is not None
        while not self._paused and self._backlog and link.ready \
                and len(self._unconfirmed) < self.window:
            item = self._backlog.popleft()
            try:
                tag = link.publish(item.route.exchange, item.routing_key, item.job.message.payload,
                                   self._props[item.route.name])
            except AmqpError as exc:
                log.debug("%s; keeping the message for the next connection", exc)
                self._backlog.appendleft(item)
                return
            self._unconfirmed.add(tag, item)

    def _puback(self, item: _Puback) -> None:
        assert self.link is not None
        self.to_mqtt_in_flight -= 1
        left = self._stale[item.generation] - 1
        if left:
            self._stale[item.generation] = left
        else:
            del self._stale[item.generation]
        self._forwarded[item.route.name].inc()
        if item.generation == self.link.generation and item.tag in self._outstanding:
            self._outstanding[item.tag] = True
            if next(iter(self._outstanding)) != item.tag:
                self._done_behind.append(item.tag)
        self.progress.set()
        self._maybe_consume()

    def _ack_deliveries(self) -> None:
        """basic.ack what was PUBACKed: the oldest run at once (multiple), the rest singly."""
        assert self.link is not None
        last = None
        while self._outstanding:
            tag, done = next(iter(self._outstanding.items()))
            if not done:
                break
            self._outstanding.popitem(last=False)
            last = tag
        if last is not None:
            self.link.ack(last, multiple=True)
        for tag in self._done_behind:
            if self._outstanding.pop(tag, False):
                self.link.ack(tag)
        self._done_behind.clear()

    def _maybe_consume(self) -> None:
        """Consume once publishes of older channels are done: at most two windows in flight."""
        link = self.link
        assert link is not None
        if link.ready and not link.consuming and not self.draining \
                and all(g == link.generation for g in self._stale):
            link.consume()

    def _session(self, item: _Session) -> None:
        if not item.present:
            return  # the broker forgot what it sent: keep every copy we hold
        before = len(self._backlog)
        self._backlog = deque(p for p in self._backlog
                              if p.job.message.generation >= item.generation)
        if before != len(self._backlog):
            log.info("MQTT session resumed: %d unsent message(s) will be redelivered",
                     before - len(self._backlog))

    def _drain(self) -> None:
        assert self.link is not None
        self.draining = True
        self.link.cancel_consumers()
        self._backlog.clear()  # never published, never acked: redelivered to the next run
        self.progress.set()

    def _dropped(self, found: Translation, where: str) -> None:
        self.metrics.drop(found.route.name, found.reason or "bad_topic",
                          f"{where[:200]!r}: {found.problem}")
