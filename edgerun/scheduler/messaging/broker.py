"""An embedded MQTT 3.1.1 broker (amqtt) so the whole system runs with nothing but Python.

amqtt runs on asyncio; here it gets a dedicated thread with its own event
loop, and the rest of the scheduler only sees `start()`, `stop()` and `url`.

Two amqtt behaviours are adjusted (see scheduler/README.md, "Embedded broker"):
- its anonymous-auth plugin marks every session anonymous, and amqtt then
  neither keeps a persistent session's subscriptions nor queues QoS 1 messages
  for it while it is offline; `OpenAuthPlugin` admits every client without
  that mark, so an agent's `clean_session=False` session works as in Mosquitto;
- on every CONNECT it sends the new client the retained messages of *every*
  topic filter anyone subscribed to; `_Broker` sends a client only those of
  its own subscriptions (an agent would otherwise receive other nodes'
  retained status on its task topic);
- an MQTT 5 CONNECT (protocol level 5) carries properties amqtt cannot parse: it
  waited for bytes that never came and the client hung with no CONNACK. `_Broker`
  reads the first packet itself and answers any protocol level but 4 (3.1.1) at
  once with CONNACK return code 0x01, "unacceptable protocol version", which is
  what MQTT 5 clients take as "try 3.1.1" or report; a first packet that is not a
  CONNECT, or none within `CONNECT_TIMEOUT_S`, closes the connection.

These are the one place edgerun reaches into a library's private members, kept under
issue 21's rule (a user-visible defect of the library): `Broker._client_connected`,
`Broker._publish_retained_messages_for_subscription`, `Broker._subscriptions` and
`Broker._servers` (the bound port). pyproject.toml pins amqtt to the series they were
tested on (0.12), and `check_internals()` refuses to start, naming the member, if a
release changes any of them (tests/test_scheduler_embedded.py). Upstream: MQTT 5
version negotiation is Yakifo/amqtt issue #325 (PR #337); the retained messages of
other clients' subscriptions have no upstream issue found yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Any

from edgerun.scheduler.errors import EmbeddedBrokerError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0
MAX_CONNECT_BYTES = 65_536
REFUSE_PROTOCOL = bytes([0x20, 0x02, 0x00, 0x01])  # CONNACK, unacceptable protocol version


def connect_level(packet: bytes) -> int | None:
    """The protocol level of a whole CONNECT packet (None: not a readable CONNECT)."""
    if not packet or packet[0] != 0x10:
        return None
    i = 1
    while i < len(packet) and packet[i] & 0x80:  # the remaining length's bytes
        i += 1
    i += 1
    if i + 2 > len(packet):
        return None
    name_len = int.from_bytes(packet[i:i + 2], "big")
    level_at = i + 2 + name_len
    return packet[level_at] if level_at < len(packet) else None


async def read_first_packet(reader: Any) -> bytes:
    """The client's whole first packet, as bytes; ValueError if it is too big."""
    head = bytearray(await reader.read(1))
    length, shift = 0, 0
    for _ in range(4):
        byte = (await reader.read(1))[0]
        head.append(byte)
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        raise ValueError("bad remaining length")
    if length > MAX_CONNECT_BYTES:
        raise ValueError(f"a first packet of {length} bytes")
    return bytes(head) + (await reader.read(length) if length else b"")


class _Replay:
    """A reader that gives back the bytes already read, then reads on."""

    def __init__(self, reader: Any, data: bytes) -> None:
        self._reader, self._data = reader, data

    async def read(self, n: int = -1) -> bytes:
        if not self._data:
            return bytes(await self._reader.read(n))
        if n == -1 or n >= len(self._data):
            data, self._data = self._data, b""
            if n != -1 and n > len(data):
                data += await self._reader.read(n - len(data))
            return data
        data, self._data = self._data[:n], self._data[n:]
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()


def _amqtt() -> tuple[Any, Any]:
    try:
        from amqtt.broker import Broker
        from amqtt.plugins.base import BaseAuthPlugin
    except ImportError as exc:  # the scheduler extra is not installed
        raise EmbeddedBrokerError(f"the embedded broker needs amqtt "
                                  f"(pip install 'edgerun[scheduler]'): {exc}") from None
    return Broker, BaseAuthPlugin


# amqtt's private members overridden or read here, with the parameters each must take
INTERNALS: dict[str, tuple[str, ...]] = {
    "_client_connected": ("self", "listener_name", "reader", "writer"),
    "_publish_retained_messages_for_subscription": ("self", "subscription", "session"),
}
INTERNAL_ATTRIBUTES = ("_subscriptions", "_servers")


def check_internals(broker_cls: type, instance: Any = None) -> None:
    """EmbeddedBrokerError naming the first private member of amqtt's Broker that is not
    as edgerun expects (a new amqtt release): methods by their parameters, and, given a
    broker instance, the attributes read."""
    for name, params in INTERNALS.items():
        method = getattr(broker_cls, name, None)
        if method is None or not inspect.iscoroutinefunction(method):
            raise EmbeddedBrokerError(
                f"amqtt's Broker.{name} is gone or no longer a coroutine: the embedded "
                f"broker relies on it (messaging/broker.py); use the amqtt series in "
                f"pyproject.toml")
        found = tuple(inspect.signature(method).parameters)
        if found != params:
            raise EmbeddedBrokerError(
                f"amqtt's Broker.{name} takes {found}, not {params}: the embedded broker "
                f"relies on it (messaging/broker.py); use the amqtt series in pyproject.toml")
    for name in INTERNAL_ATTRIBUTES if instance is not None else ():
        if not hasattr(instance, name):
            raise EmbeddedBrokerError(
                f"amqtt's Broker has no attribute {name}: the embedded broker relies on it "
                f"(messaging/broker.py); use the amqtt series in pyproject.toml")


def _make_classes() -> tuple[type, type]:
    broker_cls, auth_base = _amqtt()
    check_internals(broker_cls)

    class OpenAuthPlugin(auth_base):  # type: ignore[misc, valid-type]
        """Admit every client, keeping its persistent session (not marked anonymous)."""

        @dataclass
        class Config:
            pass

        async def authenticate(self, *, session: Any) -> bool:
            session.is_anonymous = False
            return True

    class _Broker(broker_cls):  # type: ignore[misc, valid-type]
        async def _client_connected(self, listener_name: str, reader: Any,
                                    writer: Any) -> None:
            try:
                first = await asyncio.wait_for(read_first_packet(reader), CONNECT_TIMEOUT_S)
            except (TimeoutError, asyncio.IncompleteReadError, ValueError, OSError,
                    IndexError) as exc:
                log.info("embedded broker: closed a connection before CONNECT: %s",
                         exc or type(exc).__name__)
                await _close(writer)
                return
            level = connect_level(first)
            if level != 4:
                if level is not None:  # a CONNECT: say why (MQTT 5 clients fall back or stop)
                    log.info("embedded broker: refused a client speaking MQTT protocol "
                             "level %d (only 3.1.1, level 4, is served)", level)
                    with contextlib.suppress(Exception):
                        writer.write(REFUSE_PROTOCOL)
                        await writer.drain()
                await _close(writer)
                return
            await super()._client_connected(listener_name, _Replay(reader, first), writer)

        async def _publish_retained_messages_for_subscription(
                self, subscription: tuple[str, int], session: Any) -> None:
            topic_filter, _qos = subscription
            mine = [q for s, q in self._subscriptions.get(topic_filter, [])
                    if s.client_id == session.client_id]
            if mine:
                await super()._publish_retained_messages_for_subscription(
                    (topic_filter, mine[0]), session)

    return _Broker, OpenAuthPlugin


OpenAuthPlugin: Any = None  # bound on first use: amqtt loads plugins by dotted path


class EmbeddedBroker:
    """amqtt listening on host:port (port 0: any free port; read `port` after start)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883,
                 session_expiry_s: int = 7 * 24 * 3600) -> None:
        self.host, self.port, self.session_expiry_s = host, port, session_expiry_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        global OpenAuthPlugin
        broker_cls, OpenAuthPlugin = _make_classes()
        self._thread = threading.Thread(target=self._run, args=(broker_cls,),
                                        name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise EmbeddedBrokerError(f"the embedded broker did not start on "
                                      f"{self.host}:{self.port} within {timeout:g} s")
        if self._error is not None:
            raise EmbeddedBrokerError(f"the embedded broker cannot listen on "
                                      f"{self.host}:{self.port}: {_cause(self._error)}")
        log.info("embedded MQTT broker (amqtt) listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, broker_cls: type) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(broker_cls))
        except BaseException as exc:  # reported to start(); the thread ends
            self._error = exc
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, broker_cls: type) -> None:
        self._stop = asyncio.Event()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "session_expiry_interval": self.session_expiry_s,
            "plugins": {f"{__name__}.OpenAuthPlugin": {}},
        }
        broker = broker_cls(config)
        check_internals(broker_cls, broker)
        await broker.start()
        server = broker._servers["default"].instance
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        await self._stop.wait()
        try:
            await broker.shutdown()
        except Exception as exc:  # shutting down: nothing left to save
            log.warning("embedded broker shut down uncleanly: %s", exc)


async def _close(writer: Any) -> None:
    with contextlib.suppress(Exception):
        await writer.close()


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__
