"""Issue 22: how long a dispatch request takes. POST /v1/jobs with 1,000 targets and
POST /v1/tasks with 10 targets against a real `edgerun serve`, on SQLite and PostgreSQL,
with 1,000 simulated nodes online (bench/swarm.py) that answer what is sent.

`python bench/apilatency.py [--jobs J] [--tasks T] [--nodes N] [--store ...]` (also part
of item 11 of bench/run.py). One keep-alive connection, one request at a time; after
each request the bench waits until its tasks are final, so that each request meets an
idle service (what it costs, not what the fan-out before it costs). CPU per request:
serve's (and its PostgreSQL backends') CPU from /proc over the requests and the work they
caused, divided by their number. Targets: p50 <= 200 ms (jobs), <= 20 ms (tasks).
Reports, asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import mosquitto
from bench.controlplane import Serve, _drop, _pg_database
from bench.fanout import cpu_s, pg_backends
from bench.swarmkit import SwarmGroup
from bench.workqueue import _one, _pct
from tests.brokers import wait_until

JOB_TARGET_MS = 200.0
TASK_TARGET_MS = 20.0
IDLE_S = 4.0  # a connection idle this long is opened again before the next request


def _series(port: int, token: str, db: str, pid: int, bodies: list[tuple[str, bytes, int]]
            ) -> dict[str, Any]:
    """POST each (path, body, tasks it makes); ms per request, CPU ms per request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    backends = pg_backends(db)
    cpu0 = cpu_s(pid), sum(cpu_s(p) for p in backends)
    times: list[float] = []
    statuses: dict[int, int] = {}
    done = _one(db, "SELECT COUNT(*) FROM tasks WHERE state='succeeded'")
    used = time.monotonic()
    for path, body, made in bodies:
        if time.monotonic() - used > IDLE_S:  # serve (uvicorn) closes a keep-alive after 5 s
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.connect()  # outside the timed part, as a kept connection would be
        t0 = time.monotonic()
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        resp.read()
        used = time.monotonic()  # serve's keep-alive timer starts at its answer
        times.append((used - t0) * 1000)
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        if resp.status == 201:
            done += made
            wait_until(lambda d=done: _one(  # type: ignore[misc]
                db, "SELECT COUNT(*) FROM tasks WHERE state='succeeded'") >= d, 120, 0.05)
    cpu1 = cpu_s(pid), sum(cpu_s(p) for p in backends)
    conn.close()
    n = len(bodies)
    return {"n": n, "statuses": statuses, "p50_ms": round(_pct(times, 50) or 0, 1),
            "p99_ms": round(_pct(times, 99) or 0, 1), "max_ms": round(max(times), 1),
            "serve_cpu_ms_per_request": round((cpu1[0] - cpu0[0]) * 1000 / n, 1),
            "db_cpu_ms_per_request": round((cpu1[1] - cpu0[1]) * 1000 / n, 1)
            if backends else None}


def post_latency(tmp: Path, broker_url: str, db: str, nodes: int, jobs: int,
                 tasks: int) -> dict[str, Any]:
    serve = Serve(tmp, broker_url, db)
    swarm = SwarmGroup(broker_url, nodes, node_prefix="pl")
    try:
        swarm.wait_ready(300)
        wait_until(lambda: _one(db, "SELECT COUNT(*) FROM nodes WHERE state='online'")
                   >= nodes, 300, 0.2)
        token = (serve.dir / "token").read_text().strip()
        names = swarm.nodes
        task_bodies = [("/v1/tasks", json.dumps(
            {"targets": [names[(10 * i + k) % len(names)] for k in range(10)],
             "task": {"type": "shell", "command": "true"}}).encode(), 10)
            for i in range(tasks)]
        job_bodies = [("/v1/jobs", json.dumps(
            {"targets": names[:1000], "steps": [{"type": "shell", "command": "true"}]}
        ).encode(), min(1000, len(names))) for _ in range(jobs)]
        return {"nodes": nodes,
                "tasks_10": _series(serve.port, token, db, serve.proc.pid, task_bodies),
                "jobs_1000": _series(serve.port, token, db, serve.proc.pid, job_bodies)}
    finally:
        swarm.stop()
        serve.stop()


def run(tmp: Path, *, nodes: int = 1000, jobs: int = 5, tasks: int = 100,
        stores: tuple[str, ...] = ("sqlite", "postgresql")) -> dict[str, Any]:
    out: dict[str, Any] = {}
    broker = mosquitto(tmp / "mosquitto-post")
    try:
        for label in stores:
            if label == "sqlite":
                out[label] = post_latency(tmp, broker.url, str(tmp / "post.db"), nodes, jobs,
                                          tasks)
            else:
                name, pg = _pg_database()
                try:
                    out[label] = post_latency(tmp, broker.url, pg, nodes, jobs, tasks)
                finally:
                    _drop(name)
            print(json.dumps({label: out[label]}), flush=True)
    finally:
        broker.stop()
    return out


def render(r: dict[str, Any]) -> list[str]:
    nodes = next(iter(r.values()))["nodes"] if r else 0
    lines = ["### POST latency", "",
             "One request at a time on a keep-alive connection, each after the previous "
             f"one's tasks are final; {nodes:,} simulated nodes online. CPU: per request, "
             "including the fan-out it caused.", "",
             "| store | request | n | p50 ms | p99 ms | max ms | serve CPU ms | db CPU ms | "
             "target |", "|---|---|---|---|---|---|---|---|---|"]
    for label, x in r.items():
        for key, what, target in (("jobs_1000", "POST /v1/jobs, 1,000 targets", JOB_TARGET_MS),
                                  ("tasks_10", "POST /v1/tasks, 10 targets", TASK_TARGET_MS)):
            s = x[key]
            lines.append(f"| {label} | {what} | {s['n']} | {s['p50_ms']} | {s['p99_ms']} | "
                         f"{s['max_ms']} | {s['serve_cpu_ms_per_request']} | "
                         f"{s['db_cpu_ms_per_request'] or '-'} | p50 <= {target:g}: "
                         f"{'met' if s['p50_ms'] <= target else '**missed**'} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args(argv)
    stores = ("sqlite", "postgresql") if args.store == "both" else (args.store,)
    with tempfile.TemporaryDirectory(prefix="edgerun-post-") as tmp:
        out = run(Path(tmp), nodes=args.nodes, jobs=args.jobs, tasks=args.tasks, stores=stores)
    print("\n".join(render(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
