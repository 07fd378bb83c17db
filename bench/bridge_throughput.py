"""Throughput of edgerun-bridge each way: QoS 1 with publisher confirms, 128-byte bodies.

Not a test. Starts a private Mosquitto and RabbitMQ (as the tests do), runs the
bridge once so its MQTT session and queue exist, stops it, queues COUNT
messages for it on one side, starts it again and times the arrivals on the
other side, from the first to the last unique message (so the bridge's start-up
is not counted). Then the same the other way, then both ways at once. Also
the bridge process's CPU time per message (user + system, from /proc), a
figure that depends less on what else runs on the machine than the rates do.
PYTHONPATH picks the tree whose bridge runs, so one script compares commits:

    .venv/bin/python bench/bridge_throughput.py [--count 20000] [--size 128]
    PYTHONPATH=/tmp/old-tree .venv/bin/python bench/bridge_throughput.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(os.environ.get("PYTHONPATH") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from tests.bridgekit import (  # noqa: E402
    AmqpSink, BridgeProcess, MqttSink, body, publish_amqp, publish_mqtt,
)
from tests.brokers import Mosquitto  # noqa: E402
from tests.rabbit import Rabbit  # noqa: E402

# Mosquitto's default (20 messages in flight to a client) would be the MQTT->AMQP
# window; a bridge's broker should allow it a real one.
MOSQUITTO_EXTRA = "max_inflight_messages 1000\n"


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rate(sink: AmqpSink | MqttSink, count: int) -> float:
    assert sink.first_at is not None and sink.last_at is not None
    return (count - 1) / max(1e-9, sink.last_at - sink.first_at)


def run(mosquitto: Mosquitto, rabbit: Rabbit, workdir: Path, count: int, size: int,
        up: bool, down: bool, tag: str) -> tuple[float | None, float | None, float]:
    names = ["--prefix", f"b{tag}", "--tasks-exchange", f"tasks.{tag}",
             "--events-exchange", f"events.{tag}", "--tasks-queue", f"bridge.{tag}"]
    bridge = BridgeProcess(mosquitto.url, rabbit.url, workdir / tag, *names,
                           client_id=f"bench-{tag}").start()
    bridge.wait_ready()
    assert bridge.proc is not None
    startup = cpu_s(bridge.proc.pid)  # start-up with nothing to forward: not counted below
    assert bridge.terminate() == 0
    with AmqpSink(rabbit.url, f"events.{tag}", "node.*.updates") as events, \
            MqttSink(mosquitto.url, [f"b{tag}/nodes/+/tasks"]) as tasks:
        if up:
            publish_mqtt(mosquitto.url, [(f"b{tag}/nodes/n{i % 100}/updates",
                                          body(i, f"n{i % 100}", size=size))
                                         for i in range(count)])
        if down:
            publish_amqp(rabbit.url, f"tasks.{tag}", [(f"node.n{i % 100}",
                                                       body(i, f"n{i % 100}", "task", size))
                                                      for i in range(count)])
        bridge = BridgeProcess(mosquitto.url, rabbit.url, workdir / tag, *names,
                               client_id=f"bench-{tag}").start()
        try:
            assert bridge.proc is not None
            if up:
                assert events.wait_unique(count, 600), "MQTT->AMQP did not finish"
            if down:
                assert tasks.wait_unique(count, 600), "AMQP->MQTT did not finish"
            used = cpu_s(bridge.proc.pid) - startup
        finally:
            assert bridge.terminate() == 0
        messages = count * (int(up) + int(down))
        return (rate(events, count) if up else None, rate(tasks, count) if down else None,
                1e6 * used / messages)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rabbit = Rabbit(work / "rabbit").start()
        mosquitto = Mosquitto(work / "mosquitto", extra=MOSQUITTO_EXTRA).start()
        try:
            up, _, up_cpu = run(mosquitto, rabbit, work, args.count, args.size, True, False,
                                "up")
            _, down, down_cpu = run(mosquitto, rabbit, work, args.count, args.size, False, True,
                                    "down")
            both_up, both_down, both_cpu = run(mosquitto, rabbit, work, args.count, args.size,
                                               True, True, "both")
        finally:
            mosquitto.stop()
            rabbit.stop()
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}; {args.count} messages of {args.size} B each way")
    print(f"bridge code from {ROOT}; load average {os.getloadavg()[0]:.1f}")
    print(f"MQTT -> AMQP alone:   {up:8.0f} msg/s, bridge CPU {up_cpu:4.0f} us/msg")
    print(f"AMQP -> MQTT alone:   {down:8.0f} msg/s, bridge CPU {down_cpu:4.0f} us/msg")
    print(f"both ways at once:    {both_up:8.0f} msg/s up, {both_down:8.0f} msg/s down, "
          f"bridge CPU {both_cpu:4.0f} us/msg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
