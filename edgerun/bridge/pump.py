"""The two directions, at least once each way, with windows of messages in flight.

MQTT -> AMQP: the MQTT thread only queues what arrives (manual ack, so the
broker keeps it). The AMQP thread publishes it with publisher confirms, up to
`confirm_window` unconfirmed at once, and acknowledges it to the MQTT broker
only when RabbitMQ confirmed every route it went to. PUBACKs leave in the order
the messages arrived (MQTT 3.1.1, 4.6): a message confirmed (or dropped) early
waits for the older ones. A publish whose channel died before its confirm is
published again on the next one. QoS 1 messages go out before QoS 0 ones, and
QoS 0 messages (live output) held in the bridge are limited per topic, that is
per node and route, and in all: past that budget they are dropped and counted
(`reason="over_budget"`), so one node flooding its output delays no other
node's updates and a stalled RabbitMQ holds a bounded amount of memory here.

AMQP -> MQTT: a delivery (prefetch window) is published to MQTT at the route's
QoS; at the PUBACK, on the MQTT thread, its tag is handed back through the
inbox, and the AMQP thread acks it, on the same channel only: deliveries of a
dead channel are redelivered by RabbitMQ anyway.

Work is batched per wake-up: the MQTT thread wakes the AMQP thread once per
pass of its loop (on_mqtt_pass), the deliveries of one read go to the MQTT
thread as one command, and the PUBACKs the confirms of one read allow as one
command.

Everything below runs on the AMQP link's thread except the `on_mqtt_*`
methods and `_on_puback` (the MQTT thread) and `begin_drain`/`drained`/
`status` (any thread), which only queue work, take budget or read counters.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from functools import partial

import pika

from edgerun.amqp import AmqpError, AmqpLink, QueueSpec
from edgerun.amqpconfirms import ConfirmTracker
from edgerun.mqtt import Inbound, MqttConnection

from .metrics import Metrics
from .routes import Route, RouteTable, Translation

log = logging.getLogger(__name__)

NACK_PAUSE = 1.0  # seconds
QOS0_PER_TOPIC = 1 << 20  # bytes of QoS 0 messages held per topic (one node's route)
QOS0_TOTAL = 32 << 20  # bytes of QoS 0 messages held in all
TRANSLATIONS = 20_000  # topics whose route matches are remembered (then forgotten at once)
QOS0_IN_FLIGHT = 1 << 20  # bytes of QoS 0 publishes awaiting a confirm: QoS 1 never waits long


@dataclass(eq=False, slots=True)
class _Job:
    """One MQTT message on its way to every route it matched."""

    message: Inbound
    remaining: int
    done: bool = False


@dataclass(eq=False, slots=True)  # not frozen: made per message, a frozen __init__ is slow
class _Publish:
    job: _Job
    route: Route
    routing_key: str


@dataclass(eq=False, slots=True)
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


@dataclass
class Budget:
    """Bytes held per key and in all, for any thread (a lock); keys vanish at zero."""

    per_key: int
    total: int
    held: int = 0
    _by_key: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, key: str, size: int) -> bool:
        with self._lock:
            mine = self._by_key.get(key, 0)
            if mine + size > self.per_key or self.held + size > self.total:
                return False
            self._by_key[key] = mine + size
            self.held += size
            return True

    def give(self, key: str, size: int) -> None:
        with self._lock:
            left = self._by_key.get(key, 0) - size
            if left > 0:
                self._by_key[key] = left
            else:
                self._by_key.pop(key, None)
            self.held -= size

    def keys(self) -> int:
        return len(self._by_key)


class Pump:
    def __init__(self, routes: RouteTable, metrics: Metrics, confirm_window: int, *,
                 qos0_per_topic: int = QOS0_PER_TOPIC, qos0_total: int = QOS0_TOTAL,
                 qos0_in_flight: int = QOS0_IN_FLIGHT) -> None:
        self.routes, self.metrics, self.window = routes, metrics, confirm_window
        self._inbox: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._backlog: deque[_Publish] = deque()  # QoS 1 messages not yet published
        self._backlog0: deque[_Publish] = deque()  # QoS 0 messages not yet published
        self._unconfirmed: ConfirmTracker[_Publish] = ConfirmTracker()
        self._order: deque[_Job] = deque()  # QoS 1 messages in arrival order, until PUBACKed
        self.budget = Budget(qos0_per_topic, qos0_total)
        self._qos0_limit, self._qos0_unconfirmed = qos0_in_flight, 0
        self._stale: dict[int, int] = {}  # AMQP generation -> deliveries awaiting a PUBACK
        # deliveries of the current channel, in tag order -> PUBACKed yet; acked in runs
        self._outstanding: OrderedDict[int, bool] = OrderedDict()
        self._done_behind: list[int] = []  # PUBACKed while an older delivery still waits
        self._translations: dict[str, list[Translation]] = {}  # topic -> routes, bounded
        self._back: dict[tuple[str, str], Translation] = {}  # (route, key) -> topic, bounded
        self._to_mqtt: list[tuple[str, bytes, int, bool, partial[None]]] = []
        self.to_mqtt_in_flight = 0
        self.draining = False
        self._paused = False  # after a nack, publishing waits a moment instead of spinning
        self._after_confirms = False  # _confirmed is due at the end of this loop pass
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
        if message.qos == 0 and not self.budget.take(message.topic, len(message.payload)):
            found = self.routes.from_mqtt(message.topic)
            self.metrics.drop(found[0].route.name if found else "none", "over_budget",
                              f"{message.topic[:200]!r}: QoS 0 budget of this topic or of "
                              "the bridge is full")
            return
        self._inbox.put(message)  # the AMQP thread is woken once per pass: on_mqtt_pass

    def on_mqtt_connected(self, session_present: bool) -> None:
        assert self.mqtt is not None
        self._put(_Session(session_present, self.mqtt.generation))

    def _on_puback(self, generation: int, tag: int, route: Route) -> None:
        self._inbox.put(_Puback(generation, tag, route))  # woken by on_mqtt_pass

    def on_mqtt_pass(self) -> None:
        """The end of a pass of an MQTT loop: one wake-up for what it queued."""
        if not self._inbox.empty():
            assert self.link is not None
            self.link.wake()

    def _put(self, item: _Item) -> None:
        self._inbox.put(item)
        assert self.link is not None
        self.link.wake()

    # --- any thread ------------------------------------------------------------------------
    def begin_drain(self) -> None:
        self._put(_Drain())

    @property
    def to_amqp_in_flight(self) -> int:
        return len(self._unconfirmed) + len(self._backlog) + len(self._backlog0)

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
        for item in reversed(self._unconfirmed.reset()):
            if item.job.message.qos:
                self._backlog.appendleft(item)
            else:
                self._qos0_unconfirmed -= len(item.job.message.payload)
                self._backlog0.appendleft(item)
        self._flush_to_mqtt()  # deliveries of the dead channel: duplicates, never losses
        self._outstanding.clear()  # RabbitMQ requeued them; the PUBACKs are just counted
        self._done_behind.clear()
        self._paused = False  # its timer died with the connection
        self._after_confirms = False  # so did the call of _confirmed
        self.progress.set()

    def on_wake(self) -> None:
        pubacks = 0
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Inbound):
                self._take(item)
            elif isinstance(item, _Puback):
                self._puback(item)
                pubacks += 1
            elif isinstance(item, _Session):
                self._session(item)
            else:
                self._drain()
        if pubacks:
            self.progress.set()
            self._maybe_consume()
        self._ack_deliveries()
        self._send_pubacks()
        self._publish_backlog()

    def on_confirm(self, tag: int, multiple: bool, ok: bool) -> None:
        settled = self._unconfirmed.settle(tag, multiple)
        for item in settled:
            if not item.job.message.qos:
                self._qos0_unconfirmed -= len(item.job.message.payload)
        if not ok:
            for item in settled:
                self.metrics.nacked.labels(item.route.name).inc()
            # the link says it once per episode of refusals (edgerun/amqp.py), not here
            # per nack: an election after a node loss refuses every publish for a while
            log.debug("RabbitMQ refused %d publish(es); sending again in %.0f s",
                      len(settled), NACK_PAUSE)
            for item in reversed(settled):
                (self._backlog if item.job.message.qos else self._backlog0).appendleft(item)
            if not self._paused:
                self._paused = True
                assert self.link is not None
                self.link.later(NACK_PAUSE, self._resume)
        else:
            for item in settled:
                self._forwarded[item.route.name].inc()
                item.job.remaining -= 1
                if item.job.remaining == 0:
                    self._finish(item.job)
        self.progress.set()
        if not self._after_confirms:  # once after this read's confirms, not at each one
            self._after_confirms = True
            assert self.link is not None
            self.link.soon(self._confirmed)

    def _confirmed(self) -> None:
        self._after_confirms = False
        self._send_pubacks()
        self._publish_backlog()

    def on_delivery(self, queue: QueueSpec, tag: int, routing_key: str, body: bytes) -> None:
        assert self.link is not None
        route = self.routes.route_for_queue(queue.name)
        if route is None:  # not a queue of ours: cannot happen, but never lose the delivery
            return
        key = (route.name, routing_key)
        found = self._back.get(key)
        if found is None:
            if len(self._back) >= TRANSLATIONS:
                self._back.clear()
            found = self._back[key] = self.routes.from_amqp(route, routing_key)
        if found.destination is None:
            self._dropped(found, routing_key)
            self.link.reject(tag)
            return
        generation = self.link.generation
        self._outstanding[tag] = False
        self._stale[generation] = self._stale.get(generation, 0) + 1
        self.to_mqtt_in_flight += 1
        if not self._to_mqtt:
            self.link.soon(self._flush_to_mqtt)  # once, after this read's deliveries
        self._to_mqtt.append((found.destination, body, route.qos, route.retain,
                              partial(self._on_puback, generation, tag, route)))

    # --- the AMQP thread: the work ------------------------------------------------------------
    def _flush_to_mqtt(self) -> None:
        if self._to_mqtt:
            assert self.mqtt is not None
            batch, self._to_mqtt = self._to_mqtt, []
            self.mqtt.publish_many(batch)

    def _take(self, message: Inbound) -> None:
        if self.draining:
            self._release(message)
            return  # not acked: the broker redelivers it to the next run
        found = self._translations.get(message.topic)
        if found is None:  # a topic seen before (one per node and route) skips the matching
            if len(self._translations) >= TRANSLATIONS:
                self._translations.clear()
            found = self._translations[message.topic] = self.routes.from_mqtt(message.topic)
        good = [t for t in found if t.destination is not None]
        for bad in (t for t in found if t.destination is None):
            self._dropped(bad, message.topic)
        if not found:
            self.metrics.drop("none", "no_route", f"no route matches topic {message.topic!r}")
        job = _Job(message, len(good))
        if message.qos:
            self._order.append(job)
        if not good:
            self._finish(job)
            return
        target = self._backlog if message.qos else self._backlog0
        target.extend(_Publish(job, t.route, t.destination or "") for t in good)

    def _finish(self, job: _Job) -> None:
        """Every copy of the message is confirmed (or it had nowhere to go, or a QoS 0
        message is given up): PUBACK it in its turn, or give its budget back."""
        if job.done:
            return
        job.done = True
        if not job.message.qos:
            self._release(job.message)

    def _release(self, message: Inbound) -> None:
        if not message.qos:
            self.budget.give(message.topic, len(message.payload))

    def _send_pubacks(self) -> None:
        """PUBACK the oldest run of finished messages, in arrival order, as one command."""
        order = self._order
        if not order or (not order[0].done and order[0].message.generation >= self._mqtt_gen()):
            return
        current, acks = self._mqtt_gen(), []
        while order:
            job = order[0]
            if job.message.generation < current:
                order.popleft()  # its connection is gone: the broker sends it again
            elif job.done:
                acks.append(order.popleft().message)
            else:
                break
        if acks:
            assert self.mqtt is not None
            self.mqtt.ack_many(acks)

    def _mqtt_gen(self) -> int:
        assert self.mqtt is not None
        return self.mqtt.generation

    def _resume(self) -> None:
        self._paused = False
        self._publish_backlog()

    def _publish_backlog(self) -> None:
        link = self.link
        assert link is not None
        if self._paused or not link.ready:
            return
        for backlog, qos0 in ((self._backlog, False), (self._backlog0, True)):
            while backlog and len(self._unconfirmed) < self.window:
                item = backlog[0]
                size = len(item.job.message.payload)
                if qos0 and self._qos0_unconfirmed and \
                        self._qos0_unconfirmed + size > self._qos0_limit:
                    return  # QoS 0 takes a bounded share of the window
                try:
                    tag = link.publish(item.route.exchange, item.routing_key,
                                       item.job.message.payload, self._props[item.route.name])
                except AmqpError as exc:
                    log.debug("%s; keeping the message for the next connection", exc)
                    return
                backlog.popleft()
                if qos0:
                    self._qos0_unconfirmed += size
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
        before = len(self._backlog)  # QoS 0 comes on a connection of its own: kept
        self._backlog = deque(p for p in self._backlog
                              if p.job.message.generation >= item.generation)
        dropped = before - len(self._backlog)
        if dropped:
            log.info("MQTT session resumed: %d unsent message(s) will be redelivered", dropped)

    def _drain(self) -> None:
        assert self.link is not None
        self.draining = True
        self.link.cancel_consumers()
        for item in self._backlog0:
            self._finish(item.job)
        self._backlog.clear()  # never published, never acked: redelivered to the next run
        self._backlog0.clear()
        self.progress.set()

    def _dropped(self, found: Translation, where: str) -> None:
        self.metrics.drop(found.route.name, found.reason or "bad_topic",
                          f"{where[:200]!r}: {found.problem}")
