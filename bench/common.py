"""What every benchmark item shares: brokers, process sizes, the machine, medians."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.brokers import Mosquitto, free_port  # noqa: E402
from tests.rabbit import Rabbit  # noqa: E402

# A bridge's broker gives it (and every subscriber) a real in-flight window, and
# holds 10,000+ connections.
MOSQUITTO_EXTRA = "max_inflight_messages 1000\nmax_connections -1\n"


def mosquitto(workdir: Path) -> Mosquitto:
    return Mosquitto(workdir, extra=MOSQUITTO_EXTRA).start()


class PluginRabbit(Rabbit):
    """A private RabbitMQ node with `rabbitmq_mqtt` on a free port of 127.0.0.1."""

    def __init__(self, workdir: Path, exchange: str = "amq.topic") -> None:
        super().__init__(workdir)
        self.mqtt_port = free_port()
        self.exchange = exchange

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def start(self) -> PluginRabbit:
        assert self.scripts is not None, "rabbitmq-server is not installed"
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.dir / "rabbitmq.conf").write_text(
            "loopback_users = none\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\n"
            f"mqtt.exchange = {self.exchange}\n"
            "mqtt.prefetch = 1000\n"
            "mqtt.tcp_listen_options.nodelay = true\n"
            "mqtt.tcp_listen_options.backlog = 4096\n"
            "tcp_listen_options.nodelay = true\n")
        # Rabbit.start rewrites both files: start the node here instead.
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen([str(self.scripts / "rabbitmq-server")], env=self.env(),
                                         stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                self.ctl("await_startup", "--timeout", "60")
                break
            except RuntimeError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    tail = (self.dir / "server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"rabbitmq did not start:\n{tail}") from None
                time.sleep(0.5)
        from tests.brokers import wait_port
        wait_port(self.port, timeout=30)
        wait_port(self.mqtt_port, timeout=30)
        return self

    def erlang_memory_mib(self) -> float:
        out = self.ctl("eval", "erlang:memory(total).").strip().rstrip(".")
        return int(out) / 2**20

    def fd_limit(self) -> int | None:
        out = self.ctl("eval", "file_handle_cache:ulimit().").strip().rstrip(".")
        try:
            return int(out)
        except ValueError:
            return None

    def queue_count(self) -> int:
        return len(self.queues())


# --- process sizes -------------------------------------------------------------------
def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _stat_ticks(pid: int, first: int) -> float:
    """Seconds of two adjacent CPU-time fields of /proc/PID/stat (counted after the
    command name); 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    return _stat_ticks(pid, 11)


def children_cpu_s(pid: int) -> float:
    """CPU seconds of the children a process has waited for (an agent's commands: fork,
    exec and exit)."""
    return _stat_ticks(pid, 13)


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += rss_mib(current)
        todo.extend(children.get(current, []))
    return total


# --- numbers -------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


# --- the machine and versions -----------------------------------------------------
def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    import resource
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "os": platform.platform(),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def _run(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        return (done.stdout + done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import edgerun
    from tests.brokers import mosquitto_binary
    from tests.rabbit import rabbit_scripts
    out = {"python": platform.python_version(), "edgerun": edgerun.__version__}
    for dist in ("paho-mqtt", "pika", "amqtt"):
        try:
            out[dist] = version(dist)
        except Exception:
            out[dist] = "?"
    binary = mosquitto_binary()
    if binary:
        first = _run([binary, "-h"]).splitlines()
        out["mosquitto"] = first[0].replace("mosquitto version ", "") if first else "?"
    scripts = rabbit_scripts()
    if scripts:
        lib = sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*"))
        out["rabbitmq"] = lib[-1].name.split("-", 1)[1] if lib else "?"
    return out
