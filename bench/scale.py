"""Items 3 and 4: thousands of node identities, and churn while tasks flow.

Item 3, for each node count, two fresh set-ups side by side:
- bridge: swarm -> Mosquitto <- edgerun-bridge -> RabbitMQ; tasks published to
  `edgerun.tasks` (key `node.N`), results read from `edgerun.events`.
- plugin: swarm -> RabbitMQ's MQTT plugin; tasks published to the plugin's
  exchange (key `edgerun.nodes.N.tasks`), results read from it.
One task per node is published at once (transactions of 500) and the clock
stops when every node's `succeeded` has reached the AMQP consumer.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pika

from bench.common import PluginRabbit, cpu_s, median, mosquitto, rss_mib, tree_rss_mib
from bench.swarmkit import Finals, PacedPublisher, SwarmGroup, publish_tasks
from tests.bridgekit import BridgeProcess
from tests.rabbit import Rabbit

PLUGIN_EXCHANGE = "bench.mqtt"


def rabbit_memory_mib(rabbit: Rabbit) -> float:
    """`erlang:memory(total)`: what the VM has allocated, not what is resident.

    With the MQTT plugin it is mostly `binary`: each connection's port gets a
    user-level buffer as large as the socket's send buffer (about 3.8 MiB here), which
    is allocated but never touched, so it reaches 4 GiB for 1,000 nodes while the
    VM's RSS is about 450 MiB. Memory figures are the RSS; this one is context.
    """
    out = rabbit.ctl("eval", "erlang:memory(total).").strip().rstrip(".")
    return int(out) / 2**20


def rabbit_binary_mib(rabbit: Rabbit) -> float:
    """`erlang:memory(binary)`, the part of the total the port buffers above are in."""
    out = rabbit.ctl("eval", "erlang:memory(binary).").strip().rstrip(".")
    return int(out) / 2**20


def rabbit_rss(rabbit: Rabbit) -> dict[str, float]:
    """Resident MiB: the Erlang VM alone (what `ps -o rss` of beam.smp says) and the
    node's whole process tree (start script, epmd helpers, inet_gethost)."""
    if rabbit.proc is None:
        return {"rabbit_rss_mib": 0.0, "rabbit_beam_rss_mib": 0.0}
    return {"rabbit_rss_mib": tree_rss_mib(rabbit.proc.pid),
            "rabbit_beam_rss_mib": rss_mib(_beam_pid(rabbit.proc.pid))}


def rabbit_fds(rabbit: Rabbit) -> str:
    return rabbit.ctl("eval", "file_handle_cache:ulimit().").strip()


class Peak:
    """The largest RSS of a process, sampled every 100 ms while it runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_mib(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(2)
        return self.peak


def fan_out(rabbit: Rabbit, exchange: str, key: Any, events: str, binding: str,
            nodes: list[str], runs: int, timeout: float) -> list[float]:
    times = []
    with Finals(rabbit.url, events, binding) as finals:
        for run in range(runs):
            ids = [f"fan{run}-{node}" for node in nodes]
            started = time.monotonic()
            publish_tasks(rabbit.url, exchange, [(key(n), i) for n, i in zip(nodes, ids,
                                                                              strict=True)])
            if not finals.wait(ids, timeout):
                raise RuntimeError(f"fan-out: {finals.count(ids)}/{len(ids)} came back")
            times.append(max(finals.done[i] for i in ids) - started)
    return times


def scale_bridge(work: Path, n: int, runs: int) -> dict[str, Any]:
    rabbit = Rabbit(work / "rabbit").start()
    broker = mosquitto(work / "mosquitto")
    bridge = BridgeProcess(broker.url, rabbit.url, work / "bridge").start()
    swarm = None
    try:
        bridge.wait_ready()
        assert bridge.proc is not None
        base = {"bridge_rss_mib": rss_mib(bridge.proc.pid),
                "rabbit_mem_mib": rabbit_memory_mib(rabbit), "queues": len(rabbit.queues())}
        swarm = SwarmGroup(broker.url, n)
        connect_s = swarm.wait_ready(300)
        time.sleep(2)
        idle = {"bridge_rss_mib": rss_mib(bridge.proc.pid),
                "rabbit_mem_mib": rabbit_memory_mib(rabbit),
                "rabbit_binary_mib": rabbit_binary_mib(rabbit), **rabbit_rss(rabbit),
                "mosquitto_rss_mib": rss_mib(broker.proc.pid) if broker.proc else 0.0,
                "queues": len(rabbit.queues())}
        peak = Peak(bridge.proc.pid)
        times = fan_out(rabbit, "edgerun.tasks", lambda node: f"node.{node}", "edgerun.events",
                        "node.*.updates", swarm.nodes, runs, 120 + n / 50)
        errors = swarm.totals().get("errors", 0)
        return {"nodes": n, "connect_s": connect_s, "fanout_runs_s": times,
                "fanout_s": median(times), "before_nodes": base, "idle": idle,
                "bridge_peak_rss_mib": peak.stop(), "queues_after": len(rabbit.queues()),
                "rabbit_mem_after_mib": rabbit_memory_mib(rabbit), "swarm_errors": errors,
                "swarm_processes": swarm.processes}
    finally:
        if swarm is not None:
            swarm.stop()
        bridge.terminate(60)
        broker.stop()
        rabbit.stop()


def scale_plugin(work: Path, n: int, runs: int) -> dict[str, Any]:
    rabbit = PluginRabbit(work / "rabbit", exchange=PLUGIN_EXCHANGE).start()
    swarm = None
    try:
        conn = pika.BlockingConnection(pika.URLParameters(rabbit.url))
        conn.channel().exchange_declare(PLUGIN_EXCHANGE, "topic", durable=True)
        conn.close()
        base = {"rabbit_mem_mib": rabbit_memory_mib(rabbit), "queues": len(rabbit.queues())}
        swarm = SwarmGroup(rabbit.mqtt_url, n, connect_rate=1000.0)
        connect_s = swarm.wait_ready(300)
        time.sleep(2)
        idle = {"rabbit_mem_mib": rabbit_memory_mib(rabbit),
                "rabbit_binary_mib": rabbit_binary_mib(rabbit), **rabbit_rss(rabbit),
                "queues": len(rabbit.queues())}
        times = fan_out(rabbit, PLUGIN_EXCHANGE, lambda node: f"edgerun.nodes.{node}.tasks",
                        PLUGIN_EXCHANGE, "edgerun.nodes.*.updates", swarm.nodes, runs,
                        120 + n / 50)
        return {"nodes": n, "connect_s": connect_s, "fanout_runs_s": times,
                "fanout_s": median(times), "before_nodes": base, "idle": idle,
                "queues_after": len(rabbit.queues()), "fds": rabbit_fds(rabbit),
                "rabbit_mem_after_mib": rabbit_memory_mib(rabbit),
                "swarm_errors": swarm.totals().get("errors", 0),
                "swarm_processes": swarm.processes}
    finally:
        if swarm is not None:
            swarm.stop()
        rabbit.stop()


def _rabbit_line(idle: dict[str, Any]) -> str:
    return (f"rabbit RSS {idle['rabbit_rss_mib']:.0f} MiB (beam.smp "
            f"{idle['rabbit_beam_rss_mib']:.0f}; erlang:memory allocated "
            f"{idle['rabbit_mem_mib']:.0f}, of it binary {idle['rabbit_binary_mib']:.0f})")


def item3(work: Path, counts: list[int], runs: int) -> dict[str, Any]:
    rows = []
    for n in counts:
        b = scale_bridge(work / f"item3-bridge-{n}", n, runs)
        print(f"  item 3: bridge {n} nodes: fan-out {b['fanout_s']:.2f} s, bridge RSS "
              f"{b['idle']['bridge_rss_mib']:.0f} MiB, queues {b['idle']['queues']}, "
              f"{_rabbit_line(b['idle'])}", flush=True)
        p = scale_plugin(work / f"item3-plugin-{n}", n, runs)
        print(f"  item 3: plugin {n} nodes: fan-out {p['fanout_s']:.2f} s, queues "
              f"{p['idle']['queues']}, {_rabbit_line(p['idle'])}", flush=True)
        rows.append({"nodes": n, "bridge": b, "plugin": p,
                     "fanout_ratio": p["fanout_s"] / b["fanout_s"]})
    return {"rows": rows, "runs": runs}


# --- item 4 --------------------------------------------------------------------------
def churn_step(rabbit: Rabbit, broker_url: str, stable: list[str], rate: float,
               seconds: float, task_rate: float, index: int,
               watch: dict[str, int]) -> dict[str, Any]:
    # a node must leave, reconnect and resubscribe before it can churn again: a pool of
    # four seconds' worth keeps the generator from starving when connects slow down
    pool = max(400, int(rate * 4))
    churners = SwarmGroup(broker_url, pool, node_prefix=f"c{index}x", churn_rate=rate,
                          churn_from=0, duration=seconds + 120,
                          processes=max(2, -(-pool // 2500)))
    try:
        churners.wait_ready(120)
        before = [dict(x) for x in churners.latest]
        with Finals(rabbit.url, "edgerun.events", "node.*.updates") as finals:
            publisher = PacedPublisher(rabbit.url, "edgerun.tasks",
                                       [f"node.{n}" for n in stable], task_rate, seconds).start()
            started = time.monotonic()
            cpu0 = {name: cpu_s(pid) for name, pid in watch.items()}
            swarm0 = sum(cpu_s(pid) for pid in churners.pids())
            time.sleep(seconds)
            ids = publisher.stop()
            elapsed = time.monotonic() - started
            cpu = {name: (cpu_s(pid) - cpu0[name]) / elapsed for name, pid in watch.items()}
            cpu["churn_swarm"] = (sum(cpu_s(pid) for pid in churners.pids()) - swarm0) / elapsed
            time.sleep(1.1)  # one more report from each swarm process
            during = churners.totals()
            all_done = finals.wait(ids, 30)
            done = finals.count(ids)
        after = churners.latest
        events = during.get("churn_events", 0) - sum(b.get("churn_events", 0) for b in before)
        connects = during.get("connects", 0) - sum(b.get("connects", 0) for b in before)
        errors = int(during.get("errors", 0))
        # each process's own clock, so the once-a-second reports do not skew the rate
        achieved = sum((a.get("connects", 0) - b.get("connects", 0))
                       / max(1e-9, a.get("t", 0) - b.get("t", 0))
                       for a, b in zip(after, before, strict=True))
        held = all_done and errors == 0 and publisher.errors == 0 and achieved >= 0.9 * rate
        return {"target_rate": rate, "churn_events": events, "connects": connects,
                "achieved_connect_rate": achieved, "swarm_errors": errors,
                "tasks_sent": len(ids), "tasks_succeeded": done,
                "publish_errors": publisher.errors, "held": held, "pool": pool,
                "cpu_cores_used": cpu,
                "seconds": elapsed}
    finally:
        churners.stop()


def _beam_pid(pid: int) -> int:
    """The Erlang VM under the rabbitmq-server script (the script itself if not found)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "comm").read_text().strip()
                if cmd.startswith("beam") and os.getsid(int(entry.name)) == os.getsid(pid):
                    return int(entry.name)
            except OSError:
                continue
    return pid


def item4(work: Path, rates: list[float], seconds: float, stable_n: int,
          task_rate: float) -> dict[str, Any]:
    rabbit = Rabbit(work / "item4" / "rabbit").start()
    broker = mosquitto(work / "item4" / "mosquitto")
    bridge = BridgeProcess(broker.url, rabbit.url, work / "item4" / "bridge").start()
    stable = None
    steps = []
    try:
        bridge.wait_ready()
        stable = SwarmGroup(broker.url, stable_n, node_prefix="k")
        stable.wait_ready(120)
        assert bridge.proc is not None and broker.proc is not None and rabbit.proc is not None
        watch = {"bridge": bridge.proc.pid, "mosquitto": broker.proc.pid,
                 "rabbitmq": _beam_pid(rabbit.proc.pid)}
        for index, rate in enumerate(rates):
            step = churn_step(rabbit, broker.url, stable.nodes, rate, seconds, task_rate, index,
                              watch)
            steps.append(step)
            print(f"  item 4: churn {rate:.0f}/s -> {step['achieved_connect_rate']:.0f}/s "
                  f"connects, tasks {step['tasks_succeeded']}/{step['tasks_sent']}, errors "
                  f"{step['swarm_errors']}, held {step['held']}", flush=True)
            if not step["held"]:
                break
        held = [s["target_rate"] for s in steps if s["held"]]
        return {"steps": steps, "held_rate": max(held) if held else 0.0,
                "stable_nodes": stable_n, "task_rate": task_rate, "seconds_per_step": seconds,
                "bridge_alive": bridge.alive()}
    finally:
        if stable is not None:
            stable.stop()
        bridge.terminate(60)
        broker.stop()
        rabbit.stop()
