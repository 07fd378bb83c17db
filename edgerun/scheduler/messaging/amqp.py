"""The AMQP messenger: pika, through the bridge (PROTOCOL.md, "AMQP side").

Tasks go to exchange `edgerun.tasks` with routing key `node.{node}`
(application/json, persistent, publisher-confirmed). One durable queue takes
`node.*.updates` and `node.*.status` from `edgerun.events` and, to record tasks
other clients dispatched, `node.*` from `edgerun.tasks`; live output comes
through a second, exclusive queue (it is worthless once the reader is gone).

One thread owns the connection: other threads queue commands and wake it
with `add_callback_threadsafe`; consumer callbacks only hand messages on.
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

from edgerun.backoff import Backoff
from edgerun.protocol import Channel, is_node_id
from edgerun.amqp import connection_parameters
from edgerun.settings import BrokerURL, TLSFiles

from .base import Incoming, Messenger, OnDone

log = logging.getLogger(__name__)

JSON = "application/json"
CHANNELS = {"updates": Channel.UPDATES, "status": Channel.STATUS, "output": Channel.OUTPUT}


def parse_routing_key(key: str) -> tuple[str, Channel] | None:
    """`node.{node}` (a task) or `node.{node}.{updates|status|output}`."""
    parts = key.split(".")
    if len(parts) not in (2, 3) or parts[0] != "node" or not is_node_id(parts[1]):
        return None
    if len(parts) == 2:
        return parts[1], Channel.TASKS
    channel = CHANNELS.get(parts[2])
    return (parts[1], channel) if channel is not None else None


class AmqpMessenger(Messenger):
    kind = "amqp"

    def __init__(self, url: BrokerURL, *, tasks_exchange: str = "edgerun.tasks",
                 events_exchange: str = "edgerun.events", audit_exchange: str = "edgerun.audit",
                 queue: str = "edgerun.scheduler", record_external: bool = True,
                 tls: TLSFiles | None = None, prefetch: int = 500) -> None:
        super().__init__(url)
        self.tasks_exchange, self.events_exchange = tasks_exchange, events_exchange
        self.audit_exchange, self.queue = audit_exchange, queue
        self.record_external, self.prefetch = record_external, prefetch
        # built once: a bad TLS file is a ConfigError at start-up, not at every reconnect
        self._params = connection_parameters(url, tls, name="edgerun-scheduler", heartbeat=30,
                                             blocked_connection_timeout=60, socket_timeout=5)
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._channel: Any = None
        self._generation = 0
        self._deliver: Callable[[Incoming], None] | None = None
        self._last_error: str | None = None

    # --- other threads ------------------------------------------------------------
    def start(self, deliver: Callable[[Incoming], None]) -> None:
        self._deliver = deliver
        self._thread = threading.Thread(target=self._run, name="scheduler-amqp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(10.0)

    def send(self, node: str, payload: bytes, on_done: OnDone | None = None) -> None:
        self._submit(lambda: self._publish(self.tasks_exchange, f"node.{node}", payload, on_done))

    def publish_event(self, subject: str, node: str, state: str, payload: bytes) -> None:
        if self.audit_exchange:
            key = f"{subject.rstrip('s')}.{node}.{state}"
            self._submit(lambda: self._publish(self.audit_exchange, key, payload, None))

    def ack(self, message: Incoming) -> None:
        generation, tag = message.token
        if tag is not None:
            self._submit(lambda: self._ack(generation, tag))

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def _submit(self, command: Callable[[], None]) -> None:
        with self._lock:
            self._commands.append(command)
        self._wake()

    def _wake(self) -> None:
        conn = self._conn
        if conn is not None:
            try:
                conn.add_callback_threadsafe(lambda: None)
            except Exception as exc:  # closed meanwhile: the loop notices on its own
                log.debug("wake-up not delivered: %s", exc)

    # --- the connection thread --------------------------------------------------------
    def _publish(self, exchange: str, key: str, payload: bytes, on_done: OnDone | None) -> None:
        props = pika.BasicProperties(content_type=JSON, delivery_mode=2)
        self._channel.basic_publish(exchange, key, payload, props)  # confirmed: blocks to ack
        if on_done is not None:
            on_done()

    def _ack(self, generation: int, tag: int) -> None:
        if generation == self._generation and self._channel is not None \
                and self._channel.is_open:
            self._channel.basic_ack(tag)

    def _run(self) -> None:
        backoff = Backoff(self._stop, cap=30.0)
        while not self._stop.is_set():
            try:
                self._connect()
                backoff.reset()
                self._serve()
            except (pika.exceptions.AMQPError, OSError, ssl.SSLError) as exc:
                what = "lost the connection to" if self.connected.is_set() \
                    else "cannot connect to"
                self._note_error(f"{what} {self.url}: {_describe(exc)}")
            finally:
                self.connected.clear()
                self._close()
            if self._stop.is_set() or backoff.wait():
                break

    def _connect(self) -> None:
        self._conn = pika.BlockingConnection(self._params)
        ch = self._conn.channel()
        for exchange in (self.tasks_exchange, self.events_exchange, self.audit_exchange):
            if exchange:
                ch.exchange_declare(exchange, "topic", durable=True)
        ch.queue_declare(self.queue, durable=True)
        ch.queue_bind(self.queue, self.events_exchange, "node.*.updates")
        ch.queue_bind(self.queue, self.events_exchange, "node.*.status")
        if self.record_external:
            ch.queue_bind(self.queue, self.tasks_exchange, "node.*")
        live = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        ch.queue_bind(live, self.events_exchange, "node.*.output")
        ch.basic_qos(prefetch_count=self.prefetch)
        ch.confirm_delivery()
        self._generation += 1
        generation = self._generation
        ch.basic_consume(self.queue, lambda _c, m, _p, body: self._on_message(
            generation, m.delivery_tag, m.routing_key, body))
        ch.basic_consume(live, lambda _c, m, _p, body: self._on_message(
            generation, None, m.routing_key, body), auto_ack=True)
        self._channel = ch
        self.connected.set()
        self._last_error = None
        log.info("connected to %s (queue %s)", self.url, self.queue)

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._run_commands()
            self._conn.process_data_events(time_limit=0.5)
        self._run_commands()

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            try:
                command()
            except (pika.exceptions.AMQPError, OSError):
                with self._lock:  # not sent: goes out first after the reconnect
                    self._commands.appendleft(command)
                raise

    def _close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception as exc:  # already broken: nothing to save
                log.debug("closing a broken connection: %s", exc)

    def _on_message(self, generation: int, tag: int | None, key: str, body: bytes) -> None:
        parsed = parse_routing_key(key)
        if parsed is None or self._deliver is None:
            log.warning("ignored a message with routing key %r", key[:200])
            if tag is not None:
                self._channel.basic_ack(tag)
            return
        node, channel = parsed
        self._deliver(Incoming(node, channel, body, (generation, tag)))

    def _note_error(self, text: str) -> None:
        if text != self._last_error:
            log.warning("%s", text)
        self._last_error = text


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    if isinstance(exc, pika.exceptions.AMQPConnectionError) and exc.args:
        inner = exc.args[0]
        text = str(inner) or repr(inner)
    return text[:300] or type(exc).__name__
