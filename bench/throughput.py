"""Items 1 and 6: bridge throughput against RabbitMQ's MQTT plugin, and 1,000,000 integers.

The same producer and consumer run against both paths, live (the clock starts
before the first publish and stops at the last unique arrival):
- up:   MQTT QoS 1 producer -> Mosquitto -> edgerun-bridge -> RabbitMQ -> AMQP consumer
        MQTT QoS 1 producer -> RabbitMQ MQTT plugin -> exchange -> AMQP consumer
- down: AMQP producer -> RabbitMQ -> edgerun-bridge -> Mosquitto -> MQTT QoS 1 consumer
        AMQP producer -> exchange -> RabbitMQ MQTT plugin -> MQTT QoS 1 consumer
The AMQP producer publishes persistent messages in transactions of 500 (the
broker has them on disk at each commit, as with confirms); the consumers
acknowledge each message.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika

from bench.common import PluginRabbit, cpu_s, median, mosquitto
from edgerun.mqtt import MqttConnection
from edgerun.settings import parse_broker_url
from tests.bridgekit import AmqpSink, BridgeProcess, MqttSink, body, publish_amqp, publish_mqtt

PREFIX = "bench"
PLUGIN_EXCHANGE = "bench.mqtt"


def _clean_mqtt_sink(url: str, topic: str) -> MqttSink:
    sink = MqttSink(url, [topic])
    sink.conn = MqttConnection(parse_broker_url(url, ("mqtt",)), f"sink-{uuid.uuid4().hex[:8]}",
                               on_message=sink._on_message, subscriptions=[(topic, 1)],
                               clean_session=True, name="mqtt-sink", max_inflight=1000)
    return sink


def _delete_queue(amqp_url: str, queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        conn.channel().queue_delete(queue)
    finally:
        conn.close()


class Setup:
    """One RabbitMQ (with the plugin), one Mosquitto, one running bridge."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.rabbit = PluginRabbit(work / "rabbit", exchange=PLUGIN_EXCHANGE).start()
        conn = pika.BlockingConnection(pika.URLParameters(self.rabbit.url))
        conn.channel().exchange_declare(PLUGIN_EXCHANGE, "topic", durable=True)
        conn.close()
        self.mosquitto = mosquitto(work / "mosquitto")
        self.bridge = BridgeProcess(self.mosquitto.url, self.rabbit.url, work / "bridge",
                                    "--prefix", PREFIX, client_id="bench-bridge").start()
        self.bridge.wait_ready()

    def stop(self) -> None:
        for step in (self.bridge.terminate, self.mosquitto.stop, self.rabbit.stop):
            try:
                step()
            except Exception as exc:
                print(f"  (stopping: {exc})", flush=True)


def _pids(setup: Setup, path: str) -> dict[str, list[int]]:
    """The processes on a path: the load generators (this process: producer and consumer
    threads), RabbitMQ's VM, and on the bridge path Mosquitto and the bridge."""
    import os
    assert setup.rabbit.proc is not None and setup.mosquitto.proc is not None
    pids = {"load generators": [os.getpid()], "rabbitmq": _beam(setup.rabbit.proc.pid)}
    if path == "bridge":
        assert setup.bridge.proc is not None
        pids["mosquitto"] = [setup.mosquitto.proc.pid]
        pids["bridge"] = [setup.bridge.proc.pid]
    return pids


def one_run(setup: Setup, path: str, direction: str, count: int, size: int,
            run: int, cpu: dict[str, float] | None = None) -> float:
    """msg/s from the first publish to the last unique arrival; `cpu` gets each process's
    CPU microseconds per message over the run (set-up and tear-down of clients included)."""
    pids = _pids(setup, path)
    before = {k: sum(cpu_s(p) for p in v) for k, v in pids.items()}
    nodes = [f"r{run}n{i}" for i in range(50)]
    amqp = setup.rabbit.url
    if direction == "up":
        mqtt_url = setup.mosquitto.url if path == "bridge" else setup.rabbit.mqtt_url
        exchange, binding = (("edgerun.events", "node.*.updates") if path == "bridge"
                             else (PLUGIN_EXCHANGE, f"{PREFIX}.nodes.*.updates"))
        sink: Any = AmqpSink(amqp, exchange, binding)
        messages = [(f"{PREFIX}/nodes/{nodes[i % 50]}/updates", body(i, nodes[i % 50], size=size))
                    for i in range(count)]
        with sink:
            started = time.monotonic()
            publish_mqtt(mqtt_url, messages)
            ok = sink.wait_unique(count, 300)
        _delete_queue(amqp, sink.queue)
    else:
        mqtt_url = setup.mosquitto.url if path == "bridge" else setup.rabbit.mqtt_url
        sink = _clean_mqtt_sink(mqtt_url, f"{PREFIX}/nodes/+/tasks")
        exchange = "edgerun.tasks" if path == "bridge" else PLUGIN_EXCHANGE
        messages = [((f"node.{nodes[i % 50]}" if path == "bridge"
                      else f"{PREFIX}.nodes.{nodes[i % 50]}.tasks"),
                     body(i, nodes[i % 50], "task", size)) for i in range(count)]
        with sink:
            time.sleep(0.3)  # the SUBSCRIBE reaches the broker
            started = time.monotonic()
            publish_amqp(amqp, exchange, messages)
            ok = sink.wait_unique(count, 300)
    if not ok:
        raise RuntimeError(f"{path} {direction} {size} B: only {sink.unique()}/{count} arrived")
    assert sink.last_at is not None
    if cpu is not None:
        for k, v in pids.items():
            cpu[k] = 1e6 * (sum(cpu_s(p) for p in v) - before[k]) / count
    return count / max(1e-9, sink.last_at - started)


def forget_session(url: str, client_id: str) -> None:
    """Connect once with a clean session: the broker drops what it kept for `client_id`."""
    conn = MqttConnection(parse_broker_url(url, ("mqtt",)), client_id, clean_session=True,
                          name="forget")
    conn.start()
    try:
        conn.connected.wait(10)
    finally:
        conn.stop()


def _beam(session: int) -> list[int]:
    """RabbitMQ's Erlang VM: the beam.smp in the session the server script started."""
    import os
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            if "(beam.smp)" in stat and int(stat.rsplit(")", 1)[1].split()[3]) == session:
                found.append(int(entry))
    return found


def share_rows(setup: Setup, runs: int, count: int) -> list[dict[str, Any]]:
    """One bridge against two in one share group, 128 B each way, alternating; the CPU
    each process used, to say what limits the pair."""
    setup.bridge.terminate()
    forget_session(setup.mosquitto.url, "bench-bridge")
    assert setup.rabbit.proc is not None and setup.mosquitto.proc is not None
    others = {"mosquitto": [setup.mosquitto.proc.pid], "rabbitmq": _beam(setup.rabbit.proc.pid)}
    rows = []
    for direction in ("up", "down"):
        per: dict[int, list[float]] = {1: [], 2: []}
        cpu: dict[int, dict[str, float]] = {1: {}, 2: {}}
        for run in range(runs):
            for n in (1, 2):
                group = uuid.uuid4().hex[:6]
                bridges = [BridgeProcess(setup.mosquitto.url, setup.rabbit.url,
                                         setup.work / f"share-{group}-{i}", "--prefix", PREFIX,
                                         "--share-group", group,
                                         client_id=f"share-{group}-{i}").start()
                           for i in range(n)]
                try:
                    for bridge in bridges:
                        bridge.wait_ready()
                    pids = {f"bridge {i + 1}": [b.proc.pid] for i, b in enumerate(bridges)
                            if b.proc is not None}
                    pids.update(others)
                    before = {k: sum(cpu_s(p) for p in v) for k, v in pids.items()}
                    began = time.monotonic()
                    per[n].append(one_run(setup, "bridge", direction, count, 128,
                                          900 + run * 10 + n))
                    took = time.monotonic() - began
                    for k, v in pids.items():
                        used = (sum(cpu_s(p) for p in v) - before[k]) / took
                        cpu[n][k] = cpu[n].get(k, 0.0) + used / runs
                finally:
                    for bridge in bridges:
                        bridge.terminate()
                        forget_session(setup.mosquitto.url, bridge.args[
                            bridge.args.index("--client-id") + 1])
        one, two = median(per[1]), median(per[2])
        rows.append({"direction": direction, "count": count, "one_runs": per[1],
                     "two_runs": per[2], "one_msg_s": one, "two_msg_s": two,
                     "ratio": two / one, "cores_one": cpu[1], "cores_two": cpu[2]})
        print(f"  item 1: share group {direction}: one {one:.0f}/s two {two:.0f}/s "
              f"ratio {two / one:.2f}; cores {cpu[2]}", flush=True)
    return rows


def item1(work: Path, runs: int, counts: dict[int, int]) -> dict[str, Any]:
    setup = Setup(work / "item1")
    rows: list[dict[str, Any]] = []
    share: list[dict[str, Any]] = []
    try:
        for size, count in counts.items():
            for direction in ("up", "down"):
                per: dict[str, list[float]] = {"bridge": [], "plugin": []}
                cpus: dict[str, list[dict[str, float]]] = {"bridge": [], "plugin": []}
                for run in range(runs):
                    for path in ("bridge", "plugin"):  # alternate, so drift hits both
                        used: dict[str, float] = {}
                        per[path].append(one_run(setup, path, direction, count, size,
                                                 len(rows) * 100 + run, used))
                        cpus[path].append(used)
                b, p = median(per["bridge"]), median(per["plugin"])
                cpu_us = {path: {k: round(median([c[k] for c in cs]), 1) for k in cs[0]}
                          for path, cs in cpus.items()}
                rows.append({"size": size, "direction": direction, "count": count,
                             "bridge_runs": per["bridge"], "plugin_runs": per["plugin"],
                             "bridge_msg_s": b, "plugin_msg_s": p, "ratio": b / p,
                             "cpu_us_per_msg": cpu_us})
                print(f"  item 1: {size} B {direction}: bridge {b:.0f}/s plugin {p:.0f}/s "
                      f"ratio {b / p:.2f}; CPU us/msg {cpu_us}", flush=True)
        share = share_rows(setup, runs, counts[min(counts)])
    finally:
        setup.stop()
    return {"rows": rows, "share": share, "runs": runs,
            "producer": "MQTT: QoS 1, 1000 in flight; AMQP: persistent, transactions of 500",
            "consumer": "AMQP: durable queue, prefetch 1000, ack each; MQTT: QoS 1 clean session"}


# --- item 6 --------------------------------------------------------------------------
class IntSink:
    """A lean AMQP consumer: the integer of each body, duplicates counted."""

    def __init__(self, url: str, exchange: str, binding: str) -> None:
        self.url, self.exchange, self.binding = url, exchange, binding
        self.queue = f"bench-ints-{uuid.uuid4().hex[:8]}"
        self.seen: set[int] = set()
        self.total = 0
        self.duplicates = 0
        self.last_at = 0.0
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        ch = conn.channel()
        ch.exchange_declare(self.exchange, "topic", durable=True)
        ch.queue_declare(self.queue, durable=True)
        ch.queue_bind(self.queue, self.exchange, self.binding)
        ch.basic_qos(prefetch_count=2000)
        unacked = [0, 0]  # count, latest delivery tag

        def on_message(channel: Any, method: Any, _props: Any, payload: bytes) -> None:
            start = payload.index(b'"n":') + 4
            n = int(payload[start:payload.index(b"}", start)])
            if n in self.seen:
                self.duplicates += 1
            else:
                self.seen.add(n)
                self.total += n
                self.last_at = time.monotonic()
            unacked[0] += 1
            unacked[1] = method.delivery_tag
            if unacked[0] >= 200:
                channel.basic_ack(method.delivery_tag, multiple=True)
                unacked[0] = 0

        ch.basic_consume(self.queue, on_message)
        self.ready.set()
        while not self.stop.is_set():
            conn.process_data_events(time_limit=0.1)
            if unacked[0]:
                ch.basic_ack(unacked[1], multiple=True)
                unacked[0] = 0
        ch.queue_delete(self.queue)
        conn.close()


def publish_chunked(url: str, messages: Iterator[tuple[str, bytes]],
                    chunk: int = 20000) -> None:
    """QoS 1 publishes, waiting for every PUBACK after each chunk. MqttConnection keys
    what is in flight by message id, which wraps at 65,535: with more queued at once,
    flush() returns while paho still holds messages, and stop() loses them."""
    conn = MqttConnection(parse_broker_url(url, ("mqtt",)), f"pub-{uuid.uuid4().hex[:8]}",
                          clean_session=True, name="mqtt-pub", max_inflight=1000)
    conn.start()
    try:
        assert conn.connected.wait(10), "publisher could not connect"
        while True:
            batch = list(itertools.islice(messages, chunk))
            if not batch:
                break
            for topic, payload in batch:
                conn.publish(topic, payload, 1)
            assert conn.flush(300), "the broker did not acknowledge every publish"
    finally:
        conn.stop()


def item6(work: Path, count: int) -> dict[str, Any]:
    setup = Setup(work / "item6")
    try:
        sink = IntSink(setup.rabbit.url, "edgerun.events", "node.*.updates")
        sink.thread.start()
        assert sink.ready.wait(30)
        messages = ((f"{PREFIX}/nodes/v{n % 100}/updates",
                     f'{{"v":1,"kind":"update","id":"i-{n}","node":"v{n % 100}","n":{n}}}'
                     .encode()) for n in range(1, count + 1))
        started = time.monotonic()
        publish_chunked(setup.mosquitto.url, messages)
        published = time.monotonic() - started
        deadline = time.monotonic() + 120
        while len(sink.seen) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        elapsed = sink.last_at - started
        sink.stop.set()
        sink.thread.join(30)
        expected = count * (count + 1) // 2
        return {"count": count, "unique": len(sink.seen), "sum": sink.total,
                "expected_sum": expected, "correct": sink.total == expected,
                "duplicates": sink.duplicates, "seconds": elapsed,
                "publish_seconds": published, "msg_s": count / elapsed,
                "path": "MQTT QoS 1 -> Mosquitto -> bridge -> RabbitMQ -> AMQP consumer"}
    finally:
        setup.stop()
