"""A private RabbitMQ for tests: its own node name, ports and data in a temporary directory.

Tests can kill -9 it and start it again on the same ports and data. When the
rabbitmq-server scripts are missing, it stands for the machine's running
broker (127.0.0.1:5672, guest/guest), which can then not be restarted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pika

from .brokers import free_port, wait_port, wait_until

SCRIPTS = Path("/usr/lib/rabbitmq/bin")


def rabbit_scripts() -> Path | None:
    if (SCRIPTS / "rabbitmq-server").exists():
        return SCRIPTS
    found = shutil.which("rabbitmq-server")
    return Path(found).parent if found and os.access(found, os.X_OK) else None


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Rabbit:
    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        self.scripts = rabbit_scripts()
        self.private = self.scripts is not None
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node = f"edgerun-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port() if self.private else 5672
        self.dist_port = free_port() if self.private else 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_conf = extra_conf

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.dir), "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins")}

    def start(self) -> Rabbit:
        if not self.private:
            wait_port(self.port)
            return self
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text("loopback_users = none\n" + self.extra_conf)
        assert self.scripts is not None
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen([str(self.scripts / "rabbitmq-server")], env=self.env(),
                                         stdout=log, stderr=log, start_new_session=True,
                                         cwd=self.dir)  # a crashing node dumps MnesiaCore.* here
        # each rabbitmqctl call boots an Erlang VM (a second or two under load), and fails
        # until the node has registered with epmd: wait for the AMQP listener, which opens
        # near the end of the boot, then ask the node itself
        if not (wait_until(self._listening, timeout=90, interval=0.1)
                and wait_until(self._started, timeout=60, interval=0.5)):
            tail = (self.dir / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"rabbitmq did not start:\n{tail}")
        wait_port(self.port, timeout=30)
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"rabbitmq exited with {self.proc.returncode}")
        return port_open(self.port)

    def _started(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"rabbitmq exited with {self.proc.returncode}")
        try:
            self.ctl("await_startup", "--timeout", "60")
            return True
        except RuntimeError:
            return False

    def ctl(self, *args: str) -> str:
        assert self.scripts is not None
        done = subprocess.run([str(self.scripts / "rabbitmqctl"), "-n", self.node, "-q", *args],
                              env=self.env(), capture_output=True, text=True, timeout=90,
                              cwd=self.dir)
        if done.returncode:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    def _require_private(self) -> None:
        if not self.private:
            import pytest
            pytest.skip("rabbitmq-server missing: the shared broker cannot be restarted")

    def kill(self) -> None:
        """kill -9 the whole node (the start script and the Erlang VM under it)."""
        self._require_private()
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            assert wait_until(lambda: not port_open(self.port), 30), "rabbitmq did not die"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.ctl("shutdown")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def queues(self) -> list[str]:
        """Names of every queue of the default vhost."""
        if self.private:
            return sorted(line.split("\t")[0] for line in self.ctl("list_queues", "name",
                                                                    "--no-table-headers")
                          .splitlines() if line.strip())
        raise RuntimeError("queue listing needs the private broker")

    def connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.url))
