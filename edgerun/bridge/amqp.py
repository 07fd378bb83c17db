"""The AMQP side: one thread owns a pika SelectConnection, and reconnects it.

Every pika call runs on this thread. Other threads never touch pika: they call
`wake()`, which asks the thread (through pika's add_callback_threadsafe) to run
the handler's `on_wake`, where the handler drains its own inbox. After every
connect the thread declares the exchanges, the bridge's durable queues and
their bindings, turns on publisher confirms and a prefetch window, and tells
the handler, which then starts the consumers. A lost connection or channel
stops the I/O loop; the thread waits a jittered back-off on the stop event and
connects again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import pika
import pika.exceptions
from pika.adapters.select_connection import SelectConnection

from edgerun.amqp import connection_parameters
from edgerun.backoff import Backoff
from edgerun.settings import BrokerURL, TLSFiles

from .errors import BridgeError
from .routes import Route, RouteTable

log = logging.getLogger(__name__)


class Handler(Protocol):
    """What the link calls, always on its own thread."""

    def on_ready(self) -> None: ...
    def on_lost(self) -> None: ...
    def on_wake(self) -> None: ...
    def on_confirm(self, tag: int, multiple: bool, ok: bool) -> None: ...
    def on_delivery(self, route: Route, tag: int, routing_key: str, body: bytes) -> None: ...


class AmqpLink:
    def __init__(self, url: BrokerURL, vhost: str, routes: RouteTable, handler: Handler, *,
                 prefetch: int = 500, queue_type: str = "classic", heartbeat: int = 30,
                 ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, backoff_cap: float = 30.0,
                 name: str = "amqp") -> None:
        self.url, self.vhost, self.routes, self.handler = url, vhost, routes, handler
        self.prefetch, self.queue_type, self.name = prefetch, queue_type, name
        self._backoff_cap = backoff_cap
        # built once: a bad TLS file is a ConfigError at start-up, not at every reconnect
        self._parameters = connection_parameters(url, TLSFiles(ca_file, cert_file, key_file),
                                                 name=name, heartbeat=heartbeat)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ioloop: Any = None  # the running connection's loop, guarded by _lock
        self._wake_pending = False
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._channel: Any = None
        self._next_tag = 0
        self._was_up = False
        self.ready = False  # declared and in confirm mode (thread only)
        self.consuming = False
        self.connected = threading.Event()
        self.generation = 0  # counts channels that became ready
        self.reconnects = 0
        self.last_error: str | None = None

    # --- any thread -------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the connection (unacked deliveries go back to their queues) and end."""
        self._stop.set()
        self._call(self._close)
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Have the link thread run handler.on_wake soon; many wakes coalesce into one."""
        with self._lock:
            if self._wake_pending or self._ioloop is None:
                return
            self._wake_pending = True
            self._ioloop.add_callback_threadsafe(self._on_wake)

    def _call(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._ioloop is not None:
                self._ioloop.add_callback_threadsafe(fn)

    # --- the link thread: what the handler calls ----------------------------------------
    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: pika.BasicProperties) -> int:
        """basic_publish on the confirm channel; the tag its confirm will carry."""
        if not self.ready:
            raise BridgeError(f"{self.name}: not connected")
        try:
            self._channel.basic_publish(exchange, routing_key, body, properties)
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BridgeError(f"{self.name}: publish failed: {exc!r}") from exc
        self._next_tag += 1
        return self._next_tag

    def ack(self, tag: int, multiple: bool = False) -> None:
        self._settle(lambda: self._channel.basic_ack(tag, multiple=multiple))

    def reject(self, tag: int) -> None:
        """Drop a delivery (or dead-letter it, where the queue has a policy for that)."""
        self._settle(lambda: self._channel.basic_reject(tag, requeue=False))

    def _settle(self, call: Callable[[], None]) -> None:
        if not self.ready:
            return  # the channel is gone; the broker has requeued the delivery
        try:
            call()
        except (pika.exceptions.AMQPError, OSError) as exc:
            log.debug("%s: settle failed: %r", self.name, exc)

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run fn on this thread after `delay` seconds, if the connection lives that long."""
        if self._conn is not None:
            self._conn.ioloop.call_later(delay, fn)

    def consume(self) -> None:
        """Start the consumers of the amqp_to_mqtt routes on the current channel."""
        if not self.ready or self.consuming:
            return
        self.consuming = True
        try:
            for route in self.routes.amqp_to_mqtt:
                self._channel.basic_consume(route.queue, partial(self._on_delivery, route))
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._note_error(f"cannot consume: {exc!r}; reconnecting")
            self._close()

    def cancel_consumers(self) -> None:
        """Stop taking deliveries (SIGTERM); what is in flight still completes."""
        if self.ready and self.consuming:
            try:
                for tag in list(self._channel.consumer_tags):
                    self._channel.basic_cancel(tag)
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.debug("%s: cancel failed: %r", self.name, exc)

    # --- the link thread: the connection ----------------------------------------------
    def _run(self) -> None:
        backoff = Backoff(self._stop, cap=self._backoff_cap)
        while not self._stop.is_set():
            self._was_up = False
            self._serve_once()
            if self._stop.is_set():
                break
            if self._was_up:
                backoff.reset()
            if backoff.wait():
                break

    def _serve_once(self) -> None:
        try:
            conn = SelectConnection(self._parameters, on_open_callback=self._on_open,
                                    on_open_error_callback=self._on_open_error,
                                    on_close_callback=self._on_closed)
        except (pika.exceptions.AMQPError, OSError, ValueError) as exc:
            self._note_error(f"cannot connect to {self.url}: {exc!r}")
            return
        self._conn = conn
        with self._lock:
            self._ioloop, self._wake_pending = conn.ioloop, False
            if self._stop.is_set():  # stop() came before there was a loop to tell
                conn.ioloop.add_callback_threadsafe(self._close)
        try:
            conn.ioloop.start()
        except Exception:  # a bug must not end the link for good
            log.exception("%s: unexpected error; reconnecting", self.name)
        finally:
            with self._lock:
                self._ioloop = None
            self._connection_gone()
            try:
                conn.ioloop.close()
            except Exception:
                log.debug("%s: closing the I/O loop failed", self.name, exc_info=True)

    def _connection_gone(self) -> None:
        was_ready = self.ready
        self.ready = self.consuming = False
        self._channel = self._conn = None
        self.connected.clear()
        if was_ready:
            self.handler.on_lost()

    def _close(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            if not (conn.is_closing or conn.is_closed):
                conn.close()
                return
        except pika.exceptions.AMQPError:
            pass
        conn.ioloop.stop()

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._on_channel_open)

    def _on_open_error(self, conn: Any, error: BaseException) -> None:
        self._note_error(f"cannot connect to {self.url}: {error!r}")
        conn.ioloop.stop()

    def _on_closed(self, conn: Any, reason: BaseException) -> None:
        if self.ready and not self._stop.is_set():
            self._note_error(f"lost the connection to {self.url}: {reason!r}")
        conn.ioloop.stop()

    def _on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled)
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if not self._stop.is_set():
            self._note_error(f"channel closed by {self.url}: {reason!r}")
        self._close()

    def _on_cancelled(self, frame: Any) -> None:
        """RabbitMQ cancelled a consumer (its queue was deleted, its node went down)."""
        if not self._stop.is_set():
            self._note_error(f"RabbitMQ cancelled consumer {frame.method.consumer_tag}; "
                             "reconnecting to declare the queues again")
            self._close()

    def _on_confirm_mode(self, _frame: Any) -> None:
        """Declare everything; pika sends the calls in order, the last one's answer ends it."""
        self._next_tag = 0
        channel = self._channel
        for exchange, kind in self.routes.exchanges().items():
            channel.exchange_declare(exchange, exchange_type=kind, durable=True)
        arguments = {"x-queue-type": "quorum"} if self.queue_type == "quorum" else None
        for route in self.routes.amqp_to_mqtt:
            channel.queue_declare(route.queue, durable=True, arguments=arguments)
            channel.queue_bind(route.queue, route.exchange, routing_key=route.binding_key)
        channel.basic_qos(prefetch_count=self.prefetch, callback=self._on_declared)

    def _on_declared(self, _frame: Any) -> None:
        self.generation += 1
        if self.generation > 1:
            self.reconnects += 1
        self.ready = self._was_up = True
        self.connected.set()
        log.info("%s: connected to %s; exchanges and %d queue(s) declared", self.name, self.url,
                 len(self.routes.amqp_to_mqtt))
        self.handler.on_ready()

    def _on_wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self.handler.on_wake()

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        self.handler.on_confirm(method.delivery_tag, bool(method.multiple), ok)

    def _on_delivery(self, route: Route, _channel: Any, method: Any, _props: Any,
                     body: bytes) -> None:
        self.handler.on_delivery(route, method.delivery_tag, method.routing_key, body)

    def _note_error(self, text: str) -> None:
        if text != self.last_error:
            log.warning("%s: %s", self.name, text)
        self.last_error = text
