"""Real brokers for tests: private instances on free ports in a temporary directory.

Tests can kill -9 and restart them. When the binary is missing, a fixture falls
back to the machine's running broker (which can then not be restarted).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
user {user}
allow_anonymous {anonymous}
set_tcp_nodelay true
persistence true
persistence_location {dir}/
autosave_interval 1
max_queued_messages 0
max_inflight_messages 0
{extra}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(predicate())  # type: ignore[operator]


class ChildProcess:
    """A process a test starts (agent, bridge) with its log file: stop, kill, read."""

    proc: subprocess.Popen[bytes] | None
    log_path: Path

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None)


class Mosquitto:
    """A private Mosquitto. `extra` is appended to its config (ACLs, TLS listeners)."""

    def __init__(self, workdir: Path, extra: str = "", anonymous: bool = True) -> None:
        self.binary = mosquitto_binary()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.private = self.binary is not None
        self.port = free_port() if self.private else 1883
        self.extra, self.anonymous = extra, anonymous
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        if not self.private:
            wait_port(self.port)
            return self
        conf = self.dir / "mosquitto.conf"
        conf.write_text(MOSQUITTO_CONF.format(port=self.port, dir=self.dir, extra=self.extra,
                                              user=pwd.getpwuid(os.getuid()).pw_name,
                                              anonymous=str(self.anonymous).lower()))
        log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115 - the process keeps it
        assert self.binary is not None
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        try:
            wait_port(self.port)
        except TimeoutError:
            tail = (self.dir / "mosquitto.log").read_text(errors="replace")[-1000:]
            raise RuntimeError(f"mosquitto did not start:\n{tail}") from None
        return self

    def _require_private(self) -> None:
        if not self.private:
            import pytest
            pytest.skip("mosquitto binary missing: the shared broker cannot be restarted")

    def checkpoint(self, timeout: float = 10.0) -> None:
        """Have Mosquitto write its persistence file now (SIGUSR1), so a kill -9 right
        after keeps the sessions and subscriptions that exist at this moment."""
        self._require_private()
        db = self.dir / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        if not wait_until(lambda: db.exists() and db.stat().st_mtime_ns != before, timeout):
            raise TimeoutError("mosquitto did not save its persistence file")

    def kill(self) -> None:
        """kill -9: no goodbye, no final save of the persistence file."""
        self._require_private()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()
