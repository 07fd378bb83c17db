"""The bridge keeps MQTT's order of PUBACKs, is fair when one node floods, and holds a
bounded amount of memory when either broker stops reading.

Real brokers: a private Mosquitto (with `log_type all`, whose log shows the order of
the PUBLISHes it sent the bridge and of the PUBACKs it got back) and a private
RabbitMQ, stopped with SIGSTOP to play a consumer that does not read.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgerun.mqtt import MqttConnection
from edgerun.settings import parse_broker_url

from .bridgekit import (
    AmqpSink, BridgeProcess, MqttSink, body, publish_amqp, publish_mqtt, publish_qos0,
)
from .brokers import Mosquitto, wait_until
from .rabbit import Rabbit

CHUNK = 16 * 1024  # the agent's largest live-output chunk


@pytest.fixture
def logged_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto", extra="log_type all\n").start()
    yield broker
    broker.stop()


@pytest.fixture
def names() -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"t{tag}", f"tasks.{tag}", f"events.{tag}", f"bridge.{tag}.tasks"]


@pytest.fixture
def make_bridge(rabbit: Rabbit, names: list[str],
                tmp_path: Path) -> Iterator[Callable[..., BridgeProcess]]:
    made: list[BridgeProcess] = []

    def make(mosquitto: Mosquitto, *args: str) -> BridgeProcess:
        prefix, tasks, events, queue = names
        client_id = f"bridge-{uuid.uuid4().hex[:6]}"
        proc = BridgeProcess(mosquitto.url, rabbit.url, tmp_path / client_id, "--prefix", prefix,
                             "--tasks-exchange", tasks, "--events-exchange", events,
                             "--tasks-queue", queue, *args, client_id=client_id)
        made.append(proc)
        return proc.start()

    yield make
    for proc in made:
        if proc.alive():
            proc.kill()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


@contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """SIGSTOP: the process keeps its sockets open and reads nothing."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def rabbit_vm(rabbit: Rabbit) -> list[int]:
    assert rabbit.proc is not None
    pids = [p for p in descendants(rabbit.proc.pid) if _comm(p) == "beam.smp"]
    assert pids, "no beam.smp under the RabbitMQ we started"
    return pids


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def test_pubacks_leave_in_the_order_the_messages_arrived(
        make_bridge: Callable[..., BridgeProcess], logged_mosquitto: Mosquitto, rabbit: Rabbit,
        names: list[str]) -> None:
    """MQTT 3.1.1, 4.6: a receiver PUBACKs in the order of the PUBLISHes. Messages the
    bridge drops (a node id the contract refuses) come between ones RabbitMQ must confirm
    first; they may not be acknowledged ahead of them."""
    prefix, _tasks, events, _queue = names
    bridge = make_bridge(logged_mosquitto)
    bridge.wait_ready()
    client = next(a for a in bridge.args if a.startswith("bridge-"))
    good = [(f"{prefix}/nodes/n{i % 7}/updates", body(i, f"n{i % 7}")) for i in range(1500)]
    bad = [(f"{prefix}/nodes/bad.node/updates", body(10_000 + i, "x")) for i in range(300)]
    mixed = [m for i, g in enumerate(good) for m in ([g, bad[i // 5]] if i % 5 == 0 else [g])]
    with AmqpSink(rabbit.url, events, "node.*.updates") as sink:
        publish_mqtt(logged_mosquitto.url, mixed)
        assert sink.wait_unique(len(good), 60)
    assert wait_until(lambda: bridge.metric("edgerun_bridge_dropped_total", route="updates",
                                            reason="bad_value") == len(bad))
    log_path = logged_mosquitto.dir / "mosquitto.log"
    pattern = re.compile(rf"Sending PUBLISH to {client} \(d0, q1, r0, m(\d+),|"
                         rf"Received PUBACK from {client} \(Mid: ?(\d+)")

    def order() -> tuple[list[int], list[int]]:
        sent, acked = [], []
        for found in pattern.finditer(log_path.read_text(errors="replace")):
            (sent if found.group(1) else acked).append(int(found.group(1) or found.group(2)))
        return sent, acked

    assert wait_until(lambda: len(order()[1]) == len(mixed), 30), order()[1][-5:]
    sent, acked = order()
    assert len(sent) == len(mixed) and len(set(sent)) == len(sent)
    assert acked == sent
    assert bridge.terminate() == 0


class Flood:
    """One node's agent writing live output as fast as it can (QoS 0, 16 KiB chunks),
    until stopped; `sent` counts what the broker has surely taken."""

    def __init__(self, url: str, topic: str) -> None:
        self.url, self.topic, self.sent = url, topic, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = MqttConnection(parse_broker_url(self.url, ("mqtt",)),
                              f"flood-{uuid.uuid4().hex[:6]}",
                              clean_session=True, name="flood", max_inflight=1000)
        conn.start()
        try:
            assert conn.connected.wait(10)
            while not self.stop.is_set():
                for _ in range(100):
                    conn.publish(self.topic, body(self.sent, "flooder", "output", CHUNK), 0)
                    self.sent += 1
                # a QoS 1 publish after them: at its PUBACK the broker has read them all
                conn.publish(self.topic.rsplit("/", 1)[0] + "/mark", b"{}", 1)
                assert conn.flush(60)
        finally:
            conn.stop()


def test_one_node_flooding_output_delays_no_update_and_drops_are_counted(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: list[str]) -> None:
    prefix, _tasks, events, _queue = names
    bridge = make_bridge(mosquitto, "--qos0-per-topic", str(4 * CHUNK))
    bridge.wait_ready()
    quiet = [(f"{prefix}/nodes/q{i % 100:03d}/updates", body(i, f"q{i % 100:03d}"))
             for i in range(1000)]
    flood = Flood(mosquitto.url, f"{prefix}/nodes/flooder/output")
    with AmqpSink(rabbit.url, events, "node.*.updates") as updates:
        flood.thread.start()
        try:
            assert wait_until(lambda: flood.sent >= 1000, 30)
            for start in range(0, len(quiet), 100):  # 100 quiet nodes, one update each
                publish_mqtt(mosquitto.url, quiet[start:start + 100])
            arrived = updates.wait_unique(len(quiet), 60)
            flooding = flood.thread.is_alive()  # the updates came through during the flood
        finally:
            flood.stop.set()
            flood.thread.join(60)
        assert arrived, f"lost {len(quiet) - updates.unique()}"
        assert flooding
        assert updates.bodies() == {p for _, p in quiet}  # no update dropped

    def accounted() -> float:
        return (bridge.metric("edgerun_bridge_forwarded_total", route="output",
                              direction="mqtt_to_amqp")
                + bridge.metric("edgerun_bridge_dropped_total", route="output",
                                reason="over_budget"))

    # every flood message was forwarded or counted as dropped on its route
    assert wait_until(lambda: accounted() == flood.sent, 60), (accounted(), flood.sent)
    assert bridge.metric("edgerun_bridge_dropped_total", route="updates",
                         reason="over_budget") == 0
    assert bridge.terminate() == 0


def test_a_stalled_rabbitmq_holds_bounded_memory_in_the_bridge_and_loses_no_update(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: list[str]) -> None:
    prefix, _tasks, events, _queue = names
    budget = 4 << 20
    bridge = make_bridge(mosquitto, "--qos0-total", str(budget))
    bridge.wait_ready()
    assert bridge.proc is not None
    flood = [(f"{prefix}/nodes/f{i % 10}/output", body(i, f"f{i % 10}", "output", CHUNK))
             for i in range(6000)]  # 94 MiB of live output
    quiet = [(f"{prefix}/nodes/q{i % 50}/updates", body(i, f"q{i % 50}")) for i in range(500)]
    with AmqpSink(rabbit.url, events, "node.*.updates") as updates:
        before = rss_mib(bridge.proc.pid)
        peak = before
        with stopped(rabbit_vm(rabbit)):
            publish_mqtt(mosquitto.url, quiet)
            publish_qos0(mosquitto.url, flood)  # every byte reaches Mosquitto
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                peak = max(peak, rss_mib(bridge.proc.pid))
                time.sleep(0.05)
            dropped = bridge.metric("edgerun_bridge_dropped_total", route="output",
                                    reason="over_budget")
        assert updates.wait_unique(len(quiet), 90), f"lost {len(quiet) - updates.unique()}"
    assert dropped > 0
    # 94 MiB went in; what the bridge holds is the QoS 0 budget plus the QoS 1 window
    assert peak - before < 48, f"bridge RSS grew from {before:.0f} to {peak:.0f} MiB"
    assert bridge.terminate() == 0


def test_a_stalled_mosquitto_holds_bounded_memory_in_the_bridge_and_loses_no_task(
        make_bridge: Callable[..., BridgeProcess], mosquitto: Mosquitto, rabbit: Rabbit,
        names: list[str]) -> None:
    prefix, tasks, _events, _queue = names
    bridge = make_bridge(mosquitto, "--prefetch", "200")
    bridge.wait_ready()
    assert bridge.proc is not None and mosquitto.proc is not None
    count = 3000  # 47 MiB of tasks
    sent = [(f"node.n{i % 20}", body(i, f"n{i % 20}", "task", CHUNK)) for i in range(count)]
    with MqttSink(mosquitto.url, [f"{prefix}/nodes/+/tasks"]) as sink:
        before = rss_mib(bridge.proc.pid)
        peak = before
        with stopped([mosquitto.proc.pid]):
            publish_amqp(rabbit.url, tasks, sent)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                peak = max(peak, rss_mib(bridge.proc.pid))
                time.sleep(0.05)
        assert sink.wait_unique(count, 120), f"lost {count - sink.unique()}"
        assert sink.bodies() == {p for _, p in sent}
    # the prefetch window (200 x 16 KiB), not the 47 MiB queue, is what the bridge holds
    assert peak - before < 32, f"bridge RSS grew from {before:.0f} to {peak:.0f} MiB"
    assert bridge.terminate() == 0
