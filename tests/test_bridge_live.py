"""The bridge as a real process between a real Mosquitto and a real RabbitMQ.

Both brokers are private instances that the fixtures start, kill and restart.
Every test uses its own topic prefix, exchanges and queue (the bridge's names
are configurable), so the tests can share one RabbitMQ.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest

from .bridgekit import (
    AmqpSink, BridgeProcess, MqttSink, body, publish_amqp, publish_mqtt,
)
from .brokers import Mosquitto, wait_until
from .mqttkit import AgentProcess, shell
from .rabbit import Rabbit
from .tcpproxy import TcpProxy

N = 5000  # messages each way in the failure tests, as the issue asks


@dataclass(frozen=True)
class Names:
    prefix: str
    tasks: str
    events: str
    queue: str

    @property
    def args(self) -> list[str]:
        return ["--prefix", self.prefix, "--tasks-exchange", self.tasks,
                "--events-exchange", self.events, "--tasks-queue", self.queue]

    def topic(self, node: str, channel: str) -> str:
        return f"{self.prefix}/nodes/{node}/{channel}"


@pytest.fixture
def names() -> Names:
    tag = uuid.uuid4().hex[:6]
    return Names(f"t{tag}", f"tasks.{tag}", f"events.{tag}", f"bridge.{tag}.tasks")


@pytest.fixture
def make_bridge(mosquitto: Mosquitto, rabbit: Rabbit, names: Names,
                tmp_path: Path) -> Iterator[Callable[..., BridgeProcess]]:
    made: list[BridgeProcess] = []

    def make(*args: str, client_id: str = "bridge-a") -> BridgeProcess:
        proc = BridgeProcess(mosquitto.url, rabbit.url, tmp_path / client_id, *names.args,
                             "--log-level", "info", *args, client_id=client_id)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        if proc.alive():
            proc.kill()


def prime(make_bridge: Callable[..., BridgeProcess], *args: str,
          client_id: str = "bridge-a") -> None:
    """Run the bridge once so that its MQTT session and its queue exist, then SIGTERM it."""
    bridge = make_bridge(*args, client_id=client_id).start()
    bridge.wait_ready()
    assert bridge.terminate() == 0, bridge.log()[-3000:]


def test_default_routes_both_ways_with_the_contract_properties(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: Names) -> None:
    bridge = make_bridge().start()
    health = bridge.wait_ready()
    assert health["mqtt"]["connected"] and health["amqp"]["connected"]
    with AmqpSink(rabbit.url, names.events, "node.#") as events, \
            MqttSink(mosquitto.url, [names.topic("+", "tasks")]) as tasks:
        sent = {"updates": body(1, "n1"), "output": body(2, "n1", "output"),
                "status": body(3, "n1", "status")}
        publish_mqtt(mosquitto.url, [(names.topic("n1", "updates"), sent["updates"])])
        publish_mqtt(mosquitto.url, [(names.topic("n1", "output"), sent["output"])], qos=0)
        publish_mqtt(mosquitto.url, [(names.topic("n1", "status"), sent["status"])],
                     retain=True)
        for channel, payload in sent.items():
            key, got, props = events.wait_for(payload)
            assert key == f"node.n1.{channel}" and got == payload
            assert props.content_type == "application/json"
            assert props.delivery_mode == (None if channel == "output" else 2)
        task = b'{"v":1,"kind":"task","id":"t1","type":"shell","command":"true"} '
        publish_amqp(rabbit.url, names.tasks, [("node.web-1", task)])
        topic, got, retained = tasks.wait_for(task)
        assert topic == names.topic("web-1", "tasks") and got == task and retained is False

        # messages that break a route are logged, counted and dropped; the bridge goes on
        publish_mqtt(mosquitto.url, [(names.topic("bad.node", "updates"), body(4, "x"))])
        publish_amqp(rabbit.url, names.tasks, [("node.bad+node", task)])
        assert wait_until(lambda: bridge.metric("edgerun_bridge_dropped_total", route="updates",
                                                reason="bad_value") == 1)
        assert wait_until(lambda: bridge.metric("edgerun_bridge_dropped_total", route="tasks",
                                                reason="bad_value") == 1)
        publish_mqtt(mosquitto.url, [(names.topic("n2", "updates"), body(5, "n2"))])
        assert events.wait_for(body(5, "n2"))[0] == "node.n2.updates"
        assert len(events.received) == 4 and len(tasks.received) == 1
    assert "bad node id 'bad.node'" in bridge.log()
    assert bridge.metric("edgerun_bridge_forwarded_total", route="updates",
                         direction="mqtt_to_amqp") == 2
    assert bridge.metric("edgerun_bridge_forwarded_total", route="tasks",
                         direction="amqp_to_mqtt") == 1
    assert bridge.metric("edgerun_bridge_in_flight", direction="amqp_to_mqtt") == 0
    assert bridge.metric("edgerun_bridge_reconnects_total", broker="amqp") == 0
    assert bridge.terminate() == 0


def load_both_ways(mosquitto: Mosquitto, rabbit: Rabbit, names: Names,
                   nodes: int = 50) -> tuple[set[bytes], set[bytes]]:
    """N updates queued in Mosquitto for the bridge, N tasks in the bridge's RabbitMQ queue."""
    up = [(names.topic(f"n{i % nodes}", "updates"), body(i, f"n{i % nodes}")) for i in range(N)]
    down = [(f"node.n{i % nodes}", body(i, f"n{i % nodes}", "task")) for i in range(N)]
    publish_mqtt(mosquitto.url, up)
    publish_amqp(rabbit.url, names.tasks, down)
    return {p for _, p in up}, {p for _, p in down}


def progress(events: AmqpSink, tasks: MqttSink) -> int:
    return events.unique() + tasks.unique()


def test_5000_each_way_with_the_bridge_killed_twice(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: Names) -> None:
    prime(make_bridge)
    with AmqpSink(rabbit.url, names.events, "node.*.updates") as events, \
            MqttSink(mosquitto.url, [names.topic("+", "tasks")]) as tasks:
        up, down = load_both_ways(mosquitto, rabbit, names)
        for threshold in (2 * N // 3, 4 * N // 3):
            bridge = make_bridge().start()
            assert wait_until(lambda t=threshold: progress(events, tasks) >= t, 60)
            bridge.kill()  # kill -9, in the middle of both flows
            assert progress(events, tasks) < 2 * N, "the kill came too late to prove anything"
        bridge = make_bridge().start()
        assert events.wait_unique(N) and tasks.wait_unique(N), (
            f"lost: {N - events.unique()} up, {N - tasks.unique()} down\n{bridge.log()[-3000:]}")
        assert events.bodies() == up and tasks.bodies() == down  # byte for byte, nothing else
        assert wait_until(lambda: bridge.metric("edgerun_bridge_in_flight",
                                                direction="mqtt_to_amqp") == 0)
        assert bridge.terminate() == 0
    duplicates = len(events.received) + len(tasks.received) - 2 * N
    print(f"bridge killed twice: {duplicates} duplicates, no loss")


def test_5000_each_way_with_rabbitmq_killed_and_restarted(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: Names) -> None:
    prime(make_bridge)
    with AmqpSink(rabbit.url, names.events, "node.*.updates") as events, \
            MqttSink(mosquitto.url, [names.topic("+", "tasks")]) as tasks:
        up, down = load_both_ways(mosquitto, rabbit, names)
        bridge = make_bridge().start()
        assert wait_until(lambda: progress(events, tasks) >= N // 2, 60)
        at_kill = progress(events, tasks)  # the restart's kill -9 comes right after
        rabbit.restart()  # kill -9 and start again on the same data
        # judged at the kill: once the node answers again the bridge may finish before
        # restart() returns (it also waits for the node's boot to complete)
        assert at_kill < 2 * N, "the restart came too late to prove anything"
        assert events.wait_unique(N, 90) and tasks.wait_unique(N, 90), (
            f"lost: {N - events.unique()} up, {N - tasks.unique()} down\n{bridge.log()[-3000:]}")
        assert events.bodies() == up and tasks.bodies() == down
        health = bridge.wait_ready()
        assert health["amqp"]["reconnects"] >= 1 and health["amqp"]["last_error"]
        assert health["mqtt"]["reconnects"] == 0  # the other connection never dropped
        assert bridge.terminate() == 0


def test_5000_each_way_with_mosquitto_restarted(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: Names) -> None:
    prime(make_bridge)
    with AmqpSink(rabbit.url, names.events, "node.*.updates") as events, \
            MqttSink(mosquitto.url, [names.topic("+", "tasks")]) as tasks:
        up, down = load_both_ways(mosquitto, rabbit, names)
        bridge = make_bridge().start()
        assert wait_until(lambda: progress(events, tasks) >= N // 2, 60)
        # Mosquitto saves its sessions on SIGTERM; kill -9 would lose what it had not
        # saved yet (it snapshots, it does not log each message), whatever the bridge did.
        mosquitto.stop()
        mosquitto.start()
        assert progress(events, tasks) < 2 * N, "the restart came too late to prove anything"
        assert events.wait_unique(N, 90) and tasks.wait_unique(N, 90), (
            f"lost: {N - events.unique()} up, {N - tasks.unique()} down\n{bridge.log()[-3000:]}")
        assert events.bodies() == up and tasks.bodies() == down
        health = bridge.wait_ready()
        assert health["mqtt"]["reconnects"] >= 1
        assert health["amqp"]["reconnects"] == 0  # the other connection never dropped
        assert bridge.terminate() == 0


def test_1000_node_ids_leave_the_queue_count_and_the_metrics_unchanged(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: Names) -> None:
    bridge = make_bridge().start()
    bridge.wait_ready()
    with AmqpSink(rabbit.url, names.events, "node.*.updates") as events, \
            MqttSink(mosquitto.url, [names.topic("+", "tasks")]) as tasks:
        queues_before = rabbit.queues()
        series_before = set(bridge.metrics())
        nodes = [f"node-{i:04d}" for i in range(1000)]
        publish_mqtt(mosquitto.url, [(names.topic(n, "updates"), body(i, n))
                                     for i, n in enumerate(nodes)])
        publish_amqp(rabbit.url, names.tasks, [(f"node.{n}", body(i, n, "task"))
                                               for i, n in enumerate(nodes)])
        assert events.wait_unique(1000) and tasks.wait_unique(1000)
        assert {k.split(".")[1] for k, _, _ in events.received} == set(nodes)
        assert {t.split("/")[2] for t, _, _ in tasks.received} == set(nodes)
        assert rabbit.queues() == queues_before
        assert names.queue in queues_before
        assert set(bridge.metrics()) == series_before  # no series per node
    assert bridge.terminate() == 0


def test_sigterm_mid_flow_drains_exits_0_and_loses_nothing(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: Names) -> None:
    prime(make_bridge)
    with AmqpSink(rabbit.url, names.events, "node.*.updates") as events, \
            MqttSink(mosquitto.url, [names.topic("+", "tasks")]) as tasks:
        up, down = load_both_ways(mosquitto, rabbit, names)
        bridge = make_bridge().start()
        assert wait_until(lambda: progress(events, tasks) >= N // 2, 60)
        assert bridge.terminate() == 0
        assert progress(events, tasks) < 2 * N, "SIGTERM came too late to prove anything"
        assert "draining what is in flight" in bridge.log()
        bridge = make_bridge().start()
        assert events.wait_unique(N) and tasks.wait_unique(N), bridge.log()[-3000:]
        assert events.bodies() == up and tasks.bodies() == down
        assert bridge.terminate() == 0


def test_two_bridges_share_the_work_both_ways(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: Names) -> None:
    count = 2000
    bridges = [make_bridge("--share-group", "bridges", client_id=f"bridge-{i}").start()
               for i in (1, 2)]
    for bridge in bridges:
        bridge.wait_ready()
    with AmqpSink(rabbit.url, names.events, "node.*.updates") as events, \
            MqttSink(mosquitto.url, [names.topic("+", "tasks")]) as tasks:
        publish_mqtt(mosquitto.url, [(names.topic(f"n{i % 20}", "updates"), body(i, "n"))
                                     for i in range(count)])
        publish_amqp(rabbit.url, names.tasks, [(f"node.n{i % 20}", body(i, "n", "task"))
                                               for i in range(count)])
        assert events.wait_unique(count) and tasks.wait_unique(count)
        # shared subscription: each message went through one bridge, not both
        assert len(events.received) == count
    for bridge in bridges:
        assert bridge.metric("edgerun_bridge_forwarded_total", route="updates",
                             direction="mqtt_to_amqp") > 0
        assert bridge.metric("edgerun_bridge_forwarded_total", route="tasks",
                             direction="amqp_to_mqtt") > 0
        assert bridge.terminate() == 0


def test_a_real_agent_behind_the_bridge_runs_a_task_sent_with_plain_pika(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: Names, tmp_path: Path) -> None:
    bridge = make_bridge().start()
    bridge.wait_ready()
    with AmqpSink(rabbit.url, names.events, "node.rack1-n7.#") as events:
        agent = AgentProcess(mosquitto.url, "rack1-n7", tmp_path / "agent", "--prefix",
                             names.prefix).start()
        try:
            assert wait_until(lambda: any(k == "node.rack1-n7.status" and
                                          json.loads(b)["state"] == "online"
                                          for k, b, _ in events.received), 20), agent.log()
            conn = rabbit.connect()
            try:
                conn.channel().basic_publish(
                    names.tasks, "node.rack1-n7",
                    json.dumps(shell("job-1", "echo hello from $0")).encode(),
                    pika.BasicProperties(content_type="application/json", delivery_mode=2))
            finally:
                conn.close()

            def updates() -> list[dict[str, object]]:
                return [json.loads(b) for k, b, _ in list(events.received)
                        if k == "node.rack1-n7.updates"]

            assert wait_until(lambda: any(u["state"] == "succeeded" for u in updates()), 30), \
                f"{updates()}\n{agent.log()[-2000:]}\n{bridge.log()[-2000:]}"
            assert [u["state"] for u in updates()] == ["accepted", "running", "succeeded"]
            final = updates()[-1]
            assert final["id"] == "job-1" and final["node"] == "rack1-n7"
            assert final["exit_code"] == 0 and str(final["stdout"]).startswith("hello from")
            props = [p for k, _, p in events.received if k == "node.rack1-n7.updates"]
            assert all(p.delivery_mode == 2 and p.content_type == "application/json"
                       for p in props)
            assert wait_until(lambda: any(k == "node.rack1-n7.output"
                                          for k, _, _ in list(events.received)), 10)
        finally:
            agent.terminate()
    assert bridge.terminate() == 0


def test_deleted_exchanges_and_queue_are_declared_again(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: Names) -> None:
    bridge = make_bridge().start()
    bridge.wait_ready()
    conn = rabbit.connect()
    try:
        channel = conn.channel()
        channel.queue_delete(names.queue)  # RabbitMQ cancels the bridge's consumer
        channel.exchange_delete(names.tasks)
        channel.exchange_delete(names.events)
        assert wait_until(lambda: (bridge.health() or {}).get("amqp", {}).get("reconnects") == 1)
        bridge.wait_ready()
        channel.exchange_declare(names.events, passive=True)  # raises if it is not there
        channel.exchange_declare(names.tasks, passive=True)
        channel.queue_declare(names.queue, passive=True)
    finally:
        conn.close()
    with MqttSink(mosquitto.url, [names.topic("+", "tasks")]) as tasks:
        publish_amqp(rabbit.url, names.tasks, [("node.n1", body(1, "n1", "task"))])
        assert tasks.wait_for(body(1, "n1", "task"))[0] == names.topic("n1", "tasks")
    assert "cancelled consumer" in bridge.log()
    assert bridge.terminate() == 0


def test_publishes_rabbitmq_refuses_are_sent_again_until_confirmed(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: Names) -> None:
    bridge = make_bridge().start()
    bridge.wait_ready()
    conn = rabbit.connect()
    try:
        channel = conn.channel()  # a full queue that refuses more: RabbitMQ nacks the publish
        channel.queue_declare("full-" + names.prefix, arguments={
            "x-max-length": 3, "x-overflow": "reject-publish"})
        channel.queue_bind("full-" + names.prefix, names.events, "node.*.updates")
        with AmqpSink(rabbit.url, names.events, "node.*.updates") as events:
            sent = [body(i, "n1") for i in range(10)]
            publish_mqtt(mosquitto.url, [(names.topic("n1", "updates"), p) for p in sent])
            assert wait_until(lambda: bridge.metric("edgerun_bridge_nacked_total",
                                                    route="updates") >= 7)
            assert bridge.metric("edgerun_bridge_in_flight", direction="mqtt_to_amqp") == 7
            channel.queue_delete("full-" + names.prefix)
            assert events.wait_unique(10)
            assert events.bodies() == set(sent)
        assert wait_until(lambda: bridge.metric("edgerun_bridge_in_flight",
                                                direction="mqtt_to_amqp") == 0)
    finally:
        conn.close()
    # said once for the whole episode of refusals, not once per refused publish
    assert bridge.log().count("refuses publishes") == 1, bridge.log()[-3000:]
    assert bridge.terminate() == 0


def test_5000_each_way_while_each_connection_is_cut_on_its_own(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: Names, tmp_path: Path) -> None:
    prime(make_bridge)
    with TcpProxy(mosquitto.port) as mqtt_proxy, TcpProxy(rabbit.port) as amqp_proxy, \
            AmqpSink(rabbit.url, names.events, "node.*.updates") as events, \
            MqttSink(mosquitto.url, [names.topic("+", "tasks")]) as tasks:
        up, down = load_both_ways(mosquitto, rabbit, names)
        bridge = BridgeProcess(mqtt_proxy.url("mqtt"), amqp_proxy.url("amqp", "guest:guest@"),
                               tmp_path / "proxied", *names.args, client_id="bridge-a").start()
        try:
            for threshold, proxy in ((N // 2, amqp_proxy), (N, mqtt_proxy),
                                     (3 * N // 2, amqp_proxy)):
                assert wait_until(lambda t=threshold: progress(events, tasks) >= t, 60)
                proxy.cut()
                assert progress(events, tasks) < 2 * N, "the cut came too late to prove anything"
            assert events.wait_unique(N) and tasks.wait_unique(N), bridge.log()[-3000:]
            assert events.bodies() == up and tasks.bodies() == down
            health = bridge.wait_ready()
            assert health["amqp"]["reconnects"] == 2 and health["mqtt"]["reconnects"] == 1
            assert bridge.terminate() == 0
        finally:
            if bridge.alive():
                bridge.kill()
