"""Probes for a load balancer or Kubernetes (issue 23): /healthz and /readyz need no token
and carry no data; /readyz says 503 while the broker is away. Old unversioned paths
answer 404 with a hint naming /v1."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from edgerun.scheduler.api import handlers

from .apikit import call, stack, wait_for


def test_probes_need_no_token_carry_no_data_and_follow_the_broker(tmp_path: Path) -> None:
    with stack(tmp_path, node="probe-a") as s:
        live = call(s.port, "GET", "/healthz")
        assert live.status == 200 and live.body == {"status": "ok"}
        ready = call(s.port, "GET", "/readyz")
        assert ready.status == 200
        assert ready.body == {"status": "ready", "store": True, "broker": True}
        assert s.node not in ready.raw.decode() and "mqtt" not in ready.raw.decode()
        s.mosquitto.stop()
        wait_for(lambda: call(s.port, "GET", "/readyz").status == 503)
        down = call(s.port, "GET", "/readyz").body
        assert down == {"status": "not_ready", "store": True, "broker": False}
        assert call(s.port, "GET", "/healthz").status == 200
        s.mosquitto.start()
        wait_for(lambda: call(s.port, "GET", "/readyz").status == 200, timeout=60)


def test_old_unversioned_paths_get_404_naming_v1(tmp_path: Path) -> None:
    with stack(tmp_path, node="probe-b") as s:
        for path in ("/health", "/nodes", "/tasks/abc", "/api/nodes"):
            reply = call(s.port, "GET", path, s.viewer)
            assert reply.status == 404 and reply.body["code"] == "not_found", path
            assert f"/v1{path}" in reply.body["error"], reply.body
        inside = call(s.port, "GET", "/v1/nope", s.viewer)
        assert inside.status == 404 and "versioned" not in inside.body["error"]


def test_a_dispatch_during_a_broker_failover_is_held_not_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with stack(tmp_path, node="probe-c") as s:
        task = {"targets": [s.node], "task": {"type": "shell", "command": "true"}}
        s.mosquitto.stop()
        wait_for(lambda: call(s.port, "GET", "/readyz").body["broker"] is False)
        monkeypatch.setattr(handlers, "BROKER_HOLD_S", 0.3)
        refused = call(s.port, "POST", "/v1/tasks", s.operator, task)
        assert refused.status == 503 and refused.body["code"] == "broker_unreachable"
        monkeypatch.setattr(handlers, "BROKER_HOLD_S", 60.0)
        replies: list[Any] = []
        held = threading.Thread(target=lambda: replies.append(
            call(s.port, "POST", "/v1/tasks", s.operator, task)))
        held.start()  # sent while the broker is away; answered once it is back
        s.mosquitto.start()
        held.join(90)
        assert replies and replies[0].status == 201, replies
