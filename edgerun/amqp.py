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
next of its broker URLs (the nodes of one cluster), in turn. It starts at a random
node of the list (`first_node`), so that the clients of one cluster spread over
its nodes; the back-off grows once per round of the list (`Rotation`).

A channel RabbitMQ refuses publishes on is renewed on the same connection, at once
and then at growing intervals while the refusals go on (`Refusals`): a channel that
first publishes to a quorum queue while the queue elects a new leader (its leader's
node was lost) is refused for as long as it lives on RabbitMQ 3.10 (the channel's
client for that queue keeps the dead leader and is never told the new one; the
connection and the node are fine), while a new channel is accepted as soon as the
election is over. The renewal goes through the channel's loss path: the handler's
on_lost, so what was not confirmed is published again on the new channel, never
dropped, then on_ready. A full queue refuses too; it then costs a renewal every few
seconds. The refusals are logged once per episode, and their end once.
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

from .amqpconfirms import Refusals, Settled
from .backoff import Rotation, first_node
from .errors import ConfigError, EdgerunError
from .settings import BrokerURL, TLSFiles

log = logging.getLogger(__name__)

NACK_GAP = 2.0  # seconds without a nack that end an episode of them (handlers retry after 1 s)
DRAIN_S = 2.0  # a channel to renew waits this long at most for the confirms it still owes


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
        self._on_error = on_error
        # built once: a bad TLS file is a ConfigError at start-up, not at every reconnect
        self._parameters = [connection_parameters(u, tls, name=name, heartbeat=heartbeat,
                                                  **extra) for u in self.urls]
        self.node: BrokerURL | None = None  # the broker node connected to, None while down
        self._stop = threading.Event()
        # the URL tried now (or connected to): from a random one, round robin
        self._rotation = Rotation(len(self.urls), self._stop, first=first_node(len(self.urls)),
                                  cap=backoff_cap)
        self._lock = threading.Lock()
        self._ioloop: Any = None  # the running connection's loop, guarded by _lock
        self._wake_pending = False  # _on_wake is asked for and has not run yet
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._channel: Any = None
        self._next_tag = 0  # the tag of the latest publish on this channel
        self._settled = Settled()  # the tags confirmed or refused on this channel
        self._refused_upto = 0  # the latest publish when the latest refusal came
        self._was_up = False
        self.ready = False  # declared and in confirm mode (thread only)
        self.consuming = False
        self.connected = threading.Event()
        self.generation = 0  # counts channels that became ready
        self.reconnects = 0
        self.last_error: str | None = None
        self.refusals = Refusals(gap=NACK_GAP)
        self.renewals = 0  # channels renewed because RabbitMQ refused publishes on them
        self._renewing = False  # this channel is being closed to open a fresh one
        self._renew_planned = False  # a renewal is on the loop's timer list
        self._draining = False  # no more publishes on this channel: it is to be renewed
        self._ready_since = 0.0  # when the channel became ready (monotonic)
        self._conn_up = False  # this connection had a ready channel already

    @property
    def url(self) -> BrokerURL:
        """The broker node connected to now (or tried next)."""
        return self.urls[self._rotation.index]

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
        if not self.ready or self._draining:
            raise AmqpError(f"{self.name}: not connected" if not self.ready
                            else f"{self.name}: renewing the channel")
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
        rotation = self._rotation
        while not self._stop.is_set():
            self._was_up = False
            self._serve_once()
            if self._stop.is_set():
                break
            if self._was_up:
                rotation.up()
            if rotation.wait():  # the next node, after the back-off
                break
            if len(self.urls) > 1:
                log.info("%s: next broker node: %s", self.name, self.url)

    def _serve_once(self) -> None:
        try:
            conn = pika.SelectConnection(self._parameters[self._rotation.index],
                                         on_open_callback=self._on_open,
                                         on_open_error_callback=self._on_open_error,
                                         on_close_callback=self._on_closed)
        except (pika.exceptions.AMQPError, OSError, ValueError) as exc:
            self._note_error(f"cannot connect to {self.url}: {exc!r}")
            return
        self._conn, self._conn_up = conn, False
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
        self.node = None
        self._conn = None
        self._renewing = self._renew_planned = False  # its timers died with its loop
        self.connected.clear()
        self._channel_gone()

    def _channel_gone(self) -> None:
        was_ready = self.ready
        self.ready = self.consuming = self._draining = False
        self._channel = None
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
        if self.ready and not self._stop.is_set():
            self._note_error(f"lost the connection to {self.url}: {reason!r}")
        conn.ioloop.stop()

    def _on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled)
        channel.confirm_delivery(partial(self._on_confirm, channel),
                                 callback=self._on_confirm_mode)

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is not self._channel:
            return  # one renewed already
        conn = self._conn
        if self._renewing and not self._stop.is_set() and conn is not None and conn.is_open:
            self._renewing = False
            self._channel_gone()  # the handler's on_lost: what it did not confirm goes again
            try:
                conn.channel(on_open_callback=self._on_channel_open)
                return
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._note_error(f"cannot open a channel on {self.url}: {exc!r}")
        elif not self._stop.is_set():
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
        self._next_tag = self._refused_upto = 0
        self._settled = Settled()
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
        if self.generation > 1 and not self._conn_up:
            self.reconnects += 1
        self.ready = self._was_up = True
        self._ready_since = time.monotonic()
        self.node = self.url
        self.connected.set()
        if self._conn_up:
            log.info("%s: new channel on %s ready", self.name, self.url)
        else:
            log.info("%s: connected to %s%s; exchanges and %d queue(s) declared", self.name,
                     self.url, f" (node {self._rotation.index + 1} of {len(self.urls)})"
                     if len(self.urls) > 1 else "", len(self.topology.queues))
        self._conn_up = True
        self.handler.on_ready()

    def _on_wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self.handler.on_wake()

    def _on_confirm(self, channel: Any, frame: Any) -> None:
        if channel is not self._channel:
            return  # a confirm of a channel renewed since: its publishes went out again
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        tag = method.delivery_tag
        self.handler.on_confirm(tag, bool(method.multiple), ok)
        self._settled.settle(tag, bool(method.multiple))
        if not ok:
            self._refused_upto = self._next_tag
            self._nacked()
        elif tag > self._refused_upto and self.refusals.episode is not None and \
                not self.refusals.episode.reported:
            self._accepted_again()  # a publish made after the latest refusal went in
        if self._draining and self._settled.all_answered(self._next_tag):
            self._close_for_renewal(self.generation)

    def _nacked(self) -> None:
        """RabbitMQ refused a publish: renew the channel soon (see the module's docstring),
        and say so once per episode of refusals."""
        now = time.monotonic()
        if self.refusals.refused(now):  # once per episode, even if the text is the last one
            self._note_error(f"RabbitMQ ({self.url}) refuses publishes: a quorum queue is "
                             "electing a new leader after the loss of a node, or a queue is "
                             "full; renewing the channel and sending them again (said once "
                             "per episode of refusals)", again=True)
        self._plan_renewal(now)

    def _accepted_again(self) -> None:
        episode = self.refusals.accepted()
        if episode is not None:
            log.info("%s: RabbitMQ (%s) accepts publishes again, %.2f s after it began "
                     "refusing them (%d refusal(s), %d channel(s) renewed)", self.name,
                     self.url, time.monotonic() - episode.started, episode.refused,
                     episode.renewals)

    def _plan_renewal(self, now: float) -> None:
        if self._renew_planned or self._renewing or self._draining or not self.ready or \
                self._conn is None:
            return
        at = self.refusals.renew_at(now, self._ready_since)
        if at is not None:
            self._renew_planned = True
            self._conn.ioloop.call_later(max(0.0, at - now), self._renew_channel)

    def _renew_channel(self) -> None:
        """Publish no more on this channel; close it once it confirmed or refused all it
        was sent (or after DRAIN_S): what the handler then sends again was refused or is
        unanswered, not accepted a moment later (a duplicate)."""
        self._renew_planned = False
        now = time.monotonic()
        if not self.ready or self._renewing or self._draining or self._stop.is_set() or \
                self.refusals.renew_at(now, self._ready_since) is None:
            return
        self.renewals += 1
        self.refusals.renewed(now)
        log.info("%s: renewing the channel on %s that publishes were refused on (what it did "
                 "not confirm is sent again on the new one)", self.name, self.url)
        self._draining = True
        if self._settled.all_answered(self._next_tag):
            self._close_for_renewal(self.generation)
        elif self._conn is not None:
            self._conn.ioloop.call_later(DRAIN_S, partial(self._close_for_renewal,
                                                          self.generation))

    def _close_for_renewal(self, generation: int) -> None:
        if not self._draining or generation != self.generation or not self.ready:
            return  # closed already, or another channel's by now
        self._draining, self._renewing = False, True
        try:
            self._channel.close()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._note_error(f"cannot close the channel on {self.url}: {exc!r}; reconnecting")
            self._renewing = False
            self._close()

    def _on_delivery(self, queue: QueueSpec, channel: Any, method: Any, _props: Any,
                     body: bytes) -> None:
        if channel is not self._channel:
            return  # of a channel being renewed: RabbitMQ gives it to the next one
        key = method.routing_key
        if not isinstance(key, str):  # pika hands over a key that is not UTF-8 as bytes
            log.warning("%s: rejected a delivery from %s whose routing key is not UTF-8: %r",
                        self.name, queue.name, key[:200])
            if not queue.auto_ack:
                self.reject(method.delivery_tag)
            return
        self.handler.on_delivery(queue, method.delivery_tag, key, body)

    def _note_error(self, text: str, again: bool = False) -> None:
        if again or text != self.last_error:
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
