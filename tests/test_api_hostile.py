"""Hostile clients against a live service (issue 23): every string checked at the edge,
rows an older version wrote read back without a 500, deep nesting and huge numbers
answered 4xx JSON, the WebSocket closed with a close code, and never a traceback in
the service's log."""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from edgerun.protocol import DEFAULT_MAX_MESSAGE_BYTES
from edgerun.scheduler.api import deadline, server

from .apikit import Stack, stack


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("hostile"), node="hostile-a") as st:
        yield st


@pytest.fixture(autouse=True)
def no_traceback(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever a test sends, the service logs no traceback and no error."""
    caplog.set_level(logging.INFO)
    yield
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def post_raw(s: Stack, path: str, text: str, token: str | None = None) -> Any:
    return s.http("POST", path, token or s.operator, raw=text.encode("utf-8"))


def task_count(s: Stack) -> int:
    reply = s.http("GET", "/v1/tasks?limit=1000", s.viewer)
    assert reply.status == 200, reply.raw[:300]
    return len(reply.body["tasks"])


# --- strings at the edge ---------------------------------------------------------------
@pytest.mark.parametrize("body, field", [
    ('{"targets": ["%s"], "task": {"type": "shell", "command": "echo \\ud800"}}',
     "task.command"),
    ('{"targets": ["%s"], "task": {"type": "shell", "command": "echo \\udfff x"}}',
     "task.command"),
    ('{"targets": ["%s"], "task": {"type": "shell", "command": ["echo", "a\\ud83d"]}}',
     "task.command.1"),
    ('{"targets": ["%s"], "task": {"type": "shell", "command": "echo a\\u0000b"}}',
     "task.command"),
    ('{"targets": ["%s"], "task": {"type": "shell", "command": "true", '
     '"env": {"A\\u0000": "x"}}}', "task.env"),
    ('{"targets": ["%s"], "task": {"type": "shell", "command": "true", "id": "a/b"}}',
     "task.id"),
    ('{"targets": ["%s\\ud800"], "task": {"type": "shell", "command": "true"}}',
     "targets.0"),
])
def test_bad_strings_are_refused_422_and_nothing_is_stored(s: Stack, body: str,
                                                           field: str) -> None:
    before = task_count(s)
    reply = post_raw(s, "/v1/tasks", body % s.node)
    assert reply.status == 422, reply.raw[:300]
    assert reply.body["code"] == "invalid" and reply.body["field"].startswith(field)
    assert task_count(s) == before


def test_lone_surrogate_in_a_job_id_is_refused(s: Stack) -> None:
    body = '{"id": "j\\ud800", "targets": ["NODE"], "steps": [{"type": "shell", ' \
        '"command": "true"}]}'
    reply = post_raw(s, "/v1/jobs", body.replace("NODE", s.node))
    assert reply.status == 422 and reply.body["field"] == "id", reply.raw[:300]
    assert s.http("GET", "/v1/jobs", s.viewer).status == 200


def test_a_command_over_the_agent_message_limit_is_refused_naming_it(s: Stack) -> None:
    before = task_count(s)
    big = "x" * (DEFAULT_MAX_MESSAGE_BYTES + 10)
    reply = s.http("POST", "/v1/tasks", s.operator,
                   {"targets": [s.node], "task": {"type": "shell", "command": f"echo {big}"}})
    assert reply.status == 413, reply.raw[:300]
    assert reply.body["code"] == "too_large" and str(DEFAULT_MAX_MESSAGE_BYTES) in \
        reply.body["error"]
    assert len(reply.raw) < 4096  # the answer never echoes the command
    assert task_count(s) == before
    # the same through a job and a rollout
    job = s.http("POST", "/v1/jobs", s.operator,
                 {"targets": [s.node], "steps": [{"type": "shell", "command": big}]})
    assert job.status == 413 and len(job.raw) < 4096
    rollout = s.http("POST", "/v1/rollouts", s.operator,
                     {"targets": [s.node], "task": {"type": "shell", "command": big}})
    assert rollout.status == 413 and len(rollout.raw) < 4096


def test_a_megabyte_body_is_refused_without_an_echo(s: Stack) -> None:
    big = "x" * (1024 * 1024)
    reply = s.http("POST", "/v1/tasks", s.operator,
                   {"targets": [s.node], "task": {"type": "shell", "command": big}})
    assert reply.status == 413 and len(reply.raw) < 4096
    wrong = s.http("POST", "/v1/tasks", s.operator,
                   {"targets": [s.node], "task": {"type": "shell", "comand": "y" * 200_000}})
    assert wrong.status == 422 and len(wrong.raw) < 4096


# --- crashes on bad input ------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "[" * 10_000 + "]" * 10_000,
    '{"task": ' + "[" * 100_000,
    '{"targets": [], "task": {"type": "shell", "command": "true", "timeout": '
    + "[" * 5000 + "]" * 5000 + "}}",
    '{"targets": [], "task": {"type": "shell", "command": "true", "timeout": NaN}}',
    '{"targets": [], "task": {"type": "shell", "command": "true", "timeout": Infinity}}',
    '{"targets": [], "task": {"type": "shell", "command": "true", "timeout": 1e999}}',
    '{"targets": [], "task": {"type": "shell", "command": "true", "timeout": '
    + "9" * 5000 + "}}",
    '{"a": "\\ud800"}',
])
def test_deep_nesting_and_huge_numbers_get_4xx_json(s: Stack, text: str) -> None:
    for path in ("/v1/tasks", "/v1/jobs", "/v1/rollouts", "/v1/tokens"):
        reply = post_raw(s, path, text, s.admin)
        assert 400 <= reply.status < 500, (path, reply.status, reply.raw[:300])
        assert reply.body["code"] in ("bad_json", "invalid"), reply.body
        assert len(reply.raw) < 4096


@pytest.mark.parametrize("query", [
    "cursor=" + "9" * 30, "cursor=" + "9" * 5000, "cursor=-1", "limit=" + "9" * 30,
    "node=%ED%A0%80", "node=a%00b", "state=", "job=" + "%FF" * 10,
])
def test_hostile_queries_get_4xx_or_an_empty_page(s: Stack, query: str) -> None:
    reply = s.http("GET", "/v1/tasks?" + query, s.viewer)
    assert reply.status in (200, 422), (query, reply.status, reply.raw[:300])
    assert reply.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("path", ["/v1/tasks/%ED%A0%80", "/v1/tasks/a%00b",
                                  "/v1/nodes/%ED%A0%80", "/v1/jobs/" + "x" * 5000,
                                  "/v1/rollouts/%00"])
def test_hostile_path_ids_get_404_or_422(s: Stack, path: str) -> None:
    reply = s.http("GET", path, s.viewer)
    assert reply.status in (404, 422), (path, reply.status, reply.raw[:300])
    assert len(reply.raw) < 4096


# --- the read path survives bad rows ------------------------------------------------------
def test_rows_an_older_version_wrote_are_shown_escaped_never_500(s: Stack) -> None:
    api = s.api(s.operator)
    api.dispatch([s.node], {"type": "shell", "command": "sleep 30", "id": "poison-1"})
    api.wait_state("poison-1", s.node, {"running"})
    # what an older version stored: a lone surrogate in the spec's JSON, and an
    # update whose body has one too
    db = sqlite3.connect(s.app.settings.db)
    try:
        db.execute("UPDATE tasks SET spec = ? WHERE id = 'poison-1'",
                   ('{"type": "shell", "command": "echo \\ud800", "id": "poison-1"}',))
        db.execute("UPDATE updates SET body = ? WHERE task_id = 'poison-1'",
                   ('{"v": 1, "kind": "update", "state": "running", "x": "\\udc00"}',))
        # and what someone's hand edit left: bytes that are not UTF-8 in a text column
        db.execute("UPDATE tasks SET error_message = CAST(x'ff41' AS TEXT) "
                   "WHERE id = 'poison-1'")
        db.commit()
    finally:
        db.close()
    for path in ("/v1/tasks", "/v1/tasks/poison-1", f"/v1/nodes/{s.node}",
                 "/v1/tasks?node=" + s.node):
        reply = s.http("GET", path, s.viewer)
        assert reply.status == 200, (path, reply.raw[:300])
        reply.raw.decode("utf-8")  # valid UTF-8: the surrogate is escaped
        assert b"\\ud800" in reply.raw or path.startswith("/v1/nodes") or \
            path.startswith("/v1/tasks?")
    canceled = s.http("POST", "/v1/tasks/poison-1/cancel", s.operator, {})
    assert canceled.status in (200, 409), canceled.raw[:300]


# --- the WebSocket ------------------------------------------------------------------------
def ws_open(s: Stack) -> Any:
    return connect(f"ws://127.0.0.1:{s.port}/v1/ws",
                   additional_headers={"Authorization": f"Bearer {s.viewer}"})


def next_json(ws: Any) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(ws.recv(timeout=30))
    return message


@pytest.mark.parametrize("text", [
    "[" * 10_000 + "]" * 10_000,
    '{"op": "subscribe", "channels": ["tasks"], "nodes": ["\\ud800"]}',
    '{"op": "subscribe", "channels": ["tasks"], "tasks": ["a\\u0000"]}',
    '{"op": "subscribe", "channels": ["tasks"], "since": ' + "9" * 40 + "}",
    '{"op": "subscribe", "channels": ["tasks"], "since": 1e999}',
    '{"op": "\\ud800"}',
])
def test_ws_hostile_messages_get_an_error_and_the_socket_stays(s: Stack, text: str) -> None:
    with ws_open(s) as ws:
        ws.send(text)
        error = next_json(ws)
        while error["type"] == "heartbeat":
            error = next_json(ws)
        assert error["type"] == "error" and error["code"] in ("bad_json", "invalid"), error
        assert len(json.dumps(error)) < 4096
        ws.send(json.dumps({"op": "ping"}))
        assert next_json(ws)["type"] in ("pong", "heartbeat")


def test_ws_binary_and_huge_frames_close_with_a_code(s: Stack) -> None:
    with ws_open(s) as ws:
        ws.send(b"\xff\xfe binary")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code in (1003, 1008)
    with ws_open(s) as ws:
        ws.send("x" * (2 * 1024 * 1024))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code in (1009, 1008)


# --- timeouts and the token before the body -----------------------------------------------
def closed_by_server(sock: socket.socket, pace_s: float, send: bytes) -> bool:
    """Send `send` a byte per `pace_s` (a slow-loris client); True once the server closed
    the connection, False if every byte went out and it was still open."""
    for byte in send:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return True
        readable, _, _ = select.select([sock], [], [], pace_s)
        if readable:
            try:
                return sock.recv(65536) == b""
            except OSError:
                return True
    return False


def test_a_head_sent_a_byte_at_a_time_is_closed(s: Stack,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deadline, "HEAD_TIMEOUT_S", 1.0)
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        head = b"GET /v1/nodes HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        assert closed_by_server(sock, 0.1, head)


def test_a_connection_that_sends_nothing_is_closed(s: Stack,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deadline, "HEAD_TIMEOUT_S", 1.0)
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        assert sock.recv(1) == b""


def test_keep_alive_requests_and_a_websocket_outlive_the_head_deadline(
        s: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deadline, "HEAD_TIMEOUT_S", 0.5)
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    try:
        for _ in range(3):
            conn.request("GET", "/v1/whoami", headers={"Authorization": f"Bearer {s.viewer}"})
            assert conn.getresponse().read() and True
    finally:
        conn.close()
    with ws_open(s) as ws:
        start = time.monotonic()
        while time.monotonic() - start < 1.5:  # three deadlines' worth of traffic
            ws.send(json.dumps({"op": "ping"}))
            assert next_json(ws)["type"] in ("pong", "heartbeat")


def test_a_body_that_never_completes_gets_408(s: Stack,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "BODY_TIMEOUT_S", 1.0)
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + s.operator.encode() +
                     b"\r\nContent-Length: 100\r\n\r\n{\"targets\"")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code": "timeout"' in answer


def test_the_token_is_checked_before_the_body_is_read(s: Stack) -> None:
    reply = s.http("POST", "/v1/tasks", raw=b"this is not json")
    assert reply.status == 401 and reply.body["code"] == "unauthorized"
    # a body announced and never sent: the 401 comes without waiting for it
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 401")
