"""Idempotency-Key on the API's POSTs (issue 23), against live services: a retry gets the
first answer and creates nothing, another body with the same key is 409 naming the key,
a double-click creates one task, keys survive a restart (they are in the store) and are
kept over 24 h; the CLI sends a key and retries a POST whose answer was lost."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerun.scheduler.store.idempotency import KEEP_S, Idempotency
from edgerun.scheduler.store.tasks import Store

from .apikit import FakeFleet, Stack, call, stack, wait_for
from .brokers import free_port
from .pg import pg_database, pg_url  # noqa: F401
from .scheduler_kit import cli, running_app


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("idem"), node="idem-a") as st:
        yield st


def dispatch(s: Stack, key: str | None, command: str = "true", **more: Any) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return s.http("POST", "/v1/tasks", s.operator,
                  {"targets": [s.node], "task": {"type": "shell", "command": command, **more}},
                  headers=headers)


def count(s: Stack, command: str) -> int:
    tasks = s.http("GET", "/v1/tasks?limit=1000", s.viewer).body["tasks"]
    return sum(1 for t in tasks if command in str(t))


def test_a_retry_with_the_same_key_gets_the_first_answer(s: Stack) -> None:
    key, command = str(uuid.uuid4()), f"echo {uuid.uuid4().hex}"
    first = dispatch(s, key, command)
    again = dispatch(s, key, command)
    assert first.status == again.status == 201
    assert again.body == first.body and again.headers.get("idempotent-replayed") == "true"
    assert count(s, command) == 1
    # without a key the same body is a new task
    assert dispatch(s, None, command).status == 201
    assert count(s, command) == 2


def test_the_same_key_with_another_body_is_409_naming_it(s: Stack) -> None:
    key = str(uuid.uuid4())
    assert dispatch(s, key, "echo one").status == 201
    other = dispatch(s, key, "echo two")
    assert other.status == 409 and other.body["code"] == "idempotency_key_reused"
    assert key in other.body["error"] and other.body["key"] == key
    # another route with the key is another request too
    job = s.http("POST", "/v1/jobs", s.operator, {"targets": [s.node], "steps": [
        {"type": "shell", "command": "echo one"}]}, headers={"Idempotency-Key": key})
    assert job.status == 409


def test_a_refused_request_does_not_use_up_its_key(s: Stack) -> None:
    key = str(uuid.uuid4())
    bad = s.http("POST", "/v1/tasks", s.operator, {"targets": [s.node], "task": {
        "type": "shell", "comand": "true"}}, headers={"Idempotency-Key": key})
    assert bad.status == 422
    assert dispatch(s, key, "echo fixed").status == 201


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "a\tb"])
def test_a_bad_key_is_422(s: Stack, key: str) -> None:
    reply = s.http("POST", "/v1/tasks", s.operator, {"targets": [s.node], "task": {
        "type": "shell", "command": "true"}},
        headers={"Idempotency-Key": key.encode("utf-8").decode("latin-1")})
    assert reply.status == 422 and reply.body["field"] == "Idempotency-Key"


def test_a_double_click_creates_one_task(s: Stack) -> None:
    key, command = str(uuid.uuid4()), f"echo {uuid.uuid4().hex}"
    replies: list[Any] = []
    start = threading.Barrier(8)

    def click() -> None:
        start.wait()
        replies.append(dispatch(s, key, command))
    threads = [threading.Thread(target=click) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status for r in replies] == [201] * 8
    assert len({str(r.body) for r in replies}) == 1
    assert count(s, command) == 1


def test_keys_outlive_a_restart_and_serve_every_instance(tmp_path: Path) -> None:
    from .brokers import Mosquitto
    mosquitto = Mosquitto(tmp_path / "mosquitto").start()
    db = str(tmp_path / "shared.db")
    body = {"targets": ["idem-node"], "task": {"type": "shell", "command": "echo restart"}}
    key = str(uuid.uuid4())
    fleet = FakeFleet(mosquitto.url)
    try:
        with running_app(mosquitto.url, tmp_path, db=db) as app:
            assert app.api is not None and app.admin_token is not None
            token = app.admin_token
            fleet.online(["idem-node"])
            wait_for(lambda: call(app.api.port, "GET", "/v1/nodes", token).body["total"] == 1)
            first = call(app.api.port, "POST", "/v1/tasks", token, body,
                         headers={"Idempotency-Key": key})
            assert first.status == 201
        with running_app(mosquitto.url, tmp_path, db=db) as app:
            assert app.api is not None
            again = call(app.api.port, "POST", "/v1/tasks", token, body,
                         headers={"Idempotency-Key": key})
            assert again.status == 201 and again.body == first.body
            tasks = call(app.api.port, "GET", "/v1/tasks", token).body["tasks"]
            assert len(tasks) == 1
    finally:
        fleet.close()
        mosquitto.stop()


def test_keys_are_kept_over_24_hours_and_pruned_after_48(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "keys.db"))
    try:
        keys = Idempotency(store.db)
        assert keys.begin("ops", "day-old", "print") is None
        keys.finish("ops", "day-old", 201, '{"ok": true}')
        assert keys.begin("ops", "old", "print") is None
        keys.finish("ops", "old", 201, '{"old": true}')
        now = time.time()
        with store.db.write() as db:
            db.execute("UPDATE idempotency SET created_at=? WHERE key='day-old'",
                       (now - 25 * 3600,))
            db.execute("UPDATE idempotency SET created_at=? WHERE key='old'",
                       (now - KEEP_S - 60,))
        keys.prune(time.time(), force=True)
        kept = keys.begin("ops", "day-old", "print")
        assert kept is not None and kept.status == 201 and kept.body == '{"ok": true}'
        assert keys.begin("ops", "old", "print") is None  # gone: a new request
        assert keys.begin("viewer", "day-old", "print") is None  # keys are per token
    finally:
        store.close()


class LoseFirstAnswer:
    """A proxy in front of the API that forwards the first request and drops its
    answer (the client sees the connection close), then passes the rest through."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.lost = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(client,), daemon=True).start()

    def _one(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))
        lose = self.lost == 0
        request = client.recv(65536)
        if lose and not request.startswith(b"POST"):
            lose = False
        if lose:
            self.lost += 1
            while b"\r\n\r\n" not in request:
                request += client.recv(65536)
        upstream.sendall(request)

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        if lose:
            upstream.recv(65536)  # the service answered; the client never hears it
            client.close()
            upstream.close()
            return
        threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
        pipe(upstream, client)

    def close(self) -> None:
        self.listener.close()


def test_the_cli_retries_a_lost_answer_with_its_key_and_runs_once(s: Stack) -> None:
    proxy = LoseFirstAnswer(s.port)
    marker = uuid.uuid4().hex
    try:
        result = cli(f"http://127.0.0.1:{proxy.port}", "run", s.node, "--detach", "--",
                     f"echo {marker}", env={"EDGERUN_TOKEN": s.operator})
    finally:
        proxy.close()
    assert proxy.lost == 1
    assert result.code == 0, result.err
    assert count(s, marker) == 1


def test_two_instances_on_one_postgresql_share_the_keys(tmp_path: Path,
                                                        pg_url: str) -> None:  # noqa: F811
    from .brokers import Mosquitto
    mosquitto = Mosquitto(tmp_path / "mosquitto").start()
    fleet = FakeFleet(mosquitto.url)
    body = {"targets": ["pg-node"], "task": {"type": "shell", "command": "echo twice?"}}
    try:
        with running_app(mosquitto.url, tmp_path / "a", db=pg_url, share_group="idem") as a, \
                running_app(mosquitto.url, tmp_path / "b", db=pg_url, share_group="idem") as b:
            assert a.api is not None and b.api is not None and a.admin_token is not None
            token, ports = a.admin_token, [a.api.port, b.api.port]
            fleet.online(["pg-node"])
            for port in ports:
                wait_for(lambda p=port: call(p, "GET", "/v1/nodes", token).body["total"] == 1)
            key = str(uuid.uuid4())
            first = call(ports[0], "POST", "/v1/tasks", token, body,
                         headers={"Idempotency-Key": key})
            again = call(ports[1], "POST", "/v1/tasks", token, body,
                         headers={"Idempotency-Key": key})
            assert first.status == again.status == 201 and again.body == first.body
            other = call(ports[1], "POST", "/v1/tasks", token, {**body, "online": True},
                         headers={"Idempotency-Key": key})
            assert other.status == 409 and key in other.body["error"]
            # a double-click that lands on both instances at once
            clicked, replies = str(uuid.uuid4()), list[Any]()
            start = threading.Barrier(6)

            def click(port: int) -> None:
                start.wait()
                replies.append(call(port, "POST", "/v1/tasks", token, body,
                                    headers={"Idempotency-Key": clicked}))
            threads = [threading.Thread(target=click, args=(ports[i % 2],)) for i in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert [r.status for r in replies] == [201] * 6
            assert len({str(r.body) for r in replies}) == 1
            tasks = call(ports[0], "GET", "/v1/tasks", token).body["tasks"]
            assert len(tasks) == 2  # the first key's task and the double-click's
    finally:
        fleet.close()
        mosquitto.stop()


def test_a_new_tokens_answer_is_never_kept(s: Stack, tmp_path: Path) -> None:
    key = str(uuid.uuid4())
    made = s.http("POST", "/v1/tokens", s.admin, {"name": "idem-secret", "role": "viewer"},
                  headers={"Idempotency-Key": key})
    assert made.status == 201
    again = s.http("POST", "/v1/tokens", s.admin, {"name": "idem-secret", "role": "viewer"},
                   headers={"Idempotency-Key": key})
    assert again.status == 409 and "token" not in again.body  # no replay of the secret
    db = sqlite3.connect(s.app.settings.db)
    try:
        kept = db.execute("SELECT response FROM idempotency").fetchall()
    finally:
        db.close()
    assert not any(made.body["token"] in (row[0] or "") for row in kept)
