"""The small-footprint messenger: MQTT straight to the broker, no RabbitMQ at all.

Subscribes with a persistent session (clean_session=False, QoS 1) to every
node's updates, status (retained) and tasks topics, and to output at QoS 0;
acknowledges each message only after the service recorded it.

Several `serve` instances on one store give the same `share_group`: updates and
tasks then come through `$share/{group}/...` subscriptions, so the broker hands
each message to one instance (Mosquitto does so for MQTT 3.1.1 clients too).
Status and output stay plain subscriptions on every instance: status is retained
(brokers send no retained messages to shared subscriptions) and recording it
twice is harmless (the store serialises it), and live output is wanted by
whichever instance has a reader.

Re-sync: on every connection the messenger also subscribes to the exact status
topic of every node it knows (from the store at start, and each node whose status
it saw) and unsubscribes at once. A broker that sends no retained messages to
wildcard subscriptions (RabbitMQ's MQTT plugin) still sends them for an exact
topic, so a restarted scheduler knows every known node's current status within
seconds; on Mosquitto it only repeats what the wildcard brought.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from edgerun.mqtt import Inbound, MqttConnection, TLSFiles
from edgerun.protocol import Channel, Topics
from edgerun.scheduler.messaging.adopt import Adopter, Members
from edgerun.scheduler.messaging.base import Incoming, Messenger, OnDone
from edgerun.settings import BrokerURL

log = logging.getLogger(__name__)

# QoS 1 publishes in flight: paho looks through all of them on every PUBACK
# (Client._update_inflight), so the window costs CPU per message in proportion to its
# size; measured with bench/fanout.py, 1,000 cost 0.65 ms of CPU a PUBACK (issue 22)
MAX_INFLIGHT = 100

class MqttMessenger(Messenger):
    kind = "mqtt"

    def __init__(self, url: BrokerURL | Sequence[BrokerURL], *, prefix: str = "edgerun",
                 client_id: str | None = None, events_topic: str | None = None,
                 record_external: bool = True, tls: TLSFiles | None = None,
                 share_group: str | None = None, members_db: str | None = None) -> None:
        urls = (url,) if isinstance(url, BrokerURL) else tuple(url)
        self.urls, self.tls = urls, tls
        super().__init__(urls[0])
        self.topics = Topics(prefix)
        self.events_topic = events_topic if events_topic is not None else f"{prefix}/events"
        self.client_id = client_id or f"edgerun-scheduler-{uuid.uuid4().hex[:8]}"
        share = f"$share/{share_group}/" if share_group else ""
        subs = [(share + self.topics.wildcard(Channel.UPDATES), 1),
                (self.topics.wildcard(Channel.STATUS), 1),
                (self.topics.wildcard(Channel.OUTPUT), 0)]
        if record_external:
            subs.append((share + self.topics.wildcard(Channel.TASKS), 1))
        self._deliver: Callable[[Incoming], None] | None = None
        self._known: set[str] = set()
        self._known_lock = threading.Lock()
        self.resyncs = 0
        self.conn = MqttConnection(urls, self.client_id, on_message=self._on_message,
                                   subscriptions=subs, clean_session=False, manual_ack=True,
                                   tls=tls, name="scheduler-mqtt", max_inflight=MAX_INFLIGHT,
                                   on_connected=self._on_connected)
        self.connected = self.conn.connected
        self._filters = [topic for topic, _qos in subs]
        self._stopping = threading.Event()
        # several instances in a share group on PostgreSQL: adopt the sessions of dead ones
        self.members = Members(members_db, share_group, self.client_id) \
            if share_group and members_db else None
        self.adopter: Adopter | None = None

    def seed(self, nodes: Iterable[str]) -> None:
        with self._known_lock:
            self._known.update(nodes)

    def start(self, deliver: Callable[[Incoming], None]) -> None:
        self._deliver = deliver
        if self.members is not None and self.members.claim(self._stopping):
            self.adopter = Adopter(self.members, self.urls, self.tls,
                                   lambda: list(self._filters), self._on_adopted).start()
        self.conn.start()

    def stop(self) -> None:
        self._stopping.set()
        if self.adopter is not None:
            self.adopter.stop()
        elif self.members is not None:
            self.members.close()
        self.conn.flush(2.0)
        self.conn.stop()

    def send(self, node: str, payload: bytes, on_done: OnDone | None = None) -> None:
        self.conn.publish(self.topics.tasks(node), payload, 1, on_done=on_done)

    def publish_event(self, subject: str, node: str, state: str, payload: bytes) -> None:
        if self.events_topic:
            self.conn.publish(f"{self.events_topic}/{subject}/{node}", payload, 1)

    def send_many(self, sends: Sequence[tuple[str, bytes, OnDone | None]]) -> None:
        self.conn.publish_many([(self.topics.tasks(node), payload, 1, False, on_done)
                                for node, payload, on_done in sends])

    def publish_events(self, events: Sequence[tuple[str, str, str, bytes]]) -> None:
        if self.events_topic:
            self.conn.publish_many([(f"{self.events_topic}/{subject}/{node}", payload, 1,
                                     False, None) for subject, node, _state, payload in events])

    def ack_many(self, messages: Sequence[Incoming]) -> None:
        plain = [m.token for m in messages if isinstance(m.token, Inbound)
                 and m.token.qos > 0]
        if plain:
            self.conn.ack_many(plain)
        for message in messages:
            if not isinstance(message.token, Inbound):
                self.ack(message)

    def ack(self, message: Incoming) -> None:
        token = message.token
        if isinstance(token, Inbound) and token.qos > 0:
            self.conn.ack(token)
        elif isinstance(token, _Adopted):
            if token.msg.qos > 0:
                token.conn.ack(token.msg)
            token.acked()

    @property
    def last_error(self) -> str | None:
        return self.conn.last_error

    @property
    def node(self) -> BrokerURL | None:
        return self.conn.node

    def _on_connected(self, _session_present: bool) -> None:  # network thread: only queues
        with self._known_lock:
            nodes = sorted(self._known)
        if not nodes:
            return
        self.resyncs += 1
        log.info("re-sync: asking the broker for the retained status of %d known nodes",
                 len(nodes))
        for node in nodes:
            topic = self.topics.status(node)
            self.conn.subscribe(topic, 1)
            self.conn.unsubscribe(topic)

    def _on_adopted(self, msg: Inbound, conn: MqttConnection,
                    acked: Callable[[], None]) -> None:  # an adopted session's thread
        parsed = self.topics.parse(msg.topic)
        if parsed is None or self._deliver is None:
            if msg.qos > 0:
                conn.ack(msg)
            acked()
            return
        node, channel = parsed
        self._deliver(Incoming(node, channel, msg.payload, _Adopted(conn, msg, acked)))

    def _on_message(self, msg: Inbound) -> None:  # network thread: never block
        parsed = self.topics.parse(msg.topic)
        if parsed is None or self._deliver is None:
            if msg.qos > 0:
                self.conn.ack(msg)
            return
        node, channel = parsed
        if channel == Channel.STATUS:
            with self._known_lock:
                self._known.add(node)
        self._deliver(Incoming(node, channel, msg.payload, msg))


@dataclass(frozen=True)
class _Adopted:
    """The ack token of a message from an adopted session (messaging/adopt.py)."""

    conn: MqttConnection
    msg: Inbound
    acked: Callable[[], None]
