"""Streams under hostile readers (issue 23), against a live service: a reader that never
reads is cut by the bytes it holds and its connection ends; revoking a token closes its
open streams (here and on another instance); streams open without the token in the URL
(single-use tickets, the WebSocket subprotocol); a foreign Origin cannot upgrade; a
token in a URL never reaches the log."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import sqlite3
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from edgerun.protocol import format_time
from edgerun.scheduler.api import streams

from .apikit import Stack, stack, wait_for


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("limits"), node="limits-a") as st:
        yield st


def open_streams(s: Stack) -> int:
    assert s.app.api is not None
    return len(s.app.api.streams.open)


def cut(s: Stack) -> bool:
    """Every open SSE stream's feed has been cut off."""
    assert s.app.api is not None
    feeds = [getattr(stop, "__self__", None) for stop in s.app.api.streams.open]
    return all(f.sub.closed for f in feeds if isinstance(f, streams.Feed))


def new_token(s: Stack, role: str = "viewer") -> tuple[str, str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    made = s.http("POST", "/v1/tokens", s.admin, {"name": name, "role": role})
    assert made.status == 201
    return name, made.body["token"]


class SseReader:
    def __init__(self, s: Stack, query: str, token: str | None, rcvbuf: int | None = None
                 ) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        self.conn.connect()
        assert self.conn.sock is not None
        if rcvbuf:
            self.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.conn.request("GET", "/v1/events" + query, headers=headers)
        self.response = self.conn.getresponse()

    def events(self) -> Iterator[tuple[str, Any]]:
        kind, data = "message", list[str]()
        while True:
            try:
                line = self.response.readline()
            except (http.client.IncompleteRead, OSError):
                return
            if not line:
                return
            text = line.decode().rstrip("\n")
            if text == "" and data:
                yield kind, json.loads("\n".join(data))
                kind, data = "message", []
            elif text.startswith("event: "):
                kind = text[7:]
            elif text.startswith("data: "):
                data.append(text[6:])

    def until(self, wanted: str) -> Any:
        for kind, data in self.events():
            if kind == wanted:
                return data
        raise AssertionError(f"the stream ended before a {wanted!r} event")

    def close(self) -> None:
        self.conn.close()


def output(node: str, size: int) -> dict[str, Any]:
    return {"v": 1, "kind": "output", "id": "flood", "node": node, "stream": "stdout",
            "seq": 1, "at": format_time(), "data": "x" * size}


def test_a_reader_that_never_reads_is_cut_by_bytes_and_its_connection_ends(
        s: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "WRITE_DEADLINE_S", 1.0)
    before = open_streams(s)
    reader = SseReader(s, "?channel=output", s.viewer, rcvbuf=4096)
    try:
        assert reader.response.status == 200
        assert reader.until("hello")["kind"] == "hello"
        wait_for(lambda: open_streams(s) == before + 1)
        assert s.app.service is not None
        hub = s.app.service.hub
        sent = 0
        while not cut(s) and sent < 50 * 1024 * 1024:
            hub.publish(output(s.node, 4096))  # the reader reads nothing meanwhile
            sent += 4096
        # cut at MAX_PENDING_BYTES queued, plus what the socket buffers took before
        assert cut(s) and sent < 8 * 1024 * 1024, sent
        wait_for(lambda: open_streams(s) == before)  # its write deadline ended it
    finally:
        reader.close()


def test_revoking_a_token_closes_its_sse_and_websocket_streams(s: Stack) -> None:
    name, token = new_token(s)
    reader = SseReader(s, "?channel=tasks", token)
    with connect(f"ws://127.0.0.1:{s.port}/v1/ws",
                 additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        assert reader.until("hello")
        ws.send(json.dumps({"op": "ping"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "pong"
        assert s.http("DELETE", f"/v1/tokens/{name}", s.admin).status == 200
        assert reader.until("error")["code"] == "token_revoked"
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                message = json.loads(ws.recv(timeout=30))
                assert message["type"] in ("heartbeat", "closed")
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    reader.close()


def test_a_revocation_by_another_instance_closes_streams_too(s: Stack) -> None:
    name, token = new_token(s)
    reader = SseReader(s, "?channel=nodes", token)
    assert reader.until("hello")
    db = sqlite3.connect(s.app.settings.db)  # what another instance's DELETE does
    try:
        db.execute("UPDATE tokens SET revoked_at=? WHERE name=?", (format_time(), name))
        db.commit()
    finally:
        db.close()
    assert reader.until("error")["code"] == "token_revoked"
    reader.close()


def test_streams_open_with_a_single_use_ticket_and_no_token_in_the_url(s: Stack) -> None:
    made = s.http("POST", "/v1/stream-tickets", s.viewer)
    assert made.status == 201 and made.body["expires_in"] <= 60
    ticket = made.body["ticket"]
    reader = SseReader(s, f"?channel=tasks&ticket={ticket}", None)
    assert reader.response.status == 200 and reader.until("hello")
    reader.close()
    again = SseReader(s, f"?ticket={ticket}", None)
    assert again.response.status == 401  # single use
    again.close()
    assert s.http("POST", "/v1/stream-tickets").status == 401
    ws_ticket = s.http("POST", "/v1/stream-tickets", s.viewer).body["ticket"]
    with connect(f"ws://127.0.0.1:{s.port}/v1/ws?ticket={ws_ticket}") as ws:
        ws.send(json.dumps({"op": "ping"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "pong"
    with pytest.raises(InvalidStatus) as refused, \
            connect(f"ws://127.0.0.1:{s.port}/v1/ws?ticket={ws_ticket}"):
        pass
    assert refused.value.response.status_code == 401


def test_the_websocket_takes_the_token_as_a_subprotocol(s: Stack) -> None:
    with connect(f"ws://127.0.0.1:{s.port}/v1/ws",
                 subprotocols=["edgerun", f"bearer.{s.viewer}"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "edgerun"
        ws.send(json.dumps({"op": "ping"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "pong"
    with pytest.raises(InvalidStatus) as refused, \
            connect(f"ws://127.0.0.1:{s.port}/v1/ws",
                    subprotocols=["edgerun", "bearer.ert_wrong"]):  # type: ignore[list-item]
        pass
    assert refused.value.response.status_code == 401


@pytest.mark.parametrize("origin, allowed", [
    (None, True), ("http://127.0.0.1:{port}", True), ("http://evil.example", False),
    ("http://127.0.0.1:1", False), ("null", False), ("https://127.0.0.1:{port}", False)])
def test_websocket_upgrades_check_the_origin(s: Stack, origin: str | None,
                                            allowed: bool) -> None:
    headers = {"Authorization": f"Bearer {s.viewer}"}
    if origin is not None:
        headers["Origin"] = origin.format(port=s.port)
    url = f"ws://127.0.0.1:{s.port}/v1/ws"
    if allowed:
        with connect(url, additional_headers=headers) as ws:
            ws.send(json.dumps({"op": "ping"}))
            assert json.loads(ws.recv(timeout=30))["type"] == "pong"
    else:
        with pytest.raises(InvalidStatus) as refused, connect(url, additional_headers=headers):
            pass
        assert refused.value.response.status_code == 403


def test_a_token_in_a_url_never_reaches_the_log(s: Stack,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ticket = s.http("POST", "/v1/stream-tickets", s.viewer).body["ticket"]
    with connect(f"ws://127.0.0.1:{s.port}/v1/ws?access_token={s.viewer}") as ws:
        ws.send(json.dumps({"op": "ping"}))
        ws.recv(timeout=30)
    reader = SseReader(s, f"?access_token={s.viewer}", None)
    assert reader.until("hello")
    reader.close()
    with connect(f"ws://127.0.0.1:{s.port}/v1/ws?ticket={ticket}") as ws:
        ws.send(json.dumps({"op": "ping"}))
        ws.recv(timeout=30)
    logged = "\n".join(r.getMessage() for r in caplog.records  # the server's, not the client's
                       if r.name.startswith(("uvicorn", "edgerun")))
    assert "/v1/ws" in logged  # uvicorn logged the upgrades...
    assert s.viewer not in logged and ticket not in logged  # ...without the secrets
    assert "REDACTED" in logged


def test_a_websocket_reader_that_never_reads_is_cut_too(
        s: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "WRITE_DEADLINE_S", 1.0)
    assert s.app.api is not None and s.app.service is not None
    registry = s.app.api.streams
    before = set(registry.open)
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:  # a raw upgrade and one subscribe frame, then nothing is ever read
        sock.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Authorization: Bearer " + s.viewer.encode() + b"\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:  # the 101 first: frames sent with the head are lost
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 101"), answer
        subscribe = json.dumps({"op": "subscribe", "channels": ["output"]}).encode()
        sock.sendall(bytes([0x81, 0x80 | len(subscribe)]) + b"\x00" * 4 + subscribe)
        mine: list[Any] = []

        def subscribed() -> bool:
            mine[:] = [getattr(stop, "__self__", None) for stop in set(registry.open) - before]
            return bool(mine) and all(getattr(w, "feed", None) is not None for w in mine)
        wait_for(subscribed)

        def cut_off() -> bool:
            return all(w.feed.sub.closed for w in mine)
        sent = 0
        while not cut_off() and sent < 50 * 1024 * 1024:
            s.app.service.hub.publish(output(s.node, 4096))
            sent += 4096
        assert cut_off() and sent < 8 * 1024 * 1024, sent
        wait_for(lambda: not set(registry.open) - before)  # its write deadline ended it
    finally:
        sock.close()
