"""Fairness of edgerun-bridge: quiet nodes' update latency with and without one node
flooding live output.

Not a test. A private Mosquitto, RabbitMQ and bridge (as the tests start them);
100 quiet nodes' updates (QoS 1, 128 B, paced at RATE/s in all, each carrying its
send time) are timed from the MQTT publish to the AMQP consumer, first for SECONDS
alone, then for SECONDS while one node floods its output topic: `--flood agent`
(the default) is a real agent running `yes`, writing live output as fast as it
can (QoS 0, 16 KiB chunks, its own 8 MiB budget); `--flood c` is `mosquitto_pub
-l` writing 16 KiB messages as fast as a C publisher can (far beyond any agent).
Prints p50/p99 of both phases, their ratio, what the bridge dropped (over_budget)
and forwarded of the flood, and whether every update arrived.

    .venv/bin/python bench/fairness.py [--rate 200] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(os.environ.get("PYTHONPATH") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from edgerun.mqtt import MqttConnection  # noqa: E402
from edgerun.settings import parse_broker_url  # noqa: E402
from tests.bridgekit import AmqpSink, BridgeProcess  # noqa: E402
from tests.brokers import Mosquitto  # noqa: E402
from tests.mqttkit import AgentProcess, shell  # noqa: E402
from tests.rabbit import Rabbit  # noqa: E402

CHUNK = 16 * 1024


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def phase(url: str, sink: TimedSink, rate: float, seconds: float, tag: str) -> dict[str, float]:
    conn = MqttConnection(parse_broker_url(url, ("mqtt",)), f"quiet-{tag}", clean_session=True,
                          name="quiet", max_inflight=1000)
    conn.start()
    assert conn.connected.wait(10)
    sent: dict[bytes, float] = {}
    began, n = time.monotonic(), 0
    try:
        while (now := time.monotonic()) < began + seconds:
            due = began + n / rate
            if due > now:
                time.sleep(due - now)
            node = f"q{n % 100:03d}"
            body = json.dumps({"v": 1, "kind": "update", "id": f"{tag}-{n}", "node": node,
                               "state": "running", "at": "2026-11-22T06:00:00.000Z"}).encode()
            sent[body] = time.monotonic()
            conn.publish(f"fair/nodes/{node}/updates", body, 1)
            n += 1
        assert conn.flush(60)
    finally:
        conn.stop()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(b in sink.arrived for b in sent):
        time.sleep(0.1)
    latencies = [1000 * (sink.arrived[b] - t) for b, t in sent.items() if b in sink.arrived]
    return {"sent": len(sent), "arrived": len(latencies), "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99), "max_ms": max(latencies)}


class TimedSink(AmqpSink):
    def __init__(self, *args: str) -> None:
        super().__init__(*args)
        self.arrived: dict[bytes, float] = {}

    def _record(self, where: str, payload: bytes, props: object = None) -> None:
        self.arrived.setdefault(payload, time.monotonic())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--flood", choices=("agent", "c"), default="agent")
    args = parser.parse_args()
    pub = shutil.which("mosquitto_pub")
    assert pub, "mosquitto_pub is needed for the flood"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rabbit = Rabbit(work / "rabbit").start()
        mosquitto = Mosquitto(work / "mosquitto", extra="max_inflight_messages 1000\n").start()
        bridge = BridgeProcess(mosquitto.url, rabbit.url, work / "bridge", "--prefix", "fair",
                               client_id="fair-bridge").start()
        flood: subprocess.Popen[bytes] | None = None
        try:
            bridge.wait_ready()
            sink = TimedSink(rabbit.url, "edgerun.events", "node.*.updates")
            with sink:
                quiet = phase(mosquitto.url, sink, args.rate, args.seconds, "alone")
                line = b"x" * (CHUNK - 1) + b"\n"
                stop = threading.Event()
                if args.flood == "agent":
                    agent = AgentProcess(mosquitto.url, "flooder", work / "agent", "--prefix",
                                         "fair").start()
                    flood = agent.proc
                    time.sleep(2)  # online
                    task = json.dumps(shell("flood", "yes edgerun-flood-line", timeout=600))
                    conn = MqttConnection(parse_broker_url(mosquitto.url, ("mqtt",)), "boss",
                                          clean_session=True, name="boss")
                    conn.start()
                    assert conn.connected.wait(10)
                    conn.publish("fair/nodes/flooder/tasks", task.encode(), 1)
                    assert conn.flush(10)
                    conn.stop()
                else:
                    flood = subprocess.Popen(
                        [pub, "-h", "127.0.0.1", "-p", str(mosquitto.port), "-q", "0", "-l",
                         "-t", "fair/nodes/flooder/output"], stdin=subprocess.PIPE)

                def feed() -> None:
                    assert flood is not None and flood.stdin is not None
                    try:
                        while not stop.is_set():
                            flood.stdin.write(line * 64)
                    except (BrokenPipeError, ValueError):
                        pass

                if args.flood == "c":
                    threading.Thread(target=feed, daemon=True).start()
                time.sleep(1)  # the flood is on
                flooded = phase(mosquitto.url, sink, args.rate, args.seconds, "flood")
                stop.set()
            dropped = bridge.metric("edgerun_bridge_dropped_total", route="output",
                                    reason="over_budget")
            forwarded = bridge.metric("edgerun_bridge_forwarded_total", route="output",
                                      direction="mqtt_to_amqp")
        finally:
            if flood is not None:
                flood.kill()
                flood.wait()
            bridge.terminate()
            mosquitto.stop()
            rabbit.stop()
    print(f"bridge code from {ROOT}; load average {os.getloadavg()[0]:.1f}; "
          f"{args.rate:.0f} updates/s from 100 quiet nodes, {args.seconds:.0f} s per phase, "
          f"flood: {args.flood}")
    for name, row in (("alone", quiet), ("with a flood", flooded)):
        print(f"{name:>13}: p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  "
              f"max {row['max_ms']:6.1f} ms  arrived {row['arrived']}/{row['sent']}")
    print(f"p99 ratio flood/alone: {flooded['p99_ms'] / quiet['p99_ms']:.2f}; flood output "
          f"messages forwarded {forwarded:.0f}, dropped over budget {dropped:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
