"""The WebSocket at /v1/ws: the subscribe protocol of docs/EVENTS.md over streams.py's Feed.

Authentication (issue 23), no token in the URL: the `Authorization` header where the
client can set it; from a browser, the subprotocols `edgerun` and `bearer.<token>`
(the server answers `edgerun`), or a single-use `?ticket=`. An upgrade whose
`Origin` is neither the server's own nor in the configured allow list is refused 403.
The connection always ends with a close code: 1001 when the service stops, 1003 for
a binary frame, 1008 for a slow reader or a revoked token, 1009 for a message over
the size limit, 1011 for an internal failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edgerun.control.errors import Forbidden, Unauthorized
from edgerun.protocol import JSONObject
from edgerun.scheduler.api import edge, streams
from edgerun.scheduler.api.auth import Principal
from edgerun.scheduler.api.handlers import Handlers, classify
from edgerun.scheduler.api.streams import Feed, Registry, channels_of, stream_principal
from edgerun.scheduler.store.events import CHANNELS

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

log = logging.getLogger(__name__)

SUBSCRIBE_KEYS = ("op", "channels", "nodes", "tasks", "since")
SUBPROTOCOL = "edgerun"
BEARER = "bearer."


class Stuck(Exception):
    """The reader took nothing for WRITE_DEADLINE_S."""


def ws_render(event_id: int, event: JSONObject) -> bytes:
    kind = event.get("kind")
    channel = next((c for c, k in CHANNELS.items() if k == kind), str(kind))
    return edge.dumps({"type": "event", "id": event_id, "channel": channel,
                       "event": event}).encode("utf-8")


def origin_allowed(headers: Any, scheme: str, allowed: tuple[str, ...]) -> bool:
    """No Origin (not a browser), the server's own origin, or one of `allowed`."""
    origin = headers.get("origin")
    if origin is None or origin in allowed or "*" in allowed:
        return True
    parts = urlsplit(origin)
    own = "https" if scheme in ("wss", "https") else "http"
    return bool(parts.scheme == own and parts.netloc == headers.get("host"))


def ws_endpoint(h: Handlers, registry: Registry, allowed_origins: tuple[str, ...]
                ) -> Callable[[WebSocket], Any]:
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.websockets import WebSocketDisconnect

    async def ws(socket: WebSocket) -> None:
        offered = [p.strip() for p in socket.headers.get("sec-websocket-protocol", "").split(",")
                   if p.strip()]
        token = next((p[len(BEARER):] for p in offered if p.startswith(BEARER)), None)

        def check() -> Principal:
            if not origin_allowed(socket.headers, socket.url.scheme, allowed_origins):
                raise Forbidden(f"WebSocket upgrades from origin "
                                f"{socket.headers.get('origin', '')[:100]!r} are not allowed "
                                f"here (--allowed-origins)")
            q = edge.query(socket.query_params.multi_items(), ("access_token", "ticket"))
            if token and not socket.headers.get("authorization"):
                return h.principal(f"Bearer {token}", None, "viewer", "reading events")
            return stream_principal(h, socket.headers, q, "reading events")
        try:
            who = await run_in_threadpool(check)
        except (Unauthorized, Forbidden, edge.Invalid) as exc:
            status, payload = classify(exc)
            await socket.send_denial_response(JSONResponse(payload, status_code=status))
            return
        await socket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered or token
                            else None)
        session = WsSession(h, socket, who)
        registry.add(session.stop, who, h)
        try:
            await session.run()
        except (WebSocketDisconnect, Stuck):
            pass
        except Exception:  # never a dropped connection without a close code
            log.exception("websocket session failed")
            try:
                await socket.close(code=1011, reason="internal error; see the service log")
            except Exception as exc:  # the connection is gone already
                log.debug("websocket close: %s", exc)
        finally:
            registry.discard(session.stop)
            session.close()

    return ws


class WsSession:
    """One connection: at most one subscription at a time; `subscribe` replaces it."""

    def __init__(self, h: Handlers, socket: WebSocket, who: Principal) -> None:
        self.h, self.socket, self.who = h, socket, who
        self.may_audit = who.may("operator")
        self.feed: Feed | None = None
        self.changed = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.ended: tuple[str, str] | None = None  # (code, reason) the service ended it with
        self.closing: tuple[int, str] | None = None  # a close code of our own, and why

    def stop(self, code: str, reason: str) -> None:  # any thread
        self.ended = self.ended or (code, reason)
        if self.feed is not None:
            self.feed.stop(code, reason)
        try:
            self.loop.call_soon_threadsafe(self.changed.set)
        except RuntimeError:
            pass

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()

    async def _send(self, message: JSONObject | bytes) -> None:
        text = message.decode("utf-8") if isinstance(message, bytes) else edge.dumps(message)
        try:
            await asyncio.wait_for(self.socket.send_text(text), streams.WRITE_DEADLINE_S)
        except TimeoutError:
            log.warning("WebSocket reader %s took nothing for %.0f s: connection closed",
                        self.who.name, streams.WRITE_DEADLINE_S)
            raise Stuck from None

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        try:
            while not writer.done():
                receive = asyncio.create_task(self.socket.receive())
                done, _ = await asyncio.wait({receive, writer},
                                             return_when=asyncio.FIRST_COMPLETED)
                if receive not in done:
                    receive.cancel()
                    break
                message = receive.result()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None:  # a binary frame: this protocol is JSON text only
                    self.closing = (1003, "JSON text messages only")
                    break
                await self._command(text)
        finally:
            writer.cancel()
            try:
                await writer
            except asyncio.CancelledError:
                pass
            except Stuck:
                raise
            except Exception as exc:  # the socket went away while writing
                log.debug("websocket writer: %s", exc)
                return
        feed_code = self.feed.code if self.feed is not None and self.feed.sub.closed else None
        code, reason = self.ended or (feed_code, self.feed.sub.closed if self.feed else None)
        if self.closing is not None:
            await self.socket.close(code=self.closing[0], reason=self.closing[1])
        elif code == "stopping":
            await self.socket.close(code=1001, reason="service stopping")
        elif code in ("slow_reader", "token_revoked"):
            await self._send({"type": "closed", "code": code, "reason": reason})
            await self.socket.close(code=1008, reason=code.replace("_", " "))
        else:
            await self.socket.close(code=1000)

    async def _error(self, code: str, message: str, field: str | None = None) -> None:
        await self._send({"type": "error", "code": code, "error": message,
                          **({"field": field} if field else {})})

    async def _command(self, text: str) -> None:
        from starlette.concurrency import run_in_threadpool

        try:
            msg = edge.parse_json(text)
        except edge.BadJson as exc:
            await self._error("bad_json", f"each message must be a JSON object: {exc}")
            return
        except edge.Invalid as exc:
            await self._error("invalid", str(exc), exc.field)
            return
        op = msg.get("op")
        try:
            if op == "ping":
                edge.check_keys(msg, ("op",), "a ping")
                await self._send({"type": "pong", "last_id": self.h.service.hub.last_id})
            elif op == "unsubscribe":
                edge.check_keys(msg, ("op",), "an unsubscribe")
                if self.feed is not None:
                    self.feed.close()
                    self.feed = None
                    self.changed.set()
                await self._send({"type": "unsubscribed"})
            elif op == "subscribe":
                edge.check_keys(msg, SUBSCRIBE_KEYS, "a subscribe")
                chans = channels_of(_strings(msg, "channels"))
                if "audit" in chans and not self.may_audit:
                    raise Forbidden("the audit channel needs role operator or above")
                nodes, tasks = _strings(msg, "nodes"), _strings(msg, "tasks")
                since = msg.get("since")
                if since is not None and (not isinstance(since, int) or isinstance(since, bool)
                                          or not 0 <= since <= edge.MAX_INT):
                    raise edge.Invalid("since", "`since` must be an event id")
                if self.feed is not None:
                    self.feed.close()
                feed = Feed(self.h, chans, nodes, tasks, ws_render)
                self.feed = feed
                if self.ended is not None:
                    feed.stop(*self.ended)
                reset = None
                backlog: list[tuple[int, JSONObject]] = []
                if since is None:
                    feed.start()
                else:
                    backlog, reset = await run_in_threadpool(feed.backlog, since)
                    feed.start(feed.seen_up_to)
                await self._send({
                    "type": "subscribed", "channels": sorted(chans), "nodes": nodes,
                    "tasks": tasks, "last_id": feed.seen_up_to})
                if reset is not None:
                    await self._send({"type": "reset", "reason": reset,
                                      "last_id": feed.seen_up_to})
                for event_id, event in backlog:
                    await self._send(ws_render(event_id, event))
                self.changed.set()
            else:
                raise edge.Invalid("op", f"unknown op {str(op)[:40]!r}: subscribe, "
                                         f"unsubscribe or ping")
        except edge.Invalid as exc:
            await self._error("invalid", str(exc), exc.field)
        except Forbidden as exc:
            await self._error("forbidden", str(exc))

    async def _write(self) -> None:
        while True:
            if self.ended is not None:
                return
            feed = self.feed
            if feed is None:
                self.changed.clear()
                try:
                    await asyncio.wait_for(self.changed.wait(), streams.HEARTBEAT_S)
                except TimeoutError:
                    await self._send({"type": "heartbeat",
                                      "last_id": self.h.service.hub.last_id})
                continue
            frame = await feed.next(streams.HEARTBEAT_S)
            if feed is not self.feed:
                continue  # replaced meanwhile
            if frame == b"":
                await self._send({"type": "heartbeat", "last_id": max(
                    feed.seen_up_to, self.h.service.hub.last_id)})
                continue
            if frame is None:
                return
            await self._send(frame)


def _strings(msg: JSONObject, key: str) -> list[str]:
    value = msg.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise edge.Invalid(key, f"`{key}` must be a list of strings")
    return value


__all__ = ["ws_endpoint"]
