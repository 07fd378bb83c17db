"""Agents on a 3-node NATS cluster (JetStream serving MQTT, deploy/nats/nats.conf).

The node an agent is connected to is killed -9: the agent moves to another node,
its persistent session comes along with the task published while it was away,
nothing runs twice, and every node (the restarted one too) serves its latest
retained status.
"""

from __future__ import annotations

import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerun.mqtt import Inbound, MqttConnection
from edgerun.settings import parse_broker_url

from .brokers import wait_until
from .cluster import NatsCluster, nats_binary
from .mqttkit import AgentProcess, Observer, shell

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(nats_binary() is None, reason="nats-server not installed")]

CONNECTED = re.compile(r"connected to mqtt://127\.0\.0\.1:(\d+)")


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path_factory.mktemp("nats")).start()
    yield cluster
    cluster.stop()


def connected_ports(agent: AgentProcess) -> list[int]:
    """The MQTT port of every node the agent connected to, in order (from its log)."""
    return [int(port) for port in CONNECTED.findall(agent.log())]


def retained_status(url: str, node: str, timeout: float = 15.0) -> dict[str, Any] | None:
    """The retained status of `node` as one broker node serves it to a new subscriber."""
    import json
    got: list[dict[str, Any]] = []
    arrived = threading.Event()

    def on_message(msg: Inbound) -> None:
        if msg.retain:
            got.append(json.loads(msg.payload))
            arrived.set()

    conn = MqttConnection(parse_broker_url(url, ("mqtt",)), f"peek-{uuid.uuid4().hex[:8]}",
                          on_message=on_message, clean_session=True,
                          subscriptions=[(f"edgerun/nodes/{node}/status", 0)], name="peek")
    conn.start()
    try:
        arrived.wait(timeout)
    finally:
        conn.stop()
    return got[-1] if got else None


def served_everywhere(nats: NatsCluster, node: str) -> dict[str, Any]:
    """The node's retained status, once every live broker node serves the same one."""
    served: list[list[dict[str, Any] | None]] = []

    def agree() -> bool:
        served.append([retained_status(b.url, node, 5) for b in nats.nodes if b.alive()])
        return served[-1][0] is not None and all(s == served[-1][0] for s in served[-1])

    assert wait_until(agree, 90), [[s and s.get("at") for s in row] for row in served[-2:]]
    status = served[-1][0]
    assert status is not None
    return status


def onlines(observer: Observer, node: str) -> list[dict[str, Any]]:
    """The node's online statuses, one per connect (a retained copy seen again on the
    observer's own reconnects is the same status: same `at`)."""
    seen: dict[str, dict[str, Any]] = {}
    for status in observer.of("status", node=node):
        if status.get("state") == "online":
            seen[status["at"]] = status
    return [seen[at] for at in sorted(seen)]


def test_agent_fails_over_with_its_session_queued_task_and_status(
        nats: NatsCluster, tmp_path: Path) -> None:
    node = f"cl-{uuid.uuid4().hex[:6]}"
    nats.wait_usable()
    with Observer(nats.urls(2)) as observer:
        agent = AgentProcess(nats.urls(0), node, tmp_path / "agent").start()
        agent.wait_online(observer, timeout=30)
        observer.send(node, shell("before", "echo before"))
        assert observer.final("before", timeout=30)["state"] == "succeeded"
        home = connected_ports(agent)[-1]

        # the agent is away (stopped) while its node dies and a task is published for it
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGSTOP)
        victim = nats.node_of_port(home)
        victim.kill()
        seen_online = len(onlines(observer, node))
        observer.send(node, shell("while-away", "echo away"))
        assert observer.conn.flush(30), "the cluster did not take the task"
        agent.proc.send_signal(signal.SIGCONT)

        # it reconnects to another node (a new online status) and takes its queued task
        assert wait_until(lambda: len(onlines(observer, node)) > seen_online, 60), \
            f"agent never came back:\n{agent.log()[-3000:]}"
        assert connected_ports(agent)[-1] != home
        final = observer.final("while-away", timeout=60)
        assert final["state"] == "succeeded" and final["stdout"] == "away\n"
        assert observer.states("while-away").count("running") == 1
        assert observer.states("before").count("running") == 1

        # every node, the restarted one too, serves the same retained status: online. NATS
        # 2.9 may have dropped the newest one (the agent's status on reconnect) if it came
        # while the retained-message stream was electing a leader ("unable to store
        # retained message" in its log, and a PUBACK all the same): then the status before
        # the failover is what every node serves, still online.
        latest = onlines(observer, node)[-1]
        served = served_everywhere(nats, node)
        assert served["state"] == "online" and served in onlines(observer, node)
        victim.start()
        assert served_everywhere(nats, node) == served
        print(f"retained status served everywhere is the "
              f"{'newest' if served == latest else 'one before the failover'}")
        agent.terminate()


def test_agents_reconnect_when_their_node_dies(nats: NatsCluster, tmp_path: Path) -> None:
    """Agents spread over the three nodes; the node of the first is killed -9: each of its
    agents reconnects to another node by itself, the others stay where they are."""
    nats.wait_usable()
    names = [f"sp-{i}-{uuid.uuid4().hex[:4]}" for i in range(3)]
    with Observer(nats.urls(1)) as observer:
        agents = [AgentProcess(nats.urls(i), name, tmp_path / name).start()
                  for i, name in enumerate(names)]
        for agent in agents:
            agent.wait_online(observer, timeout=30)
        homes = {a.node: connected_ports(a)[-1] for a in agents}
        victim = nats.node_of_port(homes[names[0]])
        moved = [a for a in agents if homes[a.node] == victim.mqtt_port]
        before = {a.node: len(onlines(observer, a.node)) for a in agents}
        killed_at = time.monotonic()
        victim.kill()
        back: dict[str, float] = {}

        def returned() -> bool:
            for a in moved:
                if a.node not in back and len(onlines(observer, a.node)) > before[a.node]:
                    back[a.node] = time.monotonic() - killed_at
            return len(back) == len(moved)

        assert wait_until(returned, 60), "not every agent of the dead node came back"
        for agent in agents:
            if agent in moved:
                assert connected_ports(agent)[-1] != victim.mqtt_port
            else:
                assert connected_ports(agent) == [homes[agent.node]]  # never disturbed
        print(f"failover (kill -9 to the new online status): "
              f"{', '.join(f'{t:.2f} s' for t in sorted(back.values()))}")
        for name in names:
            observer.send(name, shell(f"after-{name}", "echo ok"))
        for name in names:
            assert observer.final(f"after-{name}", timeout=60)["state"] == "succeeded"
        for agent in agents:
            agent.terminate()
        victim.start()
        nats.wait_usable()
