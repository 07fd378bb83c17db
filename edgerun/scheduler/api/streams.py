"""Live events for browsers and tools: Server-Sent Events at /v1/events, WebSocket at /v1/ws.

Both read the same EventHub (events.py) and the same durable event log, with the
same filters (channels nodes, tasks, output, audit; by node and by task id), so
docs/EVENTS.md describes one schema for both.

- Resume: a reader gives the id of the last event it saw (SSE: `Last-Event-ID`,
  which EventSource sends by itself on reconnect, or `?last_event_id=`; WS:
  `"since"`). It first gets every logged event after that id from the store,
  then the live ones, without a gap: it subscribes before it reads the log, and
  skips live events the log already gave it. An id older than the log keeps
  gets an explicit `reset` event: read the current state again.
- Bounded memory: each reader has a queue of events.QUEUE_LIMIT; one that falls
  behind is closed with `{"code": "slow_reader", ...}` and may resume from the
  log with its last id.
- Heartbeats every HEARTBEAT_S (SSE: a comment line; WS: a `heartbeat` message).
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from edgerun.control.errors import Forbidden, Unauthorized
from edgerun.protocol import JSONObject
from edgerun.scheduler.api import edge
from edgerun.scheduler.api.handlers import Handlers, classify
from edgerun.scheduler.store.events import AUDIT, CHANNELS, OUTPUT, Subscription

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.websockets import WebSocket


log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
BACKLOG_PAGE = 500
STREAM_QUERY = ("channel", "node", "task", "access_token", "last_event_id")


class Feed:
    """A hub subscription read from the event loop without blocking it."""

    def __init__(self, h: Handlers, channels: set[str], nodes: list[str],
                 tasks: list[str], registry: set[Callable[[], None]] | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.ready = asyncio.Event()
        self.h, self.registry = h, registry
        self.sub: Subscription = h.service.hub.subscribe(
            ids=tasks, nodes=nodes, kinds=[CHANNELS[c] for c in channels], wake=self._wake)
        self.seen_up_to = 0  # the log gave us every logged event up to this id
        if registry is not None:
            registry.add(self.stop)

    def _wake(self) -> None:  # any thread
        try:
            self.loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:
            pass  # the loop is closed: the reader is gone

    def stop(self) -> None:  # any thread: the service is stopping
        self.sub.closed = self.sub.closed or "the service is stopping"
        self._wake()

    def close(self) -> None:
        self.h.service.hub.unsubscribe(self.sub)
        if self.registry is not None:
            self.registry.discard(self.stop)
        self.sub.closed = self.sub.closed or "closed"
        self._wake()  # a writer waiting on this feed moves on

    def backlog(self, since: int) -> tuple[list[tuple[int, JSONObject]], str | None]:
        """(logged events after `since` that this reader wants, a reset reason or None).
        Runs in the thread pool."""
        dropped, last = self.h.store.event_horizon()
        if since < dropped or since > last:
            why = (f"event {since} is older than the oldest one kept ({dropped + 1})"
                   if since < dropped else f"event {since} is unknown here (latest {last})")
            self.seen_up_to = last
            return [], why
        out: list[tuple[int, JSONObject]] = []
        cursor = since
        while True:
            page = self.h.store.events_after(cursor, BACKLOG_PAGE)
            out.extend((i, e) for i, e in page if self.sub.wants(e))
            if len(page) < BACKLOG_PAGE:
                break
            cursor = page[-1][0]
        self.seen_up_to = max([since, *(i for i, _ in out)], default=since)
        if page:
            self.seen_up_to = max(self.seen_up_to, page[-1][0])
        return out, None

    async def next(self, timeout: float) -> tuple[int, JSONObject] | str | None:
        """The next live event; None when the stream ends; "" on a heartbeat timeout."""
        while True:
            if self.sub.closed:
                return None
            try:
                item = self.sub.queue.get_nowait()
            except queue.Empty:
                self.ready.clear()
                if not self.sub.queue.empty() or self.sub.closed:
                    continue
                try:
                    await asyncio.wait_for(self.ready.wait(), timeout)
                except TimeoutError:
                    return ""
                continue
            if item is None:
                return None
            event_id, event = item
            if event.get("kind") != OUTPUT and event_id <= self.seen_up_to:
                continue  # the log gave it already
            return item


def channels_of(values: list[str]) -> set[str]:
    chosen = set()
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if name not in CHANNELS:
                raise edge.Invalid("channel", f"unknown channel {name!r}: the channels are "
                                              f"{', '.join(CHANNELS)}")
            chosen.add(name)
    return chosen or {"nodes", "tasks", "output"}


def since_of(text: str | None, field: str) -> int | None:
    if text is None or text == "":
        return None
    if not text.isdigit():
        raise edge.Invalid(field, f"`{field}` must be an event id this service gave out")
    return int(text)


def sse(event_id: int | None, kind: str, data: JSONObject) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return (head + f"event: {kind}\ndata: {edge.dumps(data)}\n\n").encode("utf-8")


def sse_endpoint(h: Handlers, registry: set[Callable[[], None]] | None
                 ) -> Callable[[Request], Any]:
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import StreamingResponse

    async def events(request: Request) -> Response:
        def check() -> tuple[set[str], list[str], list[str], int | None]:
            q = edge.query(request.query_params.multi_items(), STREAM_QUERY,
                           ("channel", "node", "task"))
            who = h.principal(request.headers.get("authorization"),
                              edge.one(q, "access_token"), "viewer", "reading events")
            chans = channels_of(q.get("channel", []))
            if "audit" in chans:
                who.require("operator", "the audit channel")
            since = since_of(request.headers.get("last-event-id")
                             or edge.one(q, "last_event_id"), "last_event_id")
            return chans, q.get("node", []), q.get("task", []), since

        chans, nodes, tasks, since = await run_in_threadpool(check)
        feed = Feed(h, chans, nodes, tasks, registry)

        async def body() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 2000\n\n"
                if since is None:
                    feed.seen_up_to = h.service.hub.last_id
                    yield sse(feed.seen_up_to, "hello", {"v": 1, "kind": "hello",
                                                          "last_id": feed.seen_up_to})
                else:
                    backlog, reset = await run_in_threadpool(feed.backlog, since)
                    if reset is not None:
                        yield sse(feed.seen_up_to, "reset", {
                            "v": 1, "kind": "reset", "reason": reset,
                            "last_id": feed.seen_up_to,
                            "what_to_do": "read the current state again (nodes, tasks)"})
                    for event_id, event in backlog:
                        yield sse(event_id, str(event.get("kind")), event)
                    yield sse(feed.seen_up_to, "hello", {"v": 1, "kind": "hello",
                                                          "last_id": feed.seen_up_to,
                                                          "resumed_from": since})
                while True:
                    item = await feed.next(HEARTBEAT_S)
                    if item == "":
                        yield b": heartbeat\n\n"
                        continue
                    if item is None:
                        break
                    assert not isinstance(item, str)
                    event_id, event = item
                    yield sse(event_id, str(event.get("kind")), event)
                if feed.sub.closed and feed.sub.closed != "the service is stopping":
                    yield sse(h.service.hub.last_id, "error", {
                        "v": 1, "kind": "error", "code": "slow_reader",
                        "error": feed.sub.closed})
            finally:
                feed.close()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})
    return events


# --- WebSocket ----------------------------------------------------------------------------
SUBSCRIBE_KEYS = ("op", "channels", "nodes", "tasks", "since")


def ws_endpoint(h: Handlers, registry: set[Callable[[], None]] | None
                ) -> Callable[[WebSocket], Any]:
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.websockets import WebSocketDisconnect

    async def ws(socket: WebSocket) -> None:
        def check() -> bool:
            q = edge.query(socket.query_params.multi_items(), ("access_token",))
            who = h.principal(socket.headers.get("authorization"),
                              edge.one(q, "access_token"), "viewer", "reading events")
            return who.may("operator")
        try:
            may_audit = await run_in_threadpool(check)
        except (Unauthorized, Forbidden, edge.Invalid) as exc:
            status, payload = classify(exc)
            await socket.send_denial_response(JSONResponse(payload, status_code=status))
            return
        await socket.accept()
        session = WsSession(h, socket, registry, may_audit)
        try:
            await session.run()
        except WebSocketDisconnect:
            pass
        except Exception:  # never a dropped connection without a close code
            log.exception("websocket session failed")
            try:
                await socket.close(code=1011, reason="internal error; see the service log")
            except Exception as exc:  # the connection is gone already
                log.debug("websocket close: %s", exc)
        finally:
            session.close()

    return ws


class WsSession:
    """One connection: at most one subscription at a time; `subscribe` replaces it."""

    def __init__(self, h: Handlers, socket: WebSocket, registry: set[Callable[[], None]] | None,
                 may_audit: bool) -> None:
        self.h, self.socket, self.registry, self.may_audit = h, socket, registry, may_audit
        self.feed: Feed | None = None
        self.changed = asyncio.Event()
        self.stopping = False
        self.closing: tuple[int, str] | None = None  # a close code of our own, and why
        if registry is not None:
            registry.add(self.stop)

    def stop(self) -> None:  # any thread
        self.stopping = True
        if self.feed is not None:
            self.feed.stop()

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
        if self.registry is not None:
            self.registry.discard(self.stop)

    async def _send(self, message: JSONObject) -> None:
        await self.socket.send_text(edge.dumps(message))

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
            except Exception as exc:  # the socket went away while writing
                log.debug("websocket writer: %s", exc)
        reason = self.feed.sub.closed if self.feed is not None else None
        if self.closing is not None:
            await self.socket.close(code=self.closing[0], reason=self.closing[1])
        elif reason and not self.stopping:
            await self._send({"type": "closed", "code": "slow_reader",
                                         "reason": reason})
            await self.socket.close(code=1008, reason="slow reader")
        elif self.stopping:
            await self.socket.close(code=1001, reason="service stopping")

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
                await self._send({"type": "pong",
                                             "last_id": self.h.service.hub.last_id})
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
                feed = Feed(self.h, chans, nodes, tasks, None)
                self.feed = feed
                if self.stopping:
                    feed.stop()
                reset = None
                backlog: list[tuple[int, JSONObject]] = []
                if since is None:
                    feed.seen_up_to = self.h.service.hub.last_id
                else:
                    backlog, reset = await run_in_threadpool(feed.backlog, since)
                await self._send({
                    "type": "subscribed", "channels": sorted(chans), "nodes": nodes,
                    "tasks": tasks, "last_id": feed.seen_up_to})
                if reset is not None:
                    await self._send({"type": "reset", "reason": reset,
                                                 "last_id": feed.seen_up_to})
                for event_id, event in backlog:
                    await self._send_event(event_id, event)
                self.changed.set()
            else:
                raise edge.Invalid("op", f"unknown op {op!r}: subscribe, unsubscribe or ping")
        except edge.Invalid as exc:
            await self._error("invalid", str(exc), exc.field)
        except Forbidden as exc:
            await self._error("forbidden", str(exc))

    async def _send_event(self, event_id: int, event: JSONObject) -> None:
        kind = event.get("kind")
        channel = next((c for c, k in CHANNELS.items() if k == kind), str(kind))
        await self._send({"type": "event", "id": event_id, "channel": channel,
                                     "event": event})

    async def _write(self) -> None:
        while True:
            feed = self.feed
            if feed is None:
                self.changed.clear()
                try:
                    await asyncio.wait_for(self.changed.wait(), HEARTBEAT_S)
                except TimeoutError:
                    await self._send({"type": "heartbeat",
                                                 "last_id": self.h.service.hub.last_id})
                if self.stopping:
                    return
                continue
            item = await feed.next(HEARTBEAT_S)
            if feed is not self.feed:
                continue  # replaced meanwhile
            if item == "":
                await self._send({"type": "heartbeat", "last_id": feed.seen_up_to
                                             if feed.seen_up_to > self.h.service.hub.last_id
                                             else self.h.service.hub.last_id})
                continue
            if item is None:
                return
            assert not isinstance(item, str)
            await self._send_event(*item)


def _strings(msg: JSONObject, key: str) -> list[str]:
    value = msg.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise edge.Invalid(key, f"`{key}` must be a list of strings")
    return value


__all__ = ["AUDIT", "HEARTBEAT_S", "sse_endpoint", "ws_endpoint"]
