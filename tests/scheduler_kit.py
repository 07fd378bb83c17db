"""What scheduler tests share: a real service on a real broker, the real CLI, real agents.

The service runs in-process (edgerun.scheduler.app.App: messenger, store, tracker, HTTP
API) against a private Mosquitto, RabbitMQ or the embedded amqtt broker; the
`edgerun` command runs as a real process against its API.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgerun.cli.client import Client
from edgerun.control.errors import NotFound
from edgerun.scheduler.app import App
from edgerun.scheduler.settings import ServeSettings

from .brokers import wait_until
from .mqttkit import ROOT, AgentProcess

FINAL = {"succeeded", "failed", "timed_out", "canceled", "rejected", "lost"}


def serve_values(broker: str | None, tmp: Path, **over: Any) -> ServeSettings:
    """Settings of a test service: a fresh store, queue and client id; `over` replaces any."""
    return replace(ServeSettings(
        broker=broker, db=str(tmp / f"sched-{uuid.uuid4().hex[:6]}.db"),
        listen="127.0.0.1:0", grace=1.0, tick=0.2,
        queue=f"edgerun.scheduler.{uuid.uuid4().hex[:8]}",
        client_id=f"sched-{uuid.uuid4().hex[:8]}"), **over)


@contextmanager
def running_app(broker: str | None, tmp: Path, **over: Any) -> Iterator[App]:
    app = App(serve_values(broker, tmp, **over)).start()
    try:
        yield app
    finally:
        app.stop()


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(api: str, *args: str, timeout: float = 90.0,
        env: dict[str, str | None] | None = None) -> Result:
    """`edgerun ARGS` as a real process (python -m edgerun.scheduler), against `api`.
    `env` adds variables; a None value removes one."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERUN_API": api}
    full_env.pop("EDGERUN_CONFIG", None)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    proc = subprocess.run([sys.executable, "-m", "edgerun.scheduler", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=ROOT, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def cli_json(api: str, *args: str) -> Any:
    result = cli(api, args[0], "--json", *args[1:])  # before any `--`
    assert result.code == 0, result
    return json.loads(result.out)


class Api(Client):
    """The real HTTP client, plus waiting helpers for assertions."""

    def task(self, task_id: str, node: str) -> dict[str, Any]:
        """The task with its updates; {"state": None} while the service has not seen it."""
        try:
            tasks: list[dict[str, Any]] = self.get(f"/tasks/{task_id}", node=node)["tasks"]
        except NotFound:
            return {"state": None}
        return tasks[0]

    def wait_state(self, task_id: str, node: str, states: set[str] | str,
                   timeout: float = 30.0) -> dict[str, Any]:
        wanted = {states} if isinstance(states, str) else states
        ok = wait_until(lambda: self.task(task_id, node)["state"] in wanted, timeout, 0.05)
        task = self.task(task_id, node)
        assert ok, f"task {task_id} on {node} is {task['state']}, wanted {wanted}: {task}"
        return task

    def wait_node(self, node: str, state: str = "online", timeout: float = 30.0) -> None:
        def seen() -> bool:
            return any(n["node"] == node and n["state"] == state
                       for n in self.get("/nodes")["nodes"])
        assert wait_until(seen, timeout, 0.05), f"node {node} never became {state}"

    def dispatch(self, targets: list[str], task: dict[str, Any], online: bool = False,
                 ) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = self.post(
            "/tasks", {"targets": targets, "online": online, "task": task})["tasks"]
        return tasks


def start_agent(broker: str, node: str, tmp: Path, *args: str) -> AgentProcess:
    return AgentProcess(broker, node, tmp / f"agent-{node}", *args).start()


@contextmanager
def file_server(directory: Path) -> Iterator[str]:
    """A local HTTP server for download tasks; yields its base URL."""
    handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,),
                   {"log_message": lambda *_a: None})

    def make(*a: Any, **kw: Any) -> Any:
        return handler(*a, directory=str(directory), **kw)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
