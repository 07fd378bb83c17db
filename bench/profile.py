"""Where the missed targets go: `python bench/profile.py [bridge|roundtrip|send]`.

- bridge: py-spy samples the bridge process while 30,000 128-byte messages go
  MQTT -> AMQP and 30,000 AMQP -> MQTT; prints the functions with the most
  samples (own time, and total time of edgerun's own functions).
- roundtrip: one real agent, 200 tasks of `true` one at a time in direct mode;
  splits each round trip with the agent's own `at` stamps (1 ms resolution)
  into dispatch -> accepted, accepted -> running, running -> succeeded and
  succeeded -> the scheduler's callback; py-spy samples the agent meanwhile.
  Also the agent's CPU time (utime + stime) per task, which other load on the
  machine disturbs far less than latency, and 50 more tasks 50 ms apart
  (sporadic tasks: caches cold, the kernel's cgroup and RCU state idle).
- send: how many tasks per second AmqpMessenger.send publishes (confirms).
Writes bench/results/profile.json. Not part of ./build.sh bench: it is slow
and needs ptrace rights for py-spy.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, median, mosquitto
from tests.bridgekit import AmqpSink, body, publish_amqp, publish_mqtt

PY_SPY = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"


def spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", "200", "--format", "raw", "--threads", "--nonblocking",
                             "--output", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        threads[frames[0]] += count
        if len(frames) > 1:
            own[frames[-1]] += count
        for frame in set(frames[1:]):
            if "/edgerun/" in frame or "/bridge/" in frame or "/agent/" in frame \
                    or "/scheduler/" in frame:
                total[frame] += count
    pct = lambda c: round(100 * c / max(1, samples), 1)  # noqa: E731
    return {"samples": samples,
            "threads": {k: pct(v) for k, v in threads.most_common(8)},
            "own_pct": {k: pct(v) for k, v in own.most_common(top)},
            "project_total_pct": {k: pct(v) for k, v in total.most_common(top)}}


def bridge(work: Path) -> dict[str, Any]:
    from bench.throughput import PREFIX, Setup
    setup = Setup(work / "bridge")
    try:
        assert setup.bridge.proc is not None
        raw = work / "bridge.raw"
        count = 30000
        prof = spy(setup.bridge.proc.pid, 20, raw)
        time.sleep(0.5)
        with AmqpSink(setup.rabbit.url, "edgerun.events", "node.*.updates") as sink:
            started = time.monotonic()
            publish_mqtt(setup.mosquitto.url, [(f"{PREFIX}/nodes/p{i % 50}/updates",
                                                body(i, f"p{i % 50}")) for i in range(count)])
            sink.wait_unique(count, 120)
            up = count / (time.monotonic() - started)
        publish_amqp(setup.rabbit.url, "edgerun.tasks",
                     [(f"node.p{i % 50}", body(i, f"p{i % 50}", "task")) for i in range(count)])
        prof.wait(60)
        cpu = subprocess.run(["ps", "-o", "pcpu=", "-p", str(setup.bridge.proc.pid)],
                             capture_output=True, text=True, check=False).stdout.strip()
        return {"up_msg_s": up, "bridge_cpu_pct_lifetime": cpu, **summarise(raw)}
    finally:
        setup.stop()


def _ms(at: str) -> float:
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() * 1000


def roundtrip(work: Path, tasks: int = 200) -> dict[str, Any]:
    import os
    import uuid

    from edgerun.protocol import Channel, ShellTask, encode
    from edgerun.scheduler.messaging import Incoming
    from edgerun.scheduler.messaging.mqtt import MqttMessenger
    from edgerun.settings import parse_broker_url
    broker = mosquitto(work / "rt-mosquitto")
    agent = subprocess.Popen([sys.executable, "-m", "edgerun.agent",
                              "--broker", broker.url, "--node",
                              "prof-1", "--state-dir", str(work / "agent"), "--log-level",
                              "warning"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    stamps: dict[str, dict[str, float]] = collections.defaultdict(dict)
    done = threading.Event()
    messenger = MqttMessenger(parse_broker_url(broker.url, ("mqtt",)), record_external=False,
                              client_id=f"prof-{uuid.uuid4().hex[:6]}", events_topic="")

    def deliver(msg: Incoming) -> None:
        if msg.channel == Channel.UPDATES:
            update = json.loads(msg.payload)
            entry = stamps[update["id"]]
            entry[update["state"]] = _ms(update["at"])
            if update["state"] == "succeeded":
                entry["received"] = time.time() * 1000
                entry["duration_ms"] = update.get("duration_s", 0) * 1000
                done.set()
        messenger.ack(msg)
    try:
        messenger.start(deliver)
        assert messenger.connected.wait(10)
        time.sleep(2)
        raw = work / "agent.raw"
        prof = spy(agent.pid, 10, raw)
        time.sleep(0.5)

        def run(count: int, pause: float) -> list[str]:
            ids = []
            for _ in range(count):
                task_id = uuid.uuid4().hex
                done.clear()
                stamps[task_id]["sent"] = time.time() * 1000
                messenger.send("prof-1", encode(ShellTask(id=task_id, command="true")))
                done.wait(10)
                ids.append(task_id)
                time.sleep(pause)
            return ids
        cpu_before = _cpu_s(agent.pid)
        run(tasks, 0.0)
        cpu_ms = (_cpu_s(agent.pid) - cpu_before) * 1000 / tasks
        prof.wait(30)
        sporadic = [stamps.pop(i) for i in run(50, 0.05)]
        sporadic_ms = sorted(s["received"] - s["sent"] for s in sporadic if "received" in s)
        phases: dict[str, list[float]] = collections.defaultdict(list)
        for s in stamps.values():
            if "received" not in s:
                continue
            phases["dispatch -> accepted"].append(s["accepted"] - s["sent"])
            phases["accepted -> running"].append(s["running"] - s["accepted"])
            phases["running -> succeeded"].append(s["succeeded"] - s["running"])
            phases["  of which the command (duration_s)"].append(s["duration_ms"])
            phases["succeeded -> scheduler callback"].append(s["received"] - s["succeeded"])
            phases["total"].append(s["received"] - s["sent"])
        return {"tasks": tasks, "agent_cpu_ms_per_task": round(cpu_ms, 3),
                "sporadic_50ms_apart": {
                    "median_ms": round(median(sporadic_ms), 2) if sporadic_ms else None,
                    "max_ms": round(sporadic_ms[-1], 2) if sporadic_ms else None},
                "median_ms": {k: round(median(v), 2) for k, v in phases.items()},
                "p99_ms": {k: round(sorted(v)[int(0.99 * (len(v) - 1))], 2)
                           for k, v in phases.items()},
                "agent_profile": summarise(raw) if raw.exists() else {}}
    finally:
        messenger.stop()
        agent.terminate()
        agent.wait(30)
        broker.stop()


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    import os
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send(work: Path, count: int = 2000) -> dict[str, Any]:
    import uuid

    from edgerun.scheduler.messaging.amqp import AmqpMessenger
    from edgerun.settings import parse_broker_url
    from tests.rabbit import Rabbit
    rabbit = Rabbit(work / "send-rabbit").start()
    try:
        messenger = AmqpMessenger(parse_broker_url(rabbit.url, ("amqp",)), record_external=False,
                                  queue=f"prof-{uuid.uuid4().hex[:6]}", audit_exchange="")
        messenger.start(lambda msg: messenger.ack(msg))
        assert messenger.connected.wait(10)
        left = threading.Semaphore(0)
        started = time.monotonic()
        for i in range(count):
            messenger.send(f"n{i % 10}", b'{"v":1}', on_done=left.release)
        for _ in range(count):
            left.acquire(timeout=60)
        rate = count / (time.monotonic() - started)
        messenger.stop()
        return {"sends": count, "sends_per_s": rate}
    finally:
        rabbit.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="*", help="bridge, roundtrip, send (default: all)")
    args = parser.parse_args()
    args.what = args.what or ["bridge", "roundtrip", "send"]
    for what in args.what:
        if what not in ("bridge", "roundtrip", "send"):
            parser.error(f"unknown profile {what!r}: choose from bridge, roundtrip, send")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "profile.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for what in args.what:
            results[what] = {"bridge": bridge, "roundtrip": roundtrip, "send": send}[what](
                Path(tmp))
            print(json.dumps({what: results[what]}, indent=1), flush=True)
    path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
