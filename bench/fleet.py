"""Fleet operations' figures: a backlog to one node with and without pacing, a rollout.

`python bench/fleet.py [--tasks N] [--nodes N]`: a private Mosquitto, the scheduler
in-process (SQLite), real agents. Reports, asserts nothing:

1. N tasks (`true`) dispatched at once to one agent with --queue-size 64, pace 8
   (the default): seconds until all ended, tasks/s, how many ended busy.
2. The same with pacing out of the way (pace 100,000): how many the agent refuses
   busy - the problem pacing solves.
3. One task rolled out to M agents (one process) with --batch 10 and with --batch M:
   seconds until the rollout finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import mosquitto
from tests.brokers import wait_until
from tests.fleet_kit import AgentSpec, pool
from tests.scheduler_kit import Api, running_app, start_agent

FINAL = ("succeeded", "failed", "timed_out", "canceled", "rejected", "lost")


def backlog(url: str, tmp: Path, tasks: int, pace: int) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    with running_app(url, tmp, pace=pace, grace=60.0) as app:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        node = f"bench-{pace}"
        agent = start_agent(url, node, tmp, "--queue-size", "64", "--log-level", "warning")
        try:
            api.wait_node(node)
            start = time.monotonic()
            for _ in range(tasks):
                svc.dispatch([node], False, {"type": "shell", "command": "true"})

            def ended() -> int:
                counts = svc.store.count_by_state()
                return sum(counts.get(s, 0) for s in FINAL)
            wait_until(lambda: ended() >= tasks, 600, 0.05)
            seconds = time.monotonic() - start
            counts = svc.store.count_by_state()
        finally:
            agent.terminate()
    return {"tasks": tasks, "pace": pace, "seconds": round(seconds, 2),
            "tasks_per_s": round(tasks / seconds, 1), "states": counts}


def rollout(url: str, tmp: Path, nodes: int) -> list[dict[str, Any]]:
    out = []
    tmp.mkdir(parents=True, exist_ok=True)
    with running_app(url, tmp, grace=60.0) as app:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        agents = [AgentSpec(f"ro-{i:04d}") for i in range(nodes)]
        with pool(url, tmp / "agents", agents, api, timeout=300):
            for batch in (10, nodes):
                start = time.monotonic()
                made = svc.rollouts.create(["ro-*"], False,
                                                 {"type": "shell", "command": "true"},
                                                 {"batch": batch})
                rollout_id = str(made["id"])
                wait_until(lambda rid=rollout_id: svc.rollouts.show(rid)["state"]
                           == "finished", 600, 0.05)
                seconds = time.monotonic() - start
                counts = svc.rollouts.show(rollout_id)["counts"]
                out.append({"nodes": nodes, "batch": batch, "seconds": round(seconds, 2),
                            "succeeded": counts["succeeded"]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgerun-bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        broker = mosquitto(tmp / "mosquitto")
        try:
            results = {
                "paced": backlog(broker.url, tmp / "paced", args.tasks, 8),
                "unpaced": backlog(broker.url, tmp / "unpaced", args.tasks, 100_000),
                "rollout": rollout(broker.url, tmp / "rollout", args.nodes),
            }
        finally:
            broker.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
