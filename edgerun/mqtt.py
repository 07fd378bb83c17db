"""A thin, typed layer over paho-mqtt: one thread owns the connection.

Every call into paho (connect, publish, subscribe, ack) runs on the network
thread. Other threads hand it commands through a queue and a wake-up pipe, so
a PUBACK can never race the bookkeeping of the publish it answers, and paho's
socket has exactly one writer. The thread reconnects explicitly with capped,
jittered back-off, re-subscribes after every connect, and sets TCP_NODELAY on
every socket through paho's on_socket_open callback (paho does not set it; QoS 1
then waits ~40 ms per message on Nagle). Only paho's public API is used: its
external-loop calls (loop_read, loop_write, loop_misc, want_write, socket).

Given several addresses of one clustered broker, it fails over: after a failed
attempt or a lost connection it waits its back-off and tries the next address,
round robin; the back-off grows once per round of the addresses, and a
connection that was up resets it. `url` is the
address in use, `node` the one it is connected to (None while down).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from .backoff import Rotation, first_node
from .errors import ConfigError
from .settings import BrokerURL, TLSFiles

__all__ = ["Inbound", "MqttConnection", "TLSFiles", "Will"]

log = logging.getLogger(__name__)

DoneCallback = Callable[[], None]
MAX_PENDING = 50_000  # QoS>0 publishes handed to paho at once, well under its 65,535 ids
READ_BURST = 1000  # packets read while the socket has more, before the loop's next pass


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Inbound(NamedTuple):  # made per message: a tuple is made 3x faster than a dataclass
    """A received message. `generation` counts connections; acks of an older one are dropped."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    generation: int


class MqttConnection:
    def __init__(self, url: BrokerURL | Sequence[BrokerURL], client_id: str, *,
                 on_message: Callable[[Inbound], None] | None = None,
                 on_connected: Callable[[bool], None] | None = None,
                 on_disconnected: Callable[[], None] | None = None,
                 subscriptions: Sequence[tuple[str, int]] = (), clean_session: bool = False,
                 will: Will | None = None, manual_ack: bool = False,
                 tls: TLSFiles | None = None, keepalive: int = 30, max_inflight: int = 100,
                 backoff_cap: float = 30.0, name: str = "mqtt",
                 on_pass: Callable[[], None] | None = None, first: int | None = None) -> None:
        self.urls = (url,) if isinstance(url, BrokerURL) else tuple(url)
        if not self.urls:
            raise ConfigError(f"{name}: no broker address")
        self.node: BrokerURL | None = None  # the address connected to, None while down
        self.client_id, self.name = client_id, name
        self._on_message, self._on_connected = on_message, on_connected
        self._on_disconnected = on_disconnected
        self._on_pass = on_pass  # after each pass of the loop: a consumer's batch ends there
        self._subscriptions = list(subscriptions)
        self._keepalive = keepalive
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pipe_lock = threading.Lock()
        self._asleep = False  # the loop may block in poll: a new command must write the pipe
        self._stop = threading.Event()
        # the address in use (network thread only): round robin from a random one (`first`
        # pins it), so that the agents, bridges and schedulers given one cluster's list
        # spread over its nodes instead of all landing on the first; the back-off grows
        # once per round of the addresses
        start = first_node(len(self.urls)) if first is None else first
        self._rotation = Rotation(len(self.urls), self._stop, first=start, cap=backoff_cap)
        self._thread: threading.Thread | None = None
        self._pending: dict[int, DoneCallback | None] = {}  # mid -> callback, network thread only
        self._unsent: dict[int, DoneCallback] = {}  # QoS 0 mid -> on_sent, network thread only
        # QoS>0 publishes waiting for a message id: paho's ids wrap at 65,535
        self._held: deque[tuple[str, bytes, int, bool, DoneCallback | None]] = deque()
        self._idle = threading.Condition()
        self._queued = 0  # commands not yet run, guarded by _idle
        self.connected = threading.Event()
        self.generation = 0
        self.reconnects = 0
        self.last_error: str | None = None
        self._was_up = self._refused = False
        self._client = self._make_client(clean_session, will, manual_ack, tls, max_inflight)

    @property
    def url(self) -> BrokerURL:
        """The address in use (connected, or being tried)."""
        return self.urls[self._rotation.index]

    # --- set-up -----------------------------------------------------------------
    def _make_client(self, clean_session: bool, will: Will | None, manual_ack: bool,
                     tls: TLSFiles | None, max_inflight: int) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=clean_session, protocol=paho.MQTTv311,
                             manual_ack=manual_ack)
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)
        if self.url.username:
            client.username_pw_set(self.url.username, self.url.password)
        if will:
            client.will_set(will.topic, will.payload, will.qos, will.retain)
        if self.url.tls:
            tls = tls or TLSFiles()
            try:
                client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file,
                               keyfile=tls.key_file, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"{self.name}: cannot load TLS files: {exc}") from None
        client.on_socket_open = _nodelay
        # Registering a write callback stops paho from writing on the caller's
        # thread; our loop polls want_write() instead.
        client.on_socket_register_write = _ignore
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        return client

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no Last Will) and end the network thread."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # stuck in a blocking connect; it closes nothing we still use
        with self._pipe_lock:
            if self._wake_w >= 0:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

    # --- what other threads call -----------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                on_done: DoneCallback | None = None,
                on_sent: DoneCallback | None = None) -> None:
        """Queue a publish; `on_done` runs on the network thread at the PUBACK
        (at once for QoS 0). Messages wait while disconnected and go out after.
        `on_sent` (QoS 0 only) runs once the message has left this process's memory:
        written to the socket, or thrown away with a lost connection; a publisher
        keeps a memory budget with it."""
        if on_sent is not None:
            self._submit(lambda: self._publish_qos0(topic, payload, retain, on_sent))
            return
        self._submit(lambda: self._publish_now(topic, payload, qos, retain, on_done))

    def ack(self, message: Inbound) -> None:
        """PUBACK a message received with manual_ack, unless its connection is gone."""
        self._submit(lambda: self._ack_now(message))

    def publish_many(self, messages: Sequence[tuple[str, bytes, int, bool,
                                                    DoneCallback | None]]) -> None:
        """`publish` of each (topic, payload, qos, retain, on_done), in order, with one
        wake-up of the network thread instead of one per message."""
        def run() -> None:
            for message in messages:
                self._publish_now(*message)
        self._submit(run)

    def ack_many(self, messages: Sequence[Inbound]) -> None:
        """`ack` of each message, in this order (paho queues the PUBACKs, and writes
        them, in the order it is called), with one wake-up."""
        def run() -> None:
            if not self.connected.is_set():
                return  # their connection is gone: the broker sends them again
            generation = self.generation
            for message in messages:
                if message.generation == generation:
                    self._client.ack(message.mid, message.qos)
        self._submit(run)

    def subscribe(self, topic: str, qos: int) -> None:
        self._submit(lambda: self._subscribe_now(topic, qos))

    def unsubscribe(self, topic: str) -> None:
        self._submit(lambda: self._unsubscribe_now(topic))

    def flush(self, timeout: float) -> bool:
        """Wait until every queued command ran and every QoS>0 publish was acknowledged."""
        with self._idle:
            return self._idle.wait_for(
                lambda: self._queued == 0 and not self._pending and not self._held, timeout)

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._held) + self._queued

    def _submit(self, command: Callable[[], None]) -> None:
        with self._idle:
            self._queued += 1
        self._commands.put(command)
        if self._asleep:  # an awake loop runs the commands before it polls again
            self._wake()

    def _wake(self) -> None:
        with self._pipe_lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # the pipe is full, so the loop will wake anyway

    # --- the network thread ------------------------------------------------------
    def _publish_now(self, topic: str, payload: bytes, qos: int, retain: bool,
                     on_done: DoneCallback | None) -> None:
        if qos > 0 and (self._held or len(self._pending) >= MAX_PENDING):
            self._held.append((topic, payload, qos, retain, on_done))
            return
        self._hand_to_paho(topic, payload, qos, retain, on_done)

    def _publish_qos0(self, topic: str, payload: bytes, retain: bool,
                      on_sent: DoneCallback) -> None:
        info = self._client.publish(topic, payload, 0, retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not self.connected.is_set():
            on_sent()  # not queued, or queued on a socket that is gone
        else:
            self._unsent[info.mid] = on_sent

    def _forget_unsent(self) -> None:
        """paho drops unwritten QoS 0 messages with the connection: give their budget back."""
        unsent, self._unsent = self._unsent, {}
        for on_sent in unsent.values():
            on_sent()

    def _hand_to_paho(self, topic: str, payload: bytes, qos: int, retain: bool,
                      on_done: DoneCallback | None) -> None:
        info = self._client.publish(topic, payload, qos, retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:  # no message id free: wait for one
            self._held.appendleft((topic, payload, qos, retain, on_done))
        elif qos == 0:
            if on_done:
                on_done()
        else:
            self._pending[info.mid] = on_done

    def _release_held(self) -> None:
        while self._held and len(self._pending) < MAX_PENDING:
            waiting = len(self._held)
            self._hand_to_paho(*self._held.popleft())
            if len(self._held) == waiting:
                break  # paho had no free id after all: again at the next PUBACK or loop pass

    def _ack_now(self, message: Inbound) -> None:
        if message.generation == self.generation and self.connected.is_set():
            self._client.ack(message.mid, message.qos)

    def _subscribe_now(self, topic: str, qos: int) -> None:
        # subscribing again to a filter replaces it (and has the broker re-send its
        # retained messages): one entry per filter, however often that happens
        self._subscriptions = [(t, q) for t, q in self._subscriptions if t != topic]
        self._subscriptions.append((topic, qos))
        if self.connected.is_set():
            self._client.subscribe(topic, qos)

    def _unsubscribe_now(self, topic: str) -> None:
        self._subscriptions = [(t, q) for t, q in self._subscriptions if t != topic]
        if self.connected.is_set():
            self._client.unsubscribe(topic)

    def _run(self) -> None:
        rotation = self._rotation
        try:
            while not self._stop.is_set():
                if self._connect():
                    try:
                        why = self._serve()
                    except Exception:  # a bug must not end the connection for good
                        log.exception("%s: unexpected error; reconnecting", self.name)
                        self._client.disconnect()
                        why = "internal error"
                    if not self._was_up and not self._refused and not self._stop.is_set():
                        self._note_error(f"{self.url} closed the connection before accepting "
                                         f"it ({why}); check credentials and certificates, "
                                         f"or the broker is not ready yet")
                    if self._stop.is_set():
                        break
                    if self._was_up:
                        rotation.up()
                if rotation.wait():  # the next address, after the back-off
                    break
        finally:
            self._shutdown()

    def _connect(self) -> bool:
        self._was_up = self._refused = False
        self._forget_unsent()  # a new connection starts with paho's queue empty
        try:
            self._client.connect(self.url.host, self.url.port, self._keepalive)
            return True
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: naming it here
            # would load OpenSSL on every refused connect of a plain mqtt:// agent
            self._note_error(f"cannot connect to {self.url}: {exc}")
            return False

    def _serve(self) -> str:
        """Drive paho's external-loop API until the connection drops or stop is set;
        returns why it ended."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        sock = self._client.socket()
        if sock is None:
            return "no socket"
        sock_fd = sock.fileno()
        poller.register(sock_fd, select.POLLIN)
        readable = select.poll()  # the socket alone: has it more to read right now?
        readable.register(sock_fd, select.POLLIN)
        # an SSLSocket's bytes already decrypted; not isinstance(sock, ssl.SSLSocket),
        # which would load OpenSSL for a plain mqtt:// agent (edgerun/agent/_lean.py)
        pending = getattr(sock, "pending", None)

        def buffered() -> bool:
            return pending is not None and pending() > 0

        def more() -> bool:
            return buffered() or bool(readable.poll(0))
        try:
            return self._serve_loop(poller, sock_fd, buffered, more)
        finally:
            if self._on_pass is not None:
                self._on_pass()  # what the last pass received is handed on, whatever ended it

    def _serve_loop(self, poller: select.poll, sock_fd: int, buffered: Callable[[], bool],
                    more: Callable[[], bool]) -> str:
        want_write = False
        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        on_pass = self._on_pass
        tls_buffered = False  # decrypted bytes wait in the TLS layer, which poll cannot see
        while not self._stop.is_set():
            if self.connected.is_set():
                self._run_commands()
            if tls_buffered and (rc := self._read(more)) != ok:
                return paho.error_string(rc)
            if on_pass is not None:
                on_pass()  # before the loop may block: what this pass received goes on
            # write now what this pass queued (a PUBACK read may have released publishes):
            # POLLOUT is asked for only when the socket did not take it all
            if self._client.want_write() and (rc := self._client.loop_write()) != ok:
                return paho.error_string(rc)
            if self._client.want_write() != want_write:
                want_write = not want_write
                poller.modify(sock_fd, select.POLLIN | (select.POLLOUT if want_write else 0))
            tls_buffered = buffered()
            timeout = 0 if tls_buffered else 1000
            if timeout:
                self._asleep = True  # then look again: a command queued before this wrote
                if self.connected.is_set() and not self._commands.empty():
                    timeout = 0  # it wrote no wake-up byte: do not block
            try:
                ready = poller.poll(timeout)
            finally:
                self._asleep = False
            for fd, events in ready:
                if fd == self._wake_r:
                    _drain(self._wake_r)
                    continue
                if events & (select.POLLIN | select.POLLERR | select.POLLHUP) and \
                        (rc := self._read(more)) != ok:
                    return paho.error_string(rc)
                if events & select.POLLOUT and (rc := self._client.loop_write()) != ok:
                    return paho.error_string(rc)
            if (rc := self._client.loop_misc()) != ok:
                return paho.error_string(rc)
            if self._client.socket() is None:
                return "the connection closed"
        return "stopped"

    def _read(self, more: Callable[[], bool]) -> MQTTErrorCode:
        """paho reads about one packet per loop_read: read on while the socket has more
        (up to READ_BURST), so that a burst is one pass of the loop, one on_pass."""
        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        for _ in range(READ_BURST):
            if (rc := self._client.loop_read()) != ok:
                return rc
            if self._client.socket() is None or not more():
                break
        return ok

    def _run_commands(self) -> None:
        ran = 0
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            command()
            ran += 1
        if self._held:
            self._release_held()
        if ran:
            with self._idle:
                self._queued -= ran
                self._idle.notify_all()

    def _shutdown(self) -> None:
        if self.connected.is_set():
            self._run_commands()
            self._client.disconnect()
            for _ in range(50):  # send what is queued and the DISCONNECT, briefly
                if self._client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS \
                        or not self._client.want_write():
                    break
        self.connected.clear()
        self._forget_unsent()

    def _note_error(self, text: str) -> None:
        if text != self.last_error:
            log.warning("%s: %s", self.name, text)
        self.last_error = text

    # --- paho callbacks (network thread; never block) ------------------------------
    def _handle_connect(self, client: paho.Client, _userdata: Any, flags: Any,
                        reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self._refused = True
            self._note_error(f"{self.url} refused the connection: {reason}")
            return
        self.generation += 1
        self._was_up = True
        if self.generation > 1:
            self.reconnects += 1
        self.node = self.url
        self.connected.set()
        where = f" (node {self._rotation.index + 1} of {len(self.urls)})" \
            if len(self.urls) > 1 else ""
        log.info("%s: connected to %s%s (session present: %s)", self.name, self.url, where,
                 flags.session_present)
        for topic, qos in self._subscriptions:
            client.subscribe(topic, qos)
        if self._on_connected:
            self._on_connected(bool(flags.session_present))

    def _handle_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any,
                           reason: Any, _props: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self._forget_unsent()
        self.node = None
        if was and not self._stop.is_set():
            self._note_error(f"lost the connection to {self.url}: {reason}")
        if was and self._on_disconnected:
            self._on_disconnected()

    def _handle_message(self, _client: paho.Client, _userdata: Any,
                        msg: paho.MQTTMessage) -> None:
        if self._on_message is None:
            return
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # MQTT topics are UTF-8; no route can name this one
            log.warning("%s: dropped a message whose topic is not UTF-8", self.name)
            self._client.ack(msg.mid, msg.qos)  # with manual_ack, or the broker sends it again
            return
        self._on_message(Inbound(topic, bytes(msg.payload), msg.qos, bool(msg.retain),
                                 msg.mid, self.generation))

    def _handle_publish(self, _client: paho.Client, _userdata: Any, mid: int,
                        _reason: Any, _props: Any) -> None:
        on_sent = self._unsent.pop(mid, None)
        if on_sent is not None:  # a QoS 0 message written to the socket
            on_sent()
            return
        if mid not in self._pending:
            return
        on_done = self._pending.pop(mid)
        if on_done:
            on_done()
        if self._held:
            self._release_held()
        if not self._pending and not self._held:
            with self._idle:
                self._idle.notify_all()


def _nodelay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (a test's Unix socket, a websocket)


def _ignore(*_args: Any) -> None:
    return None


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
