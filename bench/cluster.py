"""Item 8: what a broker cluster costs and how fast edgerun moves off a dead node.

`python bench/cluster.py [--runs N]` (or `item8(workdir, runs=N)` from bench/run.py).
Reports, asserts nothing:

- memory (RSS of the whole process tree, epmd excluded) of one node against the
  3-node cluster, at rest with edgerun's queues / MQTT streams in place: NATS with
  JetStream serving MQTT (deploy/nats/nats.conf) and RabbitMQ (deploy/rabbitmq/);
- failover: a node is killed -9 under a connected client, the time until the client
  is connected to another node. MQTT: an `edgerun.mqtt.MqttConnection` with a
  persistent session and a QoS 1 subscription, as the agent has, on NATS. AMQP: the
  scheduler's `AmqpMessenger` with its quorum queue, on RabbitMQ. The killed node is
  started again between runs;
- the stall a user sees (bench/failover.py): the longest gap between recorded task
  completions around the kill of the node leading the scheduler's queue, under a
  steady flow through the bridge, on RabbitMQ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgerun.mqtt import MqttConnection  # noqa: E402
from edgerun.scheduler.messaging.amqp import AmqpMessenger  # noqa: E402
from edgerun.settings import parse_broker_urls  # noqa: E402
from tests.brokers import wait_until  # noqa: E402
from tests.cluster import (  # noqa: E402
    NatsCluster, NatsNode, RabbitCluster, mqtt_probe, tree_rss,
)
from tests.rabbit import Rabbit  # noqa: E402

MIB = 2**20
SINGLE_NATS = """\
server_name: single
listen: 127.0.0.1:{client}
jetstream {{ store_dir: "{store}" }}
mqtt {{ listen: 127.0.0.1:{mqtt} }}
"""


def _mib(value: float) -> float:
    return round(value / MIB, 1)


def nats_memory(workdir: Path) -> dict[str, float]:
    single = NatsNode(workdir / "single", "single")
    conf = workdir / "single.conf"
    conf.write_text(SINGLE_NATS.format(client=single.client_port, store=single.dir / "store",
                                       mqtt=single.mqtt_port))
    single.start(conf)
    try:
        wait_until(lambda: mqtt_probe(single.url), 60, 0.5)
        one = single.rss()
    finally:
        single.stop()
    cluster = NatsCluster(workdir / "cluster").start()
    try:
        three = cluster.rss()
    finally:
        cluster.stop()
    return {"single_mib": _mib(one), "cluster_mib": _mib(three),
            "per_cluster_node_mib": _mib(three / 3)}


def rabbit_memory(workdir: Path) -> dict[str, float]:
    single = Rabbit(workdir / "rabbit-single").start()
    try:
        conn = single.connect()
        conn.channel().queue_declare("edgerun.scheduler", durable=True)
        conn.close()
        one = tree_rss(single.proc.pid) if single.proc else 0
    finally:
        single.stop()
    cluster = RabbitCluster(workdir / "rabbit-cluster").start()
    try:
        conn = cluster.nodes[0].connect()
        conn.channel().queue_declare("edgerun.scheduler", durable=True,
                                     arguments={"x-queue-type": "quorum"})
        conn.close()
        three = cluster.rss()
    finally:
        cluster.stop()
    return {"single_mib": _mib(one), "cluster_mib": _mib(three),
            "per_cluster_node_mib": _mib(three / 3)}


def nats_failover(workdir: Path, runs: int) -> list[float]:
    cluster = NatsCluster(workdir / "nats-failover").start()
    urls = parse_broker_urls(cluster.urls(), ("mqtt",))
    conn = MqttConnection(urls, "bench-failover", clean_session=False,
                          subscriptions=[("bench/failover", 1)], name="bench")
    times = []
    conn.start()
    try:
        assert conn.connected.wait(30)
        for _ in range(runs):
            home = conn.node
            assert home is not None
            victim = cluster.node_of_port(home.port)
            t0 = time.monotonic()
            victim.kill()
            if wait_until(lambda h=home: conn.node not in (None, h), 120, 0.01):
                times.append(round(time.monotonic() - t0, 2))
            victim.start()
            cluster.wait_usable()
    finally:
        conn.stop()
        cluster.stop()
    return times


def rabbit_failover(workdir: Path, runs: int) -> list[float]:
    cluster = RabbitCluster(workdir / "rabbit-failover").start()
    urls = parse_broker_urls(cluster.urls(), ("amqp",))
    messenger = AmqpMessenger(urls, queue="bench.failover", queue_type="quorum")
    times = []
    messenger.start(lambda _m: None)
    try:
        assert messenger.connected.wait(30)
        for _ in range(runs):
            home = messenger.node
            assert home is not None
            victim = next(n for n in cluster.nodes if n.port == home.port)
            t0 = time.monotonic()
            victim.kill()
            if wait_until(lambda h=home: messenger.node not in (None, h), 120, 0.01):
                times.append(round(time.monotonic() - t0, 2))
            victim.start()
            wait_until(lambda: len(cluster.running()) == 3, 120, 0.5)
    finally:
        messenger.stop()
        cluster.stop()
    return times


def _summary(times: list[float], runs: int) -> dict[str, Any]:
    return {"runs": runs, "reconnected": len(times), "seconds": times,
            "median_s": round(statistics.median(times), 2) if times else None}


def item8(workdir: Path, runs: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {"memory": {}, "failover": {}}
    out["memory"]["nats_jetstream_mqtt"] = nats_memory(workdir / "nm")
    out["failover"]["mqtt_nats"] = _summary(nats_failover(workdir / "nf", runs), runs)
    out["memory"]["rabbitmq"] = rabbit_memory(workdir / "rm")
    out["failover"]["amqp_rabbitmq"] = _summary(rabbit_failover(workdir / "rf", runs), runs)
    from bench.failover import stall
    out["failover"]["stall_rabbitmq"] = stall(workdir / "st", runs)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgerun-bench-cluster-") as tmp:
        result = item8(Path(tmp), args.runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
