"""Wire-level shortcuts under pika, for `edgerun.amqp.AmqpLink`, where pika is slow per
message: its SelectConnection writes each frame with its own send and copies the rest of
its read buffer after every frame; basic_publish builds three frame objects and encodes
the properties for every message. `publish_frames` writes the same bytes directly.

The agent never imports this module.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pika
import pika.frame
from pika.adapters.select_connection import SelectConnection
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport as _PlainTransport

# (channel, consumer tag, delivery tag, routing key, body) -> taken (False: pika's way)
Deliver = Callable[[int, str, int, str, bytes], bool]
_DELIVER = struct.pack(">I", 0x003C003C)  # Basic.Deliver: class 60, method 60
RECV_BYTES = 65536  # one recv
CONSUME_BYTES = 1 << 20  # read per loop pass at most
JOIN_BYTES = 256 << 10  # frames joined into one buffer for the socket
BIG_PIECE = 16 << 10  # a piece written on its own (pika sends a memoryview without copies)

_PUBLISH = struct.pack(">IH", 0x003C0028, 0)  # Basic.Publish (class 60, method 40), ticket 0
_FRAME_END = b"\xce"


def publish_frames(channel: int, exchange: str, routing_key: str, body: bytes,
                   properties: bytes, body_max: int) -> tuple[list[bytes | memoryview], int]:
    """The frames of a basic.publish (method, content header, body frames of at most
    `body_max` bytes) as pika would marshal them, as pieces to write in order (a body's
    parts are views of it, not copies), and how many frames there are."""
    ex, key = exchange.encode(), routing_key.encode()
    if len(ex) > 255 or len(key) > 255:
        raise ValueError("exchange and routing key are short strings (at most 255 bytes)")
    method = b"".join((_PUBLISH, bytes((len(ex),)), ex, bytes((len(key),)), key, b"\x00"))
    header = struct.pack(">HxxQ", 60, len(body)) + properties
    parts: list[bytes | memoryview] = [
        b"".join((struct.pack(">BHI", 1, channel, len(method)), method, _FRAME_END,
                  struct.pack(">BHI", 2, channel, len(header)), header, _FRAME_END))]
    if len(body) <= body_max:
        if body:
            parts += (struct.pack(">BHI", 3, channel, len(body)), body, _FRAME_END)
        return parts, 2 + bool(body)
    view = memoryview(body)
    for start in range(0, len(body), body_max):
        chunk = view[start:start + body_max]
        parts += (struct.pack(">BHI", 3, channel, len(chunk)), chunk, _FRAME_END)
    return parts, 2 + len(parts) // 3


class Connection(SelectConnection):  # type: ignore[misc]  # pika is untyped
    """A SelectConnection that writes the frames of one loop pass in few sends (joined up to
    JOIN_BYTES: pika copies the rest of a buffer at each partial send), reads up to
    RECV_BYTES per recv, and decodes the frames of a read without copying the rest of the
    buffer after each frame as pika does (quadratic in what one read holds)."""

    on_deliver: Deliver | None = None  # the fast path for basic.deliver (see _deliver)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._corked: list[bytes | memoryview] = []
        super().__init__(*args, **kwargs)

    def _on_stream_connected(self) -> None:
        self._transport._MAX_RECV_BYTES = RECV_BYTES  # pika's default: 4096
        self._transport._MAX_CONSUME_BYTES = CONSUME_BYTES
        super()._on_stream_connected()

    def _adapter_emit_data(self, data: bytes | memoryview) -> None:
        if not self._corked:
            self.ioloop.call_later(0, self._uncork)
        self._corked.append(data)

    def _uncork(self) -> None:
        frames, self._corked = self._corked, []
        if not frames or self._transport is None:
            return
        emit = self._send_now
        group: list[bytes | memoryview] = []
        size = 0
        for data in frames:
            if len(data) >= BIG_PIECE:  # a body: written as it is, not copied into a join
                if group:
                    emit(group[0] if len(group) == 1 else b"".join(group))
                    group, size = [], 0
                emit(data)
                continue
            group.append(data)
            size += len(data)
            if size >= JOIN_BYTES:
                emit(group[0] if len(group) == 1 else b"".join(group))
                group, size = [], 0
        if group:
            emit(group[0] if len(group) == 1 else b"".join(group))

    def _send_now(self, data: bytes | memoryview) -> None:
        """Write at once what the socket takes when nothing waits before it (pika turns
        the writability watcher on and off around every write: two epoll_ctl calls and a
        pass of the loop); the rest, or any error, goes pika's way."""
        transport = self._transport
        if isinstance(transport, _PlainTransport) and \
                transport._state == transport._STATE_ACTIVE and \
                not transport.get_write_buffer_size():
            try:
                sent = transport._sock.send(data)
            except OSError:  # would block, or a broken socket that pika's write then meets
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        super()._adapter_emit_data(data)

    def _deliver(self, buf: bytes, at: int, method_end: int, end: int,
                 deliver: Deliver) -> int:
        """A basic.deliver whose content header and body frames are all in `buf`, handed
        to `deliver` without pika's frame objects, callback lookups and content assembly
        (the properties are not decoded: no consumer of ours reads them). Returns where
        the next frame starts, or 0 to let pika handle the method frame (content not all
        read yet, frames of another channel between, a consumer pika must handle)."""
        channel = buf[at + 1:at + 3]
        try:
            p = at + 11
            n = buf[p]
            consumer_tag = buf[p + 1:p + 1 + n].decode()
            p += 1 + n
            delivery_tag = int.from_bytes(buf[p:p + 8], "big")
            p += 9  # and the redelivered bit
            p += 1 + buf[p]  # the exchange
            n = buf[p]
            routing_key = buf[p + 1:p + 1 + n].decode()
        except (IndexError, UnicodeDecodeError):  # not UTF-8, or short: pika's way
            return 0
        header = method_end
        if end - header < 19 or buf[header] != 2 or buf[header + 1:header + 3] != channel \
                or buf[method_end - 1] != 0xCE:
            return 0
        header_end = header + 8 + int.from_bytes(buf[header + 3:header + 7], "big")
        if header_end > end or buf[header_end - 1] != 0xCE:
            return 0
        size = int.from_bytes(buf[header + 11:header + 19], "big")
        pieces: list[bytes] = []
        q, got = header_end, 0
        while got < size:
            if end - q < 7 or buf[q] != 3 or buf[q + 1:q + 3] != channel:
                return 0
            frame_end = q + 8 + int.from_bytes(buf[q + 3:q + 7], "big")
            if frame_end > end or buf[frame_end - 1] != 0xCE:
                return 0
            pieces.append(buf[q + 7:frame_end - 1])
            got += frame_end - q - 8
            q = frame_end
        if got != size:
            return 0  # malformed: pika's assembler says so
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if not deliver(int.from_bytes(channel, "big"), consumer_tag, delivery_tag,
                       routing_key, body):
            return 0
        self.bytes_received += q - at
        self.frames_received += 2 + len(pieces)
        return q

    def _on_data_available(self, data_in: bytes) -> None:
        previous: bytes = self._frame_buffer  # type: ignore[has-type]  # set by pika
        buf = previous + data_in if previous else data_in
        at, end = 0, len(buf)
        if buf[:4] == b"AMQP":  # a protocol header (the broker refuses our version)
            self._frame_buffer = b""
            super()._on_data_available(buf)
            return
        deliver = self.on_deliver
        try:
            while end - at >= 7:
                frame_end = at + 8 + int.from_bytes(buf[at + 3:at + 7], "big")
                if frame_end > end:
                    break
                if deliver is not None and buf[at] == 1 and buf[at + 7:at + 11] == _DELIVER:
                    after = self._deliver(buf, at, frame_end, end, deliver)
                    if after:
                        at = after
                        if self.is_closed:
                            break
                        continue
                consumed, value = pika.frame.decode_frame(buf[at:frame_end])
                at = frame_end
                self.bytes_received += consumed
                self._process_frame(value)
                if self.is_closed:
                    break
        finally:
            self._frame_buffer = buf[at:] if at < end else b""


class _SleepAware:
    """pika's poll object, telling its owner when its thread may block in poll."""

    def __init__(self, inner: Any, before: Callable[[float], float],
                 after: Callable[[], None]) -> None:
        self._inner, self._before, self._after = inner, before, after

    def poll(self, timeout: float | None = None) -> Any:
        wait = self._before(-1.0 if timeout is None else timeout)
        try:
            return self._inner.poll(None if wait == -1.0 else wait)
        finally:
            self._after()

    def __getattr__(self, name: str) -> Any:  # register, modify, unregister, close
        return getattr(self._inner, name)


def watch_sleep(ioloop: Any, before: Callable[[float], float],
                after: Callable[[], None]) -> None:
    """Wrap the poll object pika's poller creates when its loop starts: `before(timeout)`
    runs before each poll and returns the timeout to use (-1: none), `after()` after it."""
    poller = ioloop._poller
    init = poller._init_poller

    def init_and_wrap() -> None:
        init()
        poller._poll = _SleepAware(poller._poll, before, after)

    poller._init_poller = init_and_wrap
