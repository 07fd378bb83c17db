"""Item 8, part 2: the stall a user sees when a RabbitMQ node dies under a steady flow.

`python bench/failover.py [--runs N] [--rate R]` (or `stall(workdir, runs)` from
bench/cluster.py's item 8). A 3-node RabbitMQ cluster from deploy/rabbitmq/, the
bridge and `edgerun serve` with every node's URL and quorum queues, 20 real agents
(tests/agent_pool.py) behind a private Mosquitto. The scheduler dispatches `true` to
the agents at a steady rate; every few seconds the node leading the scheduler's queue
is killed -9, and started again later. Reported, per kill: the longest gap between two
completions the scheduler recorded (tasks' final `updated_at`) from 1 s before the
kill to 10 s after it, beside the longest gap of the quiet seconds before the first
kill; how long dispatch refused (503); and whether the bridge's or the scheduler's
connection was on the killed node. Asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.brokers import Mosquitto, wait_until  # noqa: E402
from tests.bridgekit import BridgeProcess  # noqa: E402
from tests.cluster import RabbitCluster  # noqa: E402
from tests.scheduler_kit import running_app  # noqa: E402

AGENTS = 20
QUIET_S = 4.0  # flow before the first kill
AFTER_S = 10.0  # flow after each kill, before the node is started again
FINAL = ("succeeded", "failed", "timed_out", "canceled", "rejected", "lost")


def _agents(url: str, prefix: str, workdir: Path) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "pool.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "tests.agent_pool", url, prefix, "0",
                                 str(AGENTS), str(workdir)], stdout=log, stderr=log, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})


class _Flow(threading.Thread):
    """Dispatches `true` to the agents in turn at `rate` a second; a refused dispatch is
    tried again at the next tick, and its refusal timed."""

    def __init__(self, service: Any, nodes: list[str], rate: float) -> None:
        super().__init__(name="flow", daemon=True)
        self.service, self.nodes, self.rate = service, nodes, rate
        self.sent: dict[str, str] = {}  # task id -> node
        self.refused: list[tuple[float, str]] = []  # (wall time, why)
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        tick = time.monotonic()
        while not self.halt.is_set():
            node = self.nodes[n % len(self.nodes)]
            tid = f"f{n:06d}"
            try:
                self.service.dispatch([node], False, {"type": "shell", "id": tid,
                                                      "timeout": 600, "command": ["true"]})
                self.sent[tid] = node
                n += 1
            except Exception as exc:  # 503 while no broker node is usable: timed
                self.refused.append((time.time(), type(exc).__name__))
            tick += 1.0 / self.rate
            self.halt.wait(max(0.0, tick - time.monotonic()))


def _completions(service: Any, sent: dict[str, str]) -> list[float]:
    times = []
    for tid, node in sent.items():
        task = service.store.get(node, tid)
        if task is not None and task.state in FINAL:
            times.append(datetime.fromisoformat(task.updated_at.replace("Z", "+00:00"))
                         .timestamp())
    return sorted(times)


def _longest_gap(times: list[float], start: float, end: float) -> float:
    inside = [t for t in times if start <= t <= end]
    return round(max((b - a for a, b in itertools.pairwise(inside)), default=0.0), 3)


def stall(workdir: Path, runs: int = 3, rate: float = 50.0) -> dict[str, Any]:
    cluster = RabbitCluster(workdir / "rabbits").start()
    mosquitto = Mosquitto(workdir / "mosquitto").start()
    urls = cluster.urls(0)
    bridge = BridgeProcess(mosquitto.url, urls, workdir / "bridge", "--queue-type", "quorum",
                           "--log-level", "info")
    pool: subprocess.Popen[bytes] | None = None
    kills: list[dict[str, Any]] = []
    try:
        with running_app(urls, workdir, queue_type="quorum", grace=600.0) as app:
            service = app.service
            assert service is not None
            bridge.start().wait_ready(60)
            pool = _agents(mosquitto.url, "fo-", workdir / "agents")
            nodes = [f"fo-{i:03d}" for i in range(AGENTS)]
            wait_until(lambda: service.store.count_nodes_by_state().get("online", 0)
                       == AGENTS, 120)
            flow = _Flow(service, nodes, rate)
            flow.start()
            began = time.time()
            time.sleep(QUIET_S)
            for _ in range(runs):
                leaders = cluster.leaders(next(n for n in cluster.nodes if n.proc and
                                               n.proc.poll() is None))
                victim = cluster.by_name(leaders[app.settings.queue])
                port = str(victim.port)
                on_victim = {"scheduler": str(service.health().get("broker_node")).endswith(port),
                             "bridge": str((bridge.health() or {}).get("amqp", {})
                                           .get("node", "")).endswith(port)}
                at = time.time()
                victim.kill()
                time.sleep(AFTER_S)
                victim.start()
                wait_until(lambda: len(cluster.running()) == 3, 120, 0.5)
                kills.append({"at": at, "connections_on_killed_node": on_victim,
                              "queue_leaders_on_killed_node": sorted(
                                  q for q, n in leaders.items() if n == victim.node)})
                time.sleep(3.0)
            flow.halt.set()
            flow.join()
            wait_until(lambda: len(_completions(service, flow.sent)) == len(flow.sent), 120, 1)
            times = _completions(service, flow.sent)
    finally:
        if pool is not None and pool.poll() is None:
            pool.send_signal(signal.SIGTERM)
            try:
                pool.wait(60)
            except subprocess.TimeoutExpired:
                pool.kill()
        if bridge.alive():
            bridge.terminate()
        mosquitto.stop()
        cluster.stop()
    for kill in kills:
        at = kill.pop("at")
        kill["stall_s"] = _longest_gap(times, at - 1.0, at + AFTER_S)
        refused = [t for t, _ in flow.refused if at - 1.0 <= t <= at + AFTER_S]
        kill["dispatch_refused"] = len(refused)
        kill["dispatch_refused_for_s"] = round(max(refused) - min(refused), 3) if refused else 0
    return {"rate_per_s": rate, "agents": AGENTS, "tasks": len(flow.sent),
            "completed": len(times),
            "quiet_longest_gap_s": _longest_gap(times, began + 1.0, began + QUIET_S),
            "kills": kills,
            "stall_s": [k["stall_s"] for k in kills]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgerun-bench-failover-") as tmp:
        result = stall(Path(tmp), args.runs, args.rate)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
