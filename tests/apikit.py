"""What the API and console tests share: a real service on a private Mosquitto with a
real agent, tokens of each role, a raw HTTP helper, and simulated nodes (retained
status messages, as an agent publishes them) for large fleets."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgerun.protocol import format_time
from edgerun.scheduler.app import App

from .brokers import Mosquitto, wait_until
from .mqttkit import AgentProcess
from .scheduler_kit import Api, serve_values, start_agent


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any
    raw: bytes


@dataclass
class Stack:
    mosquitto: Mosquitto
    app: App
    agent: AgentProcess
    admin: str
    operator: str
    viewer: str
    node: str

    @property
    def port(self) -> int:
        assert self.app.api is not None
        return self.app.api.port

    @property
    def url(self) -> str:
        return self.app.api_url

    def api(self, token: str | None = None) -> Api:
        api = Api(self.url, token=token or self.admin)
        return api

    def http(self, method: str, path: str, token: str | None = None, body: Any = None,
             raw: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
        return call(self.port, method, path, token, body, raw, headers)


def call(port: int, method: str, path: str, token: str | None = None, body: Any = None,
         raw: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        sent = dict(headers or {})
        if token:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (json.dumps(body).encode()
                                            if body is not None else None)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        content = response.read()
    finally:
        conn.close()
    try:
        parsed = json.loads(content)
    except ValueError:
        parsed = None
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, parsed,
                 content)


@contextmanager
def stack(tmp: Path, node: str = "api-a", **over: Any) -> Iterator[Stack]:
    mosquitto = Mosquitto(tmp / "mosquitto").start()
    app = App(serve_values(mosquitto.url, tmp, **over)).start()
    agent = start_agent(mosquitto.url, node, tmp)
    try:
        assert app.admin_token is not None
        admin = app.admin_token
        api = Api(app.api_url, token=admin)
        api.wait_node(node)
        operator = api.post("/tokens", {"name": "ops", "role": "operator"})["token"]
        viewer = api.post("/tokens", {"name": "eyes", "role": "viewer"})["token"]
        yield Stack(mosquitto, app, agent, admin, operator, viewer, node)
    finally:
        agent.kill()
        app.stop()
        mosquitto.stop()


class FakeFleet:
    """Many simulated nodes: their retained `status` online (with facts), as agents send
    it, from one MQTT client. They take no tasks; the test answers for them with
    `update`s on their topics, as an agent would."""

    def __init__(self, url: str, prefix: str = "edgerun") -> None:
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.prefix = prefix
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-fleet")
        self.client.connect(host, int(port))
        self.client.loop_start()

    def online(self, nodes: list[str], **facts: Any) -> None:
        infos = []
        for node in nodes:
            body = {"v": 1, "kind": "status", "node": node, "state": "online",
                    "at": format_time(), "agent": "fake", "running": [],
                    "facts": {"hostname": node, "arch": "x86_64", "cpus": 4, **facts}}
            infos.append(self.client.publish(f"{self.prefix}/nodes/{node}/status",
                                             json.dumps(body), qos=1, retain=True))
        for info in infos:
            info.wait_for_publish(30)

    def finish(self, node: str, task_id: str, state: str = "succeeded",
               exit_code: int = 0) -> None:
        for step in ("accepted", "running", state):
            body: dict[str, Any] = {"v": 1, "kind": "update", "id": task_id, "node": node,
                                    "state": step, "at": format_time()}
            if step == state:
                body.update(exit_code=exit_code, stdout=f"{node} ok\n", stderr="",
                            truncated=False, duration_s=0.01)
                if state != "succeeded":
                    body["error"] = {"code": "exit_status", "message": "exited 1"}
            self.client.publish(f"{self.prefix}/nodes/{node}/updates", json.dumps(body),
                                qos=1).wait_for_publish(30)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    assert wait_until(predicate, timeout, 0.05), "condition never came true"
