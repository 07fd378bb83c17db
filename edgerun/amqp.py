"""AMQP for the bridge and the scheduler: connection parameters, and one connection owner.

The agent never imports this module (it would pull in pika).

`AmqpLink`: one thread owns a pika `SelectConnection` (the asynchronous adapter:
the confirms of a window of publishes arrive as callbacks), through pika's public
API only. Every pika call runs on this thread. Other threads never touch pika: they
call `wake()`, which asks the thread (through pika's add_callback_threadsafe) to run
the handler's `on_wake`, where the handler drains its own inbox. After every connect
the thread declares the topology (exchanges, durable queues and their bindings),
turns on publisher confirms and a prefetch window, and tells the handler, which
then starts the consumers. A lost connection or channel stops the I/O loop; the
thread waits a jittered back-off on the stop event and connects again, to the
next of its broker URLs (the nodes of one cluster), in turn.

Nacks that go on renew the connection (`NACK_RENEW`): a full queue refuses for a
while, but a channel opened on a surviving node while a quorum queue was still
electing its new leader can refuse every publish to that queue for as long as
it lives (seen on RabbitMQ 3.10: the channel's client for the queue never
learns the new leader), while a new channel is accepted at once. The renewal
goes through the ordinary loss path, so what was not confirmed is published
again on the new connection (the handler's on_lost), never dropped.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol
from urllib.parse import unquote

import pika
import pika.exceptions
import pika.spec

from .backoff import Backoff
from .errors import ConfigError, EdgerunError
from .settings import BrokerURL, TLSFiles

log = logging.getLogger(__name__)

NACK_RENEW = 5.0  # seconds of nacks (no gap of NACK_GAP) before the connection is renewed
NACK_GAP = 2.0  # seconds without a nack that end a run of them (handlers retry after 1 s)


class AmqpError(EdgerunError):
    """An AMQP call failed where we made it (pika errors are turned into this)."""


def vhost(url: BrokerURL) -> str:
    """`amqp://host/` and `amqp://host` mean the default vhost `/`; `amqp://host/%2f` too."""
    return unquote(url.path[1:]) if len(url.path) > 1 else "/"


def connection_parameters(url: BrokerURL, tls: TLSFiles | None = None, *, name: str,
                          heartbeat: int = 30, **extra: Any) -> pika.ConnectionParameters:
    """Parameters for `url`; amqps:// verifies the server and may present a client certificate."""
    ssl_options = None
    if url.tls:
        tls = tls or TLSFiles()
        try:
            context = ssl.create_default_context(cafile=tls.ca_file)
            if tls.cert_file:
                context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS files for {url}: {exc}") from None
        ssl_options = pika.SSLOptions(context, url.host)
    return pika.ConnectionParameters(
        host=url.host, port=url.port, virtual_host=vhost(url),
        credentials=pika.PlainCredentials(url.username or "guest", url.password or "guest"),
        heartbeat=heartbeat, ssl_options=ssl_options, connection_attempts=1,
        client_properties={"connection_name": name}, **extra)


# --- the topology a link declares after every connect -----------------------------------
@dataclass(frozen=True)
class QueueSpec:
    """A queue the link declares, binds and consumes."""

    name: str
    bindings: tuple[tuple[str, str], ...] = ()  # (exchange, binding key)
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: tuple[tuple[str, Any], ...] = ()  # x-queue-type, ...
    auto_ack: bool = False  # deliveries need no basic.ack (worthless once the reader is gone)


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[tuple[str, str], ...]  # (name, type); declared durable
    queues: tuple[QueueSpec, ...] = ()
    prefetch: int = 500  # unacknowledged deliveries on the channel


class Handler(Protocol):
    """What the link calls, always on its own thread."""

    def on_ready(self) -> None: ...
    def on_lost(self) -> None: ...
    def on_wake(self) -> None: ...
    def on_confirm(self, tag: int, multiple: bool, ok: bool) -> None: ...
    def on_delivery(self, queue: QueueSpec, tag: int, routing_key: str, body: bytes) -> None: ...


class AmqpLink:
    def __init__(self, urls: BrokerURL | Sequence[BrokerURL], topology: Topology,
                 handler: Handler, *, tls: TLSFiles | None = None, heartbeat: int = 30,
                 backoff_cap: float = 30.0, name: str = "amqp",
                 on_error: Callable[[str], None] | None = None, **extra: Any) -> None:
        self.urls = (urls,) if isinstance(urls, BrokerURL) else tuple(urls)
        if not self.urls:
            raise ConfigError(f"{name}: no AMQP broker URL")
        self.topology, self.handler, self.name = topology, handler, name
        self._backoff_cap, self._on_error = backoff_cap, on_error
        # built once: a bad TLS file is a ConfigError at start-up, not at every reconnect
        self._parameters = [connection_parameters(u, tls, name=name, heartbeat=heartbeat,
                                                  **extra) for u in self.urls]
        self._index = 0  # the URL tried now (or connected to)
        self.node: BrokerURL | None = None  # the broker node connected to, None while down
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ioloop: Any = None  # the running connection's loop, guarded by _lock
        self._wake_pending = False  # _on_wake is asked for and has not run yet
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
        self.nack_renew = NACK_RENEW
        self.renewals = 0  # connections renewed because RabbitMQ kept refusing publishes
        self._renewing = False  # this connection is being closed to open a fresh one
        self._nacks_since: float | None = None  # start of the current run of nacks
        self._last_nack = 0.0

    @property
    def url(self) -> BrokerURL:
        """The broker node connected to now (or tried next)."""
        return self.urls[self._index]

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
            raise AmqpError(f"{self.name}: not connected")
        try:
            self._channel.basic_publish(exchange, routing_key, body, properties)
        except (pika.exceptions.AMQPError, OSError, ValueError) as exc:
            raise AmqpError(f"{self.name}: publish failed: {exc!r}") from exc
        self._next_tag += 1  # a confirm channel numbers its publishes 1, 2, 3, ...
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

    def soon(self, fn: Callable[[], None]) -> None:
        """Run fn on this thread once the current callbacks are done (this loop pass)."""
        if self._conn is not None:
            self._conn.ioloop.call_later(0, fn)

    def consume(self) -> None:
        """Start the consumers of the topology's queues on the current channel."""
        if not self.ready or self.consuming:
            return
        self.consuming = True
        try:
            for queue in self.topology.queues:
                self._channel.basic_consume(queue.name, partial(self._on_delivery, queue),
                                            auto_ack=queue.auto_ack)
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
            renewed, self._renewing = self._renewing, False
            if len(self.urls) > 1 and not renewed:  # a renewal stays on its node
                self._index = (self._index + 1) % len(self.urls)
                log.info("%s: next broker node: %s", self.name, self.url)
            if backoff.wait():
                break

    def _serve_once(self) -> None:
        try:
            conn = pika.SelectConnection(self._parameters[self._index],
                                         on_open_callback=self._on_open,
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
        self.node = None
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
        self._note_error(f"cannot connect to {self.url}: {_describe(error)}")
        conn.ioloop.stop()

    def _on_closed(self, conn: Any, reason: BaseException) -> None:
        if self.ready and not self._stop.is_set() and not self._renewing:
            self._note_error(f"lost the connection to {self.url}: {reason!r}")
        conn.ioloop.stop()

    def _on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled)
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if not self._stop.is_set() and not self._renewing:
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
        for exchange, kind in self.topology.exchanges:
            channel.exchange_declare(exchange, exchange_type=kind, durable=True)
        for queue in self.topology.queues:
            channel.queue_declare(queue.name, durable=queue.durable, exclusive=queue.exclusive,
                                  auto_delete=queue.auto_delete,
                                  arguments=dict(queue.arguments) or None)
            for exchange, key in queue.bindings:
                channel.queue_bind(queue.name, exchange, routing_key=key)
        channel.basic_qos(prefetch_count=self.topology.prefetch, callback=self._on_declared)

    def _on_declared(self, _frame: Any) -> None:
        self.generation += 1
        if self.generation > 1:
            self.reconnects += 1
        self.ready = self._was_up = True
        self._nacks_since = None
        self.node = self.url
        self.connected.set()
        log.info("%s: connected to %s%s; exchanges and %d queue(s) declared", self.name,
                 self.url, f" (node {self._index + 1} of {len(self.urls)})"
                 if len(self.urls) > 1 else "", len(self.topology.queues))
        self.handler.on_ready()

    def _on_wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self.handler.on_wake()

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        self.handler.on_confirm(method.delivery_tag, bool(method.multiple), ok)
        if not ok:
            self._nacked()

    def _nacked(self) -> None:
        """RabbitMQ refused a publish; after NACK_RENEW seconds of refusals, renew the
        connection (see the module's docstring: a channel whose quorum-queue client was
        made during a leader election may refuse for ever; a new one is accepted)."""
        now = time.monotonic()
        if self._nacks_since is None or now - self._last_nack > NACK_GAP:
            self._nacks_since = now
        self._last_nack = now
        if self._renewing or now - self._nacks_since < self.nack_renew:
            return
        self._nacks_since = None
        self.renewals += 1
        self._note_error(f"{self.url} has refused publishes for {self.nack_renew:g} s; "
                         "renewing the connection (what it did not confirm is sent again)")
        self._renewing = True
        try:  # the channel first, so that the connection's close is an orderly one
            self._channel.close()
        except (pika.exceptions.AMQPError, OSError, AttributeError):
            self._close()

    def _on_delivery(self, queue: QueueSpec, _channel: Any, method: Any, _props: Any,
                     body: bytes) -> None:
        key = method.routing_key
        if not isinstance(key, str):  # pika hands over a key that is not UTF-8 as bytes
            log.warning("%s: rejected a delivery from %s whose routing key is not UTF-8: %r",
                        self.name, queue.name, key[:200])
            if not queue.auto_ack:
                self.reject(method.delivery_tag)
            return
        self.handler.on_delivery(queue, method.delivery_tag, key, body)

    def _note_error(self, text: str) -> None:
        if text != self.last_error:
            log.warning("%s: %s", self.name, text)
        self.last_error = text
        if self._on_error is not None:
            self._on_error(text)


def _describe(exc: BaseException) -> str:
    """pika wraps the socket error that says why; name that one."""
    text = str(exc) or repr(exc)
    if isinstance(exc, pika.exceptions.AMQPConnectionError) and exc.args:
        inner = exc.args[0]
        text = str(inner) or repr(inner)
    return text[:300] or type(exc).__name__
