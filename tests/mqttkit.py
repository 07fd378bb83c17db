"""What agent tests need around a broker: a real agent process and an observer.

The observer is a real MQTT client (edgerun.mqtt) that plays the scheduler's
part: it publishes tasks and collects every update, output and status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, ClassVar

from edgerun.mqtt import Inbound, MqttConnection
from edgerun.protocol import Topics
from edgerun.settings import parse_broker_urls

from .brokers import ChildProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent


class Observer:
    def __init__(self, url: str, prefix: str = "edgerun", client_id: str | None = None) -> None:
        self.topics = Topics(prefix)
        self.messages: list[tuple[str, dict[str, Any] | bytes]] = []
        self._cond = threading.Condition()
        self.conn = MqttConnection(
            parse_broker_urls(url, ("mqtt", "mqtts")),
            client_id or f"observer-{uuid.uuid4().hex[:8]}", on_message=self._on_message,
            subscriptions=[(f"{prefix}/nodes/+/{c}", 1) for c in ("updates", "output", "status")],
            clean_session=False, name="observer", backoff_cap=1.0)

    def __enter__(self) -> Observer:
        self.conn.start()
        assert self.conn.connected.wait(10), "observer could not connect"
        return self

    def __exit__(self, *_exc: object) -> None:
        self.conn.stop()

    def _on_message(self, msg: Inbound) -> None:
        try:
            body: dict[str, Any] | bytes = json.loads(msg.payload)
        except ValueError:
            body = msg.payload
        with self._cond:
            self.messages.append((msg.topic, body))
            self._cond.notify_all()

    def send(self, node: str, message: dict[str, Any] | bytes | str) -> None:
        if isinstance(message, dict):
            payload = json.dumps(message).encode()
        else:
            payload = message.encode() if isinstance(message, str) else message
        self.conn.publish(self.topics.tasks(node), payload, 1)

    def of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            bodies = [b for _, b in self.messages if isinstance(b, dict)]
        return [b for b in bodies if b.get("kind") == kind
                and all(b.get(k) == v for k, v in match.items())]

    def updates(self, task_id: str | None) -> list[dict[str, Any]]:
        return self.of("update", id=task_id)

    def states(self, task_id: str) -> list[str]:
        return [u["state"] for u in self.updates(task_id)]

    def wait(self, kind: str, timeout: float = 15.0, count: int = 1,
             **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.of(kind, **match)) >= count, timeout)
        found = self.of(kind, **match)
        assert len(found) >= count, f"wanted {count} {kind} {match}, got {found[-5:]}"
        return found

    def final(self, task_id: str | None, timeout: float = 15.0) -> dict[str, Any]:
        finals = ("succeeded", "failed", "timed_out", "canceled", "rejected")
        with self._cond:
            self._cond.wait_for(lambda: any(u["state"] in finals for u in self.updates(task_id)),
                                timeout)
        ups = [u for u in self.updates(task_id) if u["state"] in finals]
        assert ups, f"no final update for {task_id}: {self.updates(task_id)}"
        return ups[-1]


def shell(task_id: str, command: str | list[str], **extra: Any) -> dict[str, Any]:
    return {"v": 1, "kind": "task", "id": task_id, "type": "shell", "command": command, **extra}


class AgentProcess(ChildProcess):
    """`python -m edgerun.agent` as a real process with its own state directory and log.

    Every instance is remembered in `CREATED`, so that a test that fails before its
    own clean-up still leaves no agent behind (see `reap_agents` in conftest.py)."""

    CREATED: ClassVar[list[AgentProcess]] = []

    def __init__(self, url: str, node: str, workdir: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        AgentProcess.CREATED.append(self)
        self.url, self.node, self.dir = url, node, workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args, self.env = list(args), env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "agent.log"

    def start(self) -> AgentProcess:
        cmd = [sys.executable, "-m", "edgerun.agent", "--broker", self.url, "--node", self.node,
               "--state-dir", str(self.dir / "state"), "--log-level", "debug", *self.args]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=self.dir)
        return self

    def wait_online(self, observer: Observer, timeout: float = 15.0) -> dict[str, Any]:
        ok = wait_until(lambda: any(s.get("state") == "online" and s.get("node") == self.node
                                    for s in observer.of("status")), timeout)
        assert ok, f"agent {self.node} never came online; log:\n{self.log()[-3000:]}"
        return [s for s in observer.of("status", node=self.node) if s["state"] == "online"][-1]
