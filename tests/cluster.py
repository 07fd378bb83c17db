"""Private broker clusters for tests: 3-node NATS (JetStream + MQTT) and 3-node RabbitMQ.

Every node runs on free ports with its data in a temporary directory, from the
reference configurations in deploy/nats/ and deploy/rabbitmq/ (templated with the
ports and node names), so the tests prove the files we ship. Tests kill -9 nodes
and start them again on the same ports and data.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from edgerun.mqtt import MqttConnection
from edgerun.settings import parse_broker_url

from .brokers import free_port, wait_port, wait_until
from .mqttkit import ROOT
from .rabbit import Rabbit, port_open, rabbit_scripts

DEPLOY = ROOT / "deploy"


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc; epmd, which the
    first Erlang node starts for every node of the machine, is not among them: it
    detaches)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        todo.extend(children.get(current, []))
    return total


# --- NATS ----------------------------------------------------------------------------------

def nats_binary() -> str | None:
    return shutil.which("nats-server")


class NatsNode:
    def __init__(self, workdir: Path, name: str) -> None:
        self.dir, self.name = workdir, name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.client_port, self.cluster_port = free_port(), free_port()
        self.mqtt_port, self.monitor_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.routes = ""

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "EDGERUN_NATS_NAME": self.name,
                "EDGERUN_NATS_LISTEN": f"127.0.0.1:{self.client_port}",
                "EDGERUN_NATS_MONITOR": f"127.0.0.1:{self.monitor_port}",
                "EDGERUN_NATS_STORE": str(self.dir / "store"),
                "EDGERUN_NATS_CLUSTER": f"127.0.0.1:{self.cluster_port}",
                "EDGERUN_NATS_ROUTES": self.routes,
                "EDGERUN_NATS_MQTT": f"127.0.0.1:{self.mqtt_port}"}

    def start(self, conf: Path | None = None) -> NatsNode:
        """Run deploy/nats/nats.conf (or `conf`) with this node's values."""
        binary = nats_binary()
        assert binary is not None
        conf = conf or DEPLOY / "nats" / "nats.conf"
        with open(self.dir / "nats.log", "ab") as log:
            self.proc = subprocess.Popen([binary, "-c", str(conf)],
                                         env=self.env(), stdout=log, stderr=log)
        wait_port(self.mqtt_port, timeout=30)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        assert wait_until(lambda: not port_open(self.mqtt_port), 10)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def healthy(self) -> bool:
        """JetStream is up here and current with the cluster (the server's /healthz)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz",
                                        timeout=2) as reply:
                return bool(json.load(reply).get("status") == "ok")
        except (OSError, ValueError):
            return False

    def rss(self) -> int:
        return tree_rss(self.proc.pid) if self.alive() and self.proc else 0

    def log(self) -> str:
        return (self.dir / "nats.log").read_text(errors="replace")


def mqtt_probe(url: str, timeout: float = 10.0) -> bool:
    """Connect to one node and have a QoS 1 publish acknowledged."""
    done = threading.Event()
    conn = MqttConnection(parse_broker_url(url, ("mqtt",)), f"probe-{uuid.uuid4().hex[:8]}",
                          clean_session=True, name="probe")
    conn.start()
    try:
        if not conn.connected.wait(timeout):
            return False
        conn.publish("edgerun-probe/x", b"probe", 1, on_done=done.set)
        return done.wait(timeout)
    finally:
        conn.stop()


class NatsCluster:
    """Three nodes, routes between all of them, JetStream R3 behind MQTT."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = [NatsNode(workdir / f"nats-{i}", f"nats-{i}") for i in range(1, size + 1)]
        routes = ", ".join(f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes)
        for node in self.nodes:
            node.routes = f"[{routes}]"

    def start(self, timeout: float = 60.0) -> NatsCluster:
        for node in self.nodes:
            node.start()
        self.wait_healthy(timeout)
        self.wait_usable(timeout)
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        live = [n for n in self.nodes if n.alive()]
        if not wait_until(lambda: all(n.healthy() for n in live), timeout, 0.2):
            raise RuntimeError("the NATS cluster never became healthy:\n" +
                               "\n".join(n.log()[-1500:] for n in live))

    def wait_usable(self, timeout: float = 90.0) -> None:
        """Every live node takes an MQTT connection and a QoS 1 publish: after a node
        returns, /healthz may stay unhappy about its own consumers for a long time while
        MQTT already works, so this is what the tests wait for."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.alive() and not wait_until(lambda n=node: mqtt_probe(n.url),
                                               max(1.0, deadline - time.monotonic()), 0.5):
                raise RuntimeError(f"{node.name} takes no MQTT publish:\n{node.log()[-1500:]}")

    def urls(self, first: int = 0) -> str:
        """Every node's MQTT URL, comma-separated, starting with node `first`."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(n.url for n in order)

    def node_of_port(self, port: int) -> NatsNode:
        return next(n for n in self.nodes if n.mqtt_port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def rss(self) -> int:
        return sum(n.rss() for n in self.nodes)


# --- RabbitMQ ------------------------------------------------------------------------------

CLUSTER_NODE_LINE = re.compile(r"^cluster_formation\.classic_config\.nodes\.(\d+) = .*$", re.M)


def rabbit_conf(nodes: list[str]) -> str:
    """deploy/rabbitmq/rabbitmq.conf with the tests' node names in the peer list."""
    text = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    names = iter(nodes)
    out = CLUSTER_NODE_LINE.sub(lambda m: f"cluster_formation.classic_config.nodes."
                                          f"{m.group(1)} = {next(names)}", text)
    return out


class RabbitNode(Rabbit):
    def __init__(self, workdir: Path, node: str, cookie: str) -> None:
        super().__init__(workdir)
        self.node, self.cookie = node, cookie
        self.conf = ""

    def start(self) -> RabbitNode:
        # the nodes and their CLI share one Erlang cookie through HOME/.erlang.cookie
        cookie = self.dir / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        self.extra_conf = self.conf
        for attempt in range(3):
            seen = self._log_size()
            try:
                super().start()
                return self
            except RuntimeError:
                # started again on its old ports, the node may find one taken: while it was
                # down, another process of this busy machine got it (an outgoing
                # connection's ephemeral port, another test's listener). The same node with
                # the same data on new ports is still the node restarted.
                if attempt == 2 or "eaddrinuse" not in self._log_since(seen):
                    raise
                self.port, self.dist_port = free_port(), free_port()
        return self

    def _log_size(self) -> int:
        try:
            return (self.dir / "server.log").stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.dir / "server.log", "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def rss(self) -> int:
        return tree_rss(self.proc.pid) if self.proc and self.proc.poll() is None else 0


class RabbitCluster:
    def __init__(self, workdir: Path, size: int = 3) -> None:
        tag, cookie = uuid.uuid4().hex[:6], secrets.token_hex(16).upper()
        names = [f"edgerun-{tag}-{i}@localhost" for i in range(1, size + 1)]
        self.nodes = [RabbitNode(workdir / f"rabbit-{i}", name, cookie)
                      for i, name in enumerate(names, 1)]
        conf = rabbit_conf(names)
        for node in self.nodes:
            node.conf = conf

    def start(self) -> RabbitCluster:
        first, rest = self.nodes[0], self.nodes[1:]
        first.start()
        for node in rest:  # peer discovery (classic_config) joins each to the running first
            node.start()
        for node in rest:
            if not self._member(node):
                node.ctl("stop_app")
                node.ctl("join_cluster", first.node)
                node.ctl("start_app")
        assert wait_until(lambda: len(self.running()) == len(self.nodes), 60, 0.5), \
            f"cluster did not form: {self.running()}"
        return self

    def _member(self, node: RabbitNode) -> bool:
        return set(self.running(node)) >= {n.node for n in self.nodes}

    def running(self, via: RabbitNode | None = None) -> list[str]:
        via = via or next(n for n in self.nodes if n.proc and n.proc.poll() is None)
        try:
            status = json.loads(via.ctl("cluster_status", "--formatter", "json"))
        except (RuntimeError, ValueError):
            return []
        return list(status.get("running_nodes", []))

    def urls(self, first: int = 0) -> str:
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(n.url for n in order)

    def by_name(self, name: str) -> RabbitNode:
        return next(n for n in self.nodes if n.node == name)

    def leaders(self, via: RabbitNode) -> dict[str, str]:
        """Queue name -> the node hosting its quorum leader (classic queues: their node)."""
        out = via.ctl("list_queues", "name", "leader", "--no-table-headers")
        result = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 2 and parts[1].strip():
                result[parts[0]] = parts[1].strip()
        return result

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def rss(self) -> int:
        return sum(n.rss() for n in self.nodes)


def have_rabbit() -> bool:
    return rabbit_scripts() is not None

