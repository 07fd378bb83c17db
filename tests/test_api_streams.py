"""Live events: SSE at /v1/events (ids, Last-Event-ID resume, reset, heartbeats, slow
readers cut off) and the WebSocket at /v1/ws (subscribe protocol, filters, errors)."""

from __future__ import annotations

import http.client
import json
import queue
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from edgerun.scheduler.store import events as events_module
from edgerun.scheduler.api import streams
from edgerun.scheduler.store.events import EventHub

from .apikit import Stack, stack


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("streams"), node="sse-a") as st:
        yield st


class Sse:
    """A raw SSE reader: (id, event, data) triples and comment lines."""

    def __init__(self, port: int, query: str, token: str | None,
                 last_event_id: int | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Accept": "text/event-stream"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        self.conn.request("GET", "/v1/events" + query, headers=headers)
        self.response = self.conn.getresponse()
        self.comments: list[str] = []

    def next(self) -> tuple[int | None, str, Any]:
        event_id, kind, data = None, "message", []
        while True:
            line = self.response.readline().decode().rstrip("\n")
            if line.startswith(":"):
                self.comments.append(line)
                continue
            if line == "":
                if data:
                    return event_id, kind, json.loads("\n".join(data))
                continue
            name, _, value = line.partition(": ")
            if name == "id":
                event_id = int(value)
            elif name == "event":
                kind = value
            elif name == "data":
                data.append(value)

    def until(self, kind: str, predicate: Any = lambda d: True) -> tuple[int | None, Any]:
        while True:
            event_id, got, data = self.next()
            if got == kind and predicate(data):
                return event_id, data

    def close(self) -> None:
        self.conn.close()


def test_sse_every_event_has_an_id_and_resume_with_last_event_id(s: Stack) -> None:
    api = s.api(s.operator)
    first = Sse(s.port, "?channel=tasks&task=resume-1&task=resume-2", s.viewer)
    hello_id, hello = first.until("hello")
    assert hello_id is not None and hello["last_id"] == hello_id
    api.dispatch([s.node], {"type": "shell", "command": "true", "id": "resume-1"})
    seen_id, event = first.until("task_event", lambda d: d["state"] == "succeeded")
    assert seen_id is not None and seen_id > hello_id
    assert event["task"]["id"] == "resume-1" and "stdout" not in event["task"]["result"]
    first.close()
    # while away: another task runs to the end
    api.dispatch([s.node], {"type": "shell", "command": "echo missed", "id": "resume-2"})
    api.wait_state("resume-2", s.node, "succeeded")
    again = Sse(s.port, "?channel=tasks&task=resume-1&task=resume-2", s.viewer,
                last_event_id=seen_id)
    states = []
    while True:
        event_id, kind, data = again.next()
        if kind == "hello":
            assert data["resumed_from"] == seen_id
            break
        assert kind == "task_event" and event_id is not None and event_id > seen_id
        states.append((data["id"], data["state"]))
    again.close()
    assert ("resume-2", "succeeded") in states
    assert all(task_id == "resume-2" for task_id, _ in states)  # nothing seen twice


def test_sse_too_old_or_unknown_last_event_id_gets_reset(s: Stack) -> None:
    assert s.app.service is not None
    store = s.app.service.store
    for i in range(520):  # through the log's own append point, keeping only 10
        store.append_event("tasks", "x", f"filler-{i}", {"kind": "filler"}, keep=10)
    dropped, last = store.event_horizon()
    assert dropped > 1
    old = Sse(s.port, "", s.viewer, last_event_id=1)
    event_id, kind, data = old.next()
    assert kind == "reset" and "older" in data["reason"] and event_id == last
    old.close()
    future = Sse(s.port, "", s.viewer, last_event_id=last + 1000)
    assert future.next()[1] == "reset"
    future.close()


def test_sse_auth_filters_and_bad_queries(s: Stack) -> None:
    from .apikit import call
    assert call(s.port, "GET", "/v1/events").status == 401
    query_token = Sse(s.port, f"?access_token={s.viewer}&channel=nodes", None)
    assert query_token.response.status == 200
    query_token.close()
    bad = call(s.port, "GET", "/v1/events?channel=bogus", s.viewer)
    assert bad.status == 422 and bad.body["field"] == "channel"
    typo = call(s.port, "GET", "/v1/events?chanel=tasks", s.viewer)
    assert typo.status == 422 and typo.body["field"] == "chanel"


def test_sse_settled_rejects_a_value_other_than_true_or_false(s: Stack) -> None:
    from .apikit import call
    for bad in ("yes", "1", "TRUE", "x" * 5000):
        answer = call(s.port, "GET", f"/v1/events?channel=tasks&settled={bad}", s.viewer)
        assert answer.status == 422 and answer.body["field"] == "settled", bad
    twice = call(s.port, "GET", "/v1/events?settled=true&settled=false", s.viewer)
    assert twice.status == 422 and twice.body["field"] == "settled"


def test_sse_settled_sends_only_the_events_that_end_a_task_live_and_on_resume(
        s: Stack) -> None:
    api = s.api(s.operator)
    query = "?channel=tasks&task=settled-1&task=settled-2&settled=true"
    live = Sse(s.port, query, s.viewer)
    hello_id, _hello = live.until("hello")
    api.dispatch([s.node], {"type": "shell", "command": "true", "id": "settled-1"})
    api.dispatch([s.node], {"type": "shell", "command": "false", "id": "settled-2"})
    got: dict[str, tuple[int | None, str]] = {}
    while len(got) < 2:
        event_id, kind, data = live.next()
        assert kind == "task_event", kind
        assert data["state"] in ("succeeded", "failed"), data["state"]  # no step between
        got[data["id"]] = (event_id, data["state"])
    live.close()
    assert got["settled-1"][1] == "succeeded" and got["settled-2"][1] == "failed"
    # from the log: the same two, nothing else, in id order
    again = Sse(s.port, query, s.viewer, last_event_id=hello_id)
    replayed = []
    while True:
        event_id, kind, data = again.next()
        if kind == "hello":
            break
        replayed.append((event_id, data["id"], data["state"]))
    again.close()
    assert sorted(replayed) == sorted((i, t, st) for t, (i, st) in got.items())
    # without the filter the log has the steps too
    every = Sse(s.port, query.replace("&settled=true", ""), s.viewer, last_event_id=hello_id)
    states = []
    while True:
        _event_id, kind, data = every.next()
        if kind == "hello":
            break
        states.append(data["state"])
    every.close()
    assert "dispatched" in states and "running" in states


def test_sse_heartbeats(s: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "HEARTBEAT_S", 0.2)
    quiet = Sse(s.port, "?channel=tasks&task=never-sent", s.viewer)
    quiet.until("hello")
    line = ""
    while not line.startswith(": heartbeat"):  # a comment line: EventSource ignores it
        line = quiet.response.readline().decode()
    quiet.close()


def test_sse_reader_that_falls_behind_is_closed_with_a_reason(
        s: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "QUEUE_LIMIT", 20)
    assert s.app.service is not None
    slow = Sse(s.port, "?channel=output&node=flood", s.viewer)
    slow.until("hello")
    chunk = "x" * 60_000
    for seq in range(300):  # ~18 MB the reader does not read: far past socket buffers
        s.app.service.hub.publish({"v": 1, "kind": "output", "id": "flood-1", "node": "flood",
                                   "stream": "stdout", "seq": seq, "data": chunk})
    kinds = []
    while True:
        _event_id, kind, data = slow.next()
        kinds.append(kind)
        if kind == "error":
            assert data["code"] == "slow_reader" and "behind" in data["error"]
            break
    slow.close()
    assert kinds.count("output") < 300


def test_hub_bounds_each_reader_and_cuts_off_the_slow_one() -> None:
    hub = EventHub()
    fast, slow = hub.subscribe(), hub.subscribe()
    for i in range(events_module.QUEUE_LIMIT + 5):
        hub.publish({"kind": "node_event", "node": f"n{i}"})
        try:
            while True:
                fast.queue.get_nowait()
        except queue.Empty:
            pass
    assert fast.closed is None and slow.closed and "behind" in slow.closed
    assert slow.queue.qsize() == events_module.QUEUE_LIMIT
    assert hub.subscribers == 1


# --- WebSocket -------------------------------------------------------------------------------
def ws_url(s: Stack, token: str | None = None) -> str:
    return f"ws://127.0.0.1:{s.port}/v1/ws" + (f"?access_token={token}" if token else "")


def recv(ws: Any, wanted: str, predicate: Any = lambda m: True) -> dict[str, Any]:
    while True:
        message = json.loads(ws.recv(timeout=30))
        if message["type"] == wanted and predicate(message):
            return message


def test_ws_subscribe_to_a_task_gets_its_events_and_output(s: Stack) -> None:
    api = s.api(s.operator)
    with connect(ws_url(s), additional_headers={"Authorization": f"Bearer {s.viewer}"}) as ws:
        ws.send(json.dumps({"op": "subscribe", "channels": ["tasks", "output"],
                            "tasks": ["ws-1"]}))
        subscribed = recv(ws, "subscribed")
        assert subscribed["channels"] == ["output", "tasks"]
        api.dispatch([s.node], {"type": "shell", "command": "echo over-ws", "id": "ws-1"})
        api.dispatch([s.node], {"type": "shell", "command": "echo other", "id": "ws-other"})
        output = recv(ws, "event", lambda m: m["channel"] == "output")
        assert output["event"]["id"] == "ws-1" and "over-ws" in output["event"]["data"]
        final = recv(ws, "event", lambda m: m["channel"] == "tasks"
                     and m["event"]["state"] == "succeeded")
        assert final["event"]["id"] == "ws-1" and final["id"] > subscribed["last_id"]
        ws.send(json.dumps({"op": "ping"}))
        assert recv(ws, "pong")["last_id"] >= final["id"]
        # resume from the output's id (the latest logged event before it), out of the log
        ws.send(json.dumps({"op": "subscribe", "channels": ["tasks"], "tasks": ["ws-1"],
                            "since": output["id"]}))
        recv(ws, "subscribed")
        replayed = recv(ws, "event")
        assert replayed["event"]["id"] == "ws-1" and replayed["id"] > output["id"]
        assert replayed["event"]["state"] == "succeeded"


def test_ws_nodes_channel_filtered_by_node(s: Stack, tmp_path: Any) -> None:
    from .apikit import FakeFleet
    fleet = FakeFleet(s.mosquitto.url)
    try:
        with connect(ws_url(s, s.viewer)) as ws:
            ws.send(json.dumps({"op": "subscribe", "channels": ["nodes"],
                                "nodes": ["ws-node-2"]}))
            recv(ws, "subscribed")
            fleet.online(["ws-node-1", "ws-node-2"])
            event = recv(ws, "event")
            assert event["channel"] == "nodes" and event["event"]["node"] == "ws-node-2"
            assert event["event"]["state"] == "online"
    finally:
        fleet.close()


def test_ws_bad_messages_get_errors_naming_the_field_and_the_socket_stays(s: Stack) -> None:
    with connect(ws_url(s, s.viewer)) as ws:
        ws.send("not json")
        assert recv(ws, "error")["code"] == "bad_json"
        ws.send(json.dumps({"op": "subscribe", "chanels": ["tasks"]}))
        error = recv(ws, "error")
        assert error["field"] == "chanels" and "`channels`" in error["error"]
        ws.send(json.dumps({"op": "subscribe", "channels": ["bogus"]}))
        assert recv(ws, "error")["field"] == "channel"
        ws.send(json.dumps({"op": "explode"}))
        assert recv(ws, "error")["field"] == "op"
        ws.send(json.dumps({"op": "subscribe", "channels": ["audit"]}))
        assert recv(ws, "error")["code"] == "forbidden"  # a viewer reads no audit
        ws.send(json.dumps({"op": "ping"}))
        recv(ws, "pong")


def test_ws_without_a_valid_token_is_refused_401(s: Stack) -> None:
    for url in (ws_url(s), ws_url(s, "ert_wrong")):
        with pytest.raises(InvalidStatus) as refused, connect(url):
            pass
        assert refused.value.response.status_code == 401


def test_ws_heartbeat(s: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "HEARTBEAT_S", 0.2)
    with connect(ws_url(s, s.viewer)) as ws:
        assert recv(ws, "heartbeat")["last_id"] >= 0
        ws.send(json.dumps({"op": "subscribe", "channels": ["tasks"], "tasks": ["quiet"]}))
        recv(ws, "subscribed")
        assert "last_id" in recv(ws, "heartbeat")


def test_hub_hands_out_committed_events_in_id_order_each_once() -> None:
    """Pure logic of the hub (no I/O): ids are dense and given in commit order, so an id
    that arrives early (another instance's, another thread's) makes the hub read the ones
    before it from the log first; one handed out already is never handed out again."""
    class Log:
        def __init__(self) -> None:
            self.rows = {i: {"kind": "task_event", "id": f"t{i}", "node": "n"}
                         for i in range(7, 10)}
            self.logged: list[tuple[str | None, dict]] = []

        def log_event(self, channel: str | None, event: dict) -> None:
            self.logged.append((channel, event))

        def hold_live(self, event: dict) -> bool:
            return False

        def event_horizon(self) -> tuple[int, int]:
            return 0, 6

        def events_after(self, after: int, limit: int = 1000,
                         through: int | None = None) -> list[tuple[int, dict]]:
            top = through if through is not None else 10**9
            return [(i, e) for i, e in sorted(self.rows.items()) if after < i <= top][:limit]

    log = Log()
    hub = EventHub(log)
    sub = hub.subscribe(kinds=["task_event"])
    hub.deliver(10, {"kind": "task_event", "id": "t10", "node": "n"})
    hub.deliver(8, {"kind": "task_event", "id": "t8", "node": "n"})  # a late copy
    got = []
    while not sub.queue.empty():
        item = sub.queue.get_nowait()
        assert item is not None
        got.append(item[0])
    assert got == [7, 8, 9, 10] and hub.last_id == 10
    # an event published here is logged, and handed out only once its commit says so
    hub.publish({"kind": "task_event", "id": "u", "node": "n"})
    assert log.logged == [("tasks", {"kind": "task_event", "id": "u", "node": "n"})]
    assert sub.queue.empty()
