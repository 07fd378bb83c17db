"""Several `edgerun serve` processes on one PostgreSQL database: start, kill -9, restart.

Each instance is a real process (`python -m edgerun.scheduler serve`), so that a test
can kill it without warning; the first one writes the admin token every instance
then accepts (tokens live in the shared store).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from edgerun.cli.client import Client
from edgerun.control.errors import SchedulerError

from .brokers import ChildProcess, free_port, wait_until
from .mqttkit import ROOT


class ServeProcess(ChildProcess):
    def __init__(self, name: str, broker: str, db: str, workdir: Path, token_file: Path,
                 *args: str) -> None:
        self.name, self.dir = name, workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.token_file = token_file
        self.args = ["serve", "--broker", broker, "--db", db, "--listen",
                     f"127.0.0.1:{self.port}", "--admin-token-file", str(token_file),
                     "--log-level", "info", *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServeProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("EDGERUN_CONFIG", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgerun.scheduler", *self.args],
                                         stdout=log, stderr=log, env=env, cwd=self.dir)
        return self

    def client(self, timeout: float = 60.0) -> Client:
        return Client(self.url, timeout=timeout, token=self.token_file.read_text().strip())

    def healthy(self) -> bool:
        if not self.alive() or not self.token_file.exists():
            return False
        try:
            return bool(self.client(timeout=2).get("/health").get("connected"))
        except (SchedulerError, OSError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> ServeProcess:
        assert wait_until(self.healthy, timeout, 0.1), \
            f"{self.name} never became healthy:\n{self.log()[-3000:]}"
        return self

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class EventReader:
    """An /v1/events stream read on a thread of its own; `events` grows as they come."""

    def __init__(self, client: Client) -> None:
        self.stream = client.events()
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self.stream:
                with self._lock:
                    self.events.append(event)
        except (OSError, AttributeError, ValueError):
            pass  # closed under the reader by close()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def close(self) -> None:
        self.stream.close()
