"""A deadline on request heads (issue 23): uvicorn times out idle keep-alive connections
but not a request head that arrives a byte at a time, nor a connection that never
sends one, so each of those would hold a connection and its memory for ever.

`HeadDeadline` is the HTTP protocol uvicorn runs (its public `http=` setting takes a
protocol class): h11's, wrapped. It looks only at bytes: from a connection's start,
and from the first byte after each response began, the head must be complete (a
blank line) within HEAD_TIMEOUT_S, or the connection is closed. Once a connection is
upgraded to a WebSocket it steps aside. Body reads have their own deadline in the
API (server.py, BODY_TIMEOUT_S: 408).

It also counts the bytes of a connection's first head: one over MAX_HEAD_BYTES gets a
JSON 431 and the connection is closed. h11 would refuse it too (its limit on an
incomplete event is the same 16 KiB), but uvicorn answers that with a plain-text 400, and
the API answers every bad request with a JSON error. Only the first: after an answer
given before a body was read (a 413), the body's rest is not a head, and the bytes alone
do not tell where the next head starts; a later head over the limit gets h11's 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 10.0
END_OF_HEAD = b"\r\n\r\n"
MAX_HEAD_BYTES = 16 * 1024  # h11's default for an incomplete event
_TOO_LARGE = json.dumps({
    "error": f"the request head (request line and headers) is over {MAX_HEAD_BYTES} bytes",
    "code": "head_too_large"}).encode() + b"\n"
REFUSAL = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
           b"Content-Type: application/json\r\nCache-Control: no-store\r\n"
           b"Connection: close\r\nContent-Length: " + str(len(_TOO_LARGE)).encode()
           + b"\r\n\r\n" + _TOO_LARGE)


class _Transport:
    """The real transport, as the wrapped protocol sees it: writes and a protocol switch
    are noted, everything else is passed through."""

    def __init__(self, real: Any, owner: HeadDeadline) -> None:
        self.real, self.owner = real, owner

    def write(self, data: bytes) -> None:
        self.owner.wrote()
        self.real.write(data)

    def writelines(self, lines: Any) -> None:
        self.owner.wrote()
        self.real.writelines(lines)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.owner.detach()  # a WebSocket from here on: frames, not heads
        self.real.set_protocol(protocol)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class HeadDeadline(asyncio.Protocol):
    def __init__(self, **kwargs: Any) -> None:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        self.inner = H11Protocol(**kwargs)
        self.loop = kwargs.get("_loop") or asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.transport: Any = None
        self.in_head = True  # the next bytes are (part of) a request head
        self.tail = b""
        self.head_bytes = 0  # of the connection's first head (-1 once it is complete)
        self.detached = False
        self.refused = False

    # --- what the transport calls --------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.inner.connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if not self.detached and self.in_head:
            if self.timer is None:
                self._arm()
            seen = self.tail + data
            end = seen.find(END_OF_HEAD)
            if self.head_bytes >= 0:  # the connection's first head
                self.head_bytes += len(data) if end < 0 else \
                    end + len(END_OF_HEAD) - len(self.tail)
                if self.head_bytes > MAX_HEAD_BYTES:
                    self._refuse()
                    return
                if end >= 0:
                    self.head_bytes = -1
            if end >= 0:
                self.in_head, self.tail = False, b""
                self._disarm()
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        self.inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # --- what the wrapped protocol's transport tells ---------------------------------------
    def wrote(self) -> None:
        if not self.in_head:
            self.in_head, self.tail = True, b""  # an answer began: the next bytes are a head

    def detach(self) -> None:
        self.detached = True
        self._disarm()

    def _refuse(self) -> None:
        """A head too large: a JSON 431, then the connection closes (its rest unread)."""
        self.refused = True
        self._disarm()
        log.info("refused a request head of over %d bytes", MAX_HEAD_BYTES)
        if self.transport is not None:
            self.transport.write(REFUSAL)
            self.transport.close()

    # --- the deadline ----------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self.timer = self.loop.call_later(HEAD_TIMEOUT_S, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if self.detached or not self.in_head or self.transport is None:
            return
        log.info("closed a connection whose request head was not complete within %.0f s",
                 HEAD_TIMEOUT_S)
        self.transport.close()
