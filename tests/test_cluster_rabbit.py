"""edgerun on a 3-node RabbitMQ cluster (deploy/rabbitmq/rabbitmq.conf), quorum queues.

The bridge and a scheduler both get all three AMQP URLs. 2,000 shell tasks flow
from the scheduler through RabbitMQ and the bridge to real agents (many in one
process, tests/agent_pool.py) while the node hosting the queues' leaders is
killed -9 and later started again: every task ends succeeded, each ran exactly
once (the commands append their ids to one file), none is missing.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .brokers import Mosquitto, wait_until
from .bridgekit import BridgeProcess
from .cluster import RabbitCluster, have_rabbit
from .mqttkit import ROOT
from .scheduler_kit import running_app

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_rabbit(), reason="rabbitmq-server not installed")]

TASKS = 2000
AGENTS = 20


@pytest.fixture(scope="module")
def rabbits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbits")).start()
    yield cluster
    cluster.stop()


class AgentPool:
    """tests/agent_pool.py: AGENTS real agents in one process."""

    def __init__(self, url: str, prefix: str, count: int, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "pool.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.agent_pool", url, prefix, "0", str(count),
                 str(workdir)], stdout=log, stderr=log, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.nodes = [f"{prefix}{i:03d}" for i in range(count)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_tasks_survive_the_loss_of_the_queue_leaders_node(
        rabbits: RabbitCluster, tmp_path: Path) -> None:
    urls = rabbits.urls(0)  # each client starts at a random node of the list
    mosquitto = Mosquitto(tmp_path / "mosquitto").start()
    bridge = BridgeProcess(mosquitto.url, urls, tmp_path / "bridge", "--queue-type", "quorum",
                           "--log-level", "info")
    pool: AgentPool | None = None
    ran = tmp_path / "ran.txt"
    try:
        with running_app(urls, tmp_path, queue_type="quorum", grace=600.0) as app:
            bridge.start().wait_ready(60)
            pool = AgentPool(mosquitto.url, f"rq{uuid.uuid4().hex[:3]}-", AGENTS,
                             tmp_path / "agents")
            service = app.service
            assert service is not None
            assert wait_until(lambda: service.store.count_nodes_by_state().get("online", 0)
                              == AGENTS, 60), "the agents never came online"

            # the victim: the node hosting the scheduler queue's leader (the bridge's
            # queue leader and the connections may be elsewhere: leaders are balanced, and
            # the clients start at random nodes; bench/failover.py measures the stall)
            leaders = rabbits.leaders(rabbits.nodes[0])
            queue = app.settings.queue
            victim = rabbits.by_name(leaders[queue])
            print(f"\nqueue leaders: {leaders}; scheduler on {service.health()['broker_node']}")

            ids: dict[str, str] = {}
            for n in range(TASKS):
                node = pool.nodes[n % AGENTS]
                tid = f"t{n:05d}"
                service.dispatch([node], False, {
                    "type": "shell", "id": tid, "timeout": 600,
                    "command": ["/bin/sh", "-c", f"echo {tid} >> {ran}"]})
                ids[tid] = node

            def finished() -> int:
                counts = service.store.count_by_state()
                return sum(counts.get(s, 0) for s in
                           ("succeeded", "failed", "timed_out", "canceled", "rejected", "lost"))

            assert wait_until(lambda: finished() >= TASKS // 4, 300, 0.1)
            killed_at = time.monotonic()
            victim.kill()
            done_at_kill = finished()
            # the bridge and the scheduler move to the other nodes; the quorum queues elect
            # new leaders there, and the flow goes on without the dead node
            assert wait_until(lambda: service.health()["broker_node"] not in
                              (None, f"127.0.0.1:{victim.port}"), 120)
            scheduler_back = time.monotonic() - killed_at
            now_on = service.health()["broker_node"]
            assert f'edgerun_scheduler_broker_node_info{{node="{now_on}"}} 1.0' in \
                service.metrics.render().decode()
            assert wait_until(lambda: (bridge.health() or {}).get("status") == "ok", 120)
            bridge_back = time.monotonic() - killed_at
            assert wait_until(lambda: finished() >= min(TASKS, done_at_kill + TASKS // 4),
                              300, 0.1), service.store.count_by_state()
            victim.start()
            assert wait_until(lambda: len(rabbits.running()) == 3, 120)
            assert wait_until(lambda: finished() >= TASKS, 300, 0.2), \
                service.store.count_by_state()
            print(f"node killed after {done_at_kill} tasks; scheduler on another node "
                  f"{scheduler_back:.1f} s later, bridge healthy again {bridge_back:.1f} s "
                  f"later; cluster RSS {rabbits.rss() / 2**20:.0f} MiB")

            # every task ended exactly once, succeeded; each command ran exactly once
            states = collections.Counter(service.store.get(node, tid).state  # type: ignore[union-attr]
                                         for tid, node in ids.items())
            assert states == {"succeeded": TASKS}, states
            runs = collections.Counter(ran.read_text().split())
            assert set(runs) == set(ids), f"missing: {sorted(set(ids) - set(runs))[:10]}"
            assert max(runs.values()) == 1, [t for t, c in runs.items() if c > 1][:10]
            metrics = bridge.metrics()
            assert any(name == "edgerun_bridge_broker_node_info" and dict(labels)["broker"]
                       == "amqp" for name, labels in metrics), metrics.keys()
    finally:
        if pool is not None:
            pool.stop()
        if bridge.alive():
            bridge.terminate()
        mosquitto.stop()
