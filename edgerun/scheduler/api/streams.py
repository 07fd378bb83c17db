"""Live events for browsers and tools: Server-Sent Events at /v1/events (here), WebSocket
at /v1/ws (ws.py).

Both read the same EventHub (store/events.py) and the same durable event log, with
the same filters (channels nodes, tasks, output, audit; by node and by task id), so
docs/EVENTS.md describes one schema for both.

- Resume: a reader gives the id of the last event it saw (SSE: `Last-Event-ID`,
  which EventSource sends by itself on reconnect, or `?last_event_id=`; WS:
  `"since"`). It first gets every logged event after that id from the store,
  then the live ones, without a gap: it subscribes before it reads the log, and
  skips live events the log already gave it (`Feed.start`: none is taken off the
  hub's queue before the reader knows where it starts, a fresh one too). An id
  older than the log keeps gets an explicit `reset` event: read the current state
  again.
- Bounded (issue 23): each reader holds at most MAX_PENDING_BYTES of rendered
  events it has not sent; past that it is cut off with `slow_reader` and may
  resume from the log with its last id. A write that the reader does not take
  within WRITE_DEADLINE_S ends the connection: a reader that stopped reading
  costs the service about a MiB, then nothing.
- Revocation: every open stream belongs to a token; the Registry closes a
  token's streams within REVOKE_CHECK_S of its revocation on any instance.
- Authentication without a token in the URL: `Authorization: Bearer` where the
  client can set it, else a single-use ticket (tickets.py) in `?ticket=`, or for
  the WebSocket the token as a subprotocol (ws.py). `?access_token=` still works
  for older clients and is redacted from every log line (logfilter.py).
- Heartbeats every HEARTBEAT_S (SSE: a comment line; WS: a `heartbeat` message).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgerun.protocol import JSONObject
from edgerun.scheduler.api import edge
from edgerun.scheduler.api.auth import Principal
from edgerun.scheduler.api.handlers import Handlers
from edgerun.scheduler.api.routes import Param
from edgerun.scheduler.store.events import AUDIT, CHANNELS, OUTPUT, Subscription

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
BACKLOG_PAGE = 500
MAX_PENDING_BYTES = 1024 * 1024
WRITE_DEADLINE_S = 10.0
REVOKE_CHECK_S = 0.5
CHANNEL = "(nodes|tasks|output|audit)"
QUERY = (
    Param("channel", {"type": "string", "pattern": f"^{CHANNEL}(,{CHANNEL})*$"},
          "nodes, tasks, output, audit (comma-separated or repeated)", many=True),
    Param("node", {"type": "string", "minLength": 1, "pattern": "^[^\\u0000]+$"}, "node id",
          many=True),
    Param("task", {"type": "string", "minLength": 1, "pattern": "^[^\\u0000]+$"}, "task id",
          many=True),
    Param("ticket", description="a stream ticket (POST /v1/stream-tickets), once"),
    Param("access_token", description="the token, for older clients; prefer a ticket"),
    Param("last_event_id", {"type": "string", "pattern": "^[0-9]{0,18}$"},
          "as the Last-Event-ID header"),
    Param("settled", {"type": "string", "enum": ["true", "false"]},
          "true: task events only where the task reached a final state or an alert "
          "came (what a follower counting finals needs: one event a task, not five)"))
STREAM_QUERY = tuple(p.name for p in QUERY)
STOPPING = "the service is stopping"
Render = Callable[[int, JSONObject], bytes]


class Registry:
    """Every open stream with its token: closed all at once when the service stops, and
    those of a token soon after it is revoked (here or on another instance)."""

    def __init__(self) -> None:
        self.open: dict[Callable[[str, str], None], int | None] = {}
        self._watcher: asyncio.Task[None] | None = None

    def add(self, stop: Callable[[str, str], None], who: Principal, h: Handlers) -> None:
        """On the event loop: `stop(code, reason)` ends the stream from any thread."""
        self.open[stop] = who.token_id
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch(h))

    def discard(self, stop: Callable[[str, str], None]) -> None:
        self.open.pop(stop, None)

    def stop_all(self) -> None:
        for stop in list(self.open):
            stop("stopping", STOPPING)

    def revoked(self, token_id: int) -> None:
        for stop, owner in list(self.open.items()):
            if owner == token_id:
                stop("token_revoked", "the token of this stream was revoked")

    async def _watch(self, h: Handlers) -> None:
        from starlette.concurrency import run_in_threadpool

        def live() -> set[int]:
            return {int(t["id"]) for t in h.store.tokens() if t.get("revoked_at") is None}
        while self.open:
            await asyncio.sleep(REVOKE_CHECK_S)
            try:
                tokens = await run_in_threadpool(live)
            except Exception as exc:  # the store is away: look again next round
                log.debug("stream token check: %s", exc)
                continue
            for owner in {o for o in self.open.values() if o is not None} - tokens:
                self.revoked(owner)


class Feed:
    """A hub subscription read from the event loop without blocking it. Events are
    taken off the hub's queue as they come, by the thread that published them,
    rendered for the wire and counted: the reader holds at most MAX_PENDING_BYTES,
    whether or not it writes, and a burst cannot outrun the count."""

    def __init__(self, h: Handlers, channels: set[str], nodes: list[str], tasks: list[str],
                 render: Render, settled: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.ready = asyncio.Event()
        self.h, self.render = h, render
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self.code = "slow_reader"  # why `sub.closed` ended the stream
        self._lock = threading.Lock()
        self._waking = False
        self.seen_up_to = 0  # the log gave us every logged event up to this id
        self.started = False  # `start`: until then what comes waits in the hub's queue
        self.sub: Subscription = h.service.hub.subscribe(
            ids=tasks, nodes=nodes, kinds=[CHANNELS[c] for c in channels], wake=self._wake,
            settled=settled)

    def start(self, seen_up_to: int | None = None) -> None:
        """Live events from here on: those above `seen_up_to` (a fresh reader: the hub's
        latest id, read now that the subscription is in place; a resuming one: where its
        backlog ended). Nothing is taken off the hub's queue before, so an event handed
        out between the subscription and this point is not sent after a `hello` that
        already counts it."""
        with self._lock:
            self.seen_up_to = (self.h.service.hub.last_id if seen_up_to is None
                               else seen_up_to)
            self.started = True
            self._pull_locked()

    def _wake(self) -> None:  # the publishing thread
        if not self.started:
            return  # `start` takes what is queued meanwhile
        self._pull()
        if self._waking:
            return
        self._waking = True
        try:
            self.loop.call_soon_threadsafe(self._ready)
        except RuntimeError:
            pass  # the loop is closed: the reader is gone

    def _ready(self) -> None:  # the loop
        self._waking = False
        self.ready.set()

    def _pull(self) -> None:  # any thread
        with self._lock:
            self._pull_locked()

    def _pull_locked(self) -> None:
        while self.started and not self.sub.closed:
            try:
                item = self.sub.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.stop("stopping", STOPPING)
                break
            event_id, event = item
            if event.get("kind") != OUTPUT and event_id <= self.seen_up_to:
                continue  # the log gave it already
            frame = self.render(event_id, event)
            self.pending.append(frame)
            self.pending_bytes += len(frame)
            if self.pending_bytes > MAX_PENDING_BYTES:
                self.stop("slow_reader", f"this reader fell over {MAX_PENDING_BYTES} bytes "
                                         f"behind and was cut off; resume from the last event "
                                         f"id it read, or read the current state again")

    def stop(self, code: str, reason: str) -> None:  # any thread
        if self.sub.closed is None:
            self.code = code
            self.sub.closed = reason
        self.h.service.hub.unsubscribe(self.sub)
        self.pending.clear()  # what a cut reader had waiting is freed at once
        self.pending_bytes = 0
        try:
            self.loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:
            pass

    def close(self) -> None:
        self.stop("closed", "closed")

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

    async def next(self, timeout: float) -> bytes | None:
        """The next rendered event; None when the stream ends; b"" on a heartbeat timeout."""
        while True:
            if self.sub.closed:
                return None
            with self._lock:
                if not self.pending:
                    self._pull_locked()  # anything queued before this feed's first wake
                if self.pending:
                    frame = self.pending.popleft()
                    self.pending_bytes -= len(frame)
                    return frame
                self.ready.clear()
            if self.sub.closed:
                continue
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except TimeoutError:
                return b""


def channels_of(values: list[str]) -> set[str]:
    chosen = set()
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if name not in CHANNELS:
                raise edge.Invalid("channel", f"unknown channel {name[:40]!r}: the channels "
                                              f"are {', '.join(CHANNELS)}")
            chosen.add(name)
    return chosen or {"nodes", "tasks", "output"}


def since_of(text: str | None, field: str) -> int | None:
    if text is None or text == "":
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise edge.Invalid(field, f"`{field}` must be an event id this service gave out")
    return int(text)


def sse(event_id: int | None, kind: str, data: JSONObject) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return (head + f"event: {kind}\ndata: {edge.dumps(data)}\n\n").encode("utf-8")


def sse_render(event_id: int, event: JSONObject) -> bytes:
    return sse(event_id, str(event.get("kind")), event)


def stream_principal(h: Handlers, headers: Any, q: dict[str, list[str]], what: str) -> Principal:
    """Who opens a stream: the Authorization header, a single-use ticket, or (older
    clients) ?access_token=."""
    ticket = edge.one(q, "ticket")
    if ticket is not None and not headers.get("authorization"):
        return h.tickets.redeem(ticket)
    return h.principal(headers.get("authorization"), edge.one(q, "access_token"),
                       "viewer", what)


def sse_endpoint(h: Handlers, registry: Registry) -> Callable[[Request], Any]:
    from starlette.concurrency import run_in_threadpool

    async def events(request: Request) -> Any:
        def check() -> tuple[Principal, set[str], list[str], list[str], int | None, bool]:
            q = edge.query(request.query_params.multi_items(), STREAM_QUERY,
                           ("channel", "node", "task"))
            who = stream_principal(h, request.headers, q, "reading events")
            chans = channels_of(q.get("channel", []))
            if "audit" in chans:
                who.require("operator", "the audit channel")
            since = since_of(request.headers.get("last-event-id")
                             or edge.one(q, "last_event_id"), "last_event_id")
            settled = edge.one(q, "settled") or "false"
            if settled not in ("true", "false"):
                raise edge.Invalid("settled", "`settled` must be true or false")
            return who, chans, q.get("node", []), q.get("task", []), since, settled == "true"

        who, chans, nodes, tasks, since, settled = await run_in_threadpool(check)
        return SseStream(h, registry, who,
                         Feed(h, chans, nodes, tasks, sse_render, settled), since)
    return events


class SseStream:
    """The /v1/events response, as an ASGI app: every write has a deadline, and a
    client that goes away ends it at once."""

    def __init__(self, h: Handlers, registry: Registry, who: Principal, feed: Feed,
                 since: int | None) -> None:
        self.h, self.registry, self.who, self.feed, self.since = h, registry, who, feed, since

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.registry.add(self.feed.stop, self.who, self.h)
        gone = asyncio.get_running_loop().create_task(self._until_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]})
            async for chunk in self._chunks():
                if gone.done():
                    return
                try:
                    await asyncio.wait_for(send({"type": "http.response.body", "body": chunk,
                                                 "more_body": True}), WRITE_DEADLINE_S)
                except TimeoutError:
                    log.warning("SSE reader %s took nothing for %.0f s: connection closed",
                                self.who.name, WRITE_DEADLINE_S)
                    return  # the server closes the connection of an unfinished response
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            self.registry.discard(self.feed.stop)
            self.feed.close()

    async def _until_disconnect(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.feed.stop("closed", "the client went away")

    async def _chunks(self) -> Any:
        from starlette.concurrency import run_in_threadpool

        feed, since = self.feed, self.since
        yield b"retry: 2000\n\n"
        if since is None:
            feed.start()
            yield sse(feed.seen_up_to, "hello", {"v": 1, "kind": "hello",
                                                  "last_id": feed.seen_up_to})
        else:
            backlog, reset = await run_in_threadpool(feed.backlog, since)
            feed.start(feed.seen_up_to)
            if reset is not None:
                yield sse(feed.seen_up_to, "reset", {
                    "v": 1, "kind": "reset", "reason": reset, "last_id": feed.seen_up_to,
                    "what_to_do": "read the current state again (nodes, tasks)"})
            for event_id, event in backlog:
                yield sse_render(event_id, event)
            yield sse(feed.seen_up_to, "hello", {"v": 1, "kind": "hello",
                                                  "last_id": feed.seen_up_to,
                                                  "resumed_from": since})
        while True:
            frame = await feed.next(HEARTBEAT_S)
            if frame is None:
                break
            yield frame or b": heartbeat\n\n"
        if feed.code in ("slow_reader", "token_revoked"):
            # no id: a reader cut off resumes from the last event it got (EventSource
            # keeps the last id it saw), not past the ones it was cut off before
            yield sse(None, "error", {
                "v": 1, "kind": "error", "code": feed.code, "error": feed.sub.closed})


__all__ = ["AUDIT", "HEARTBEAT_S", "Feed", "Registry", "sse_endpoint", "stream_principal"]
