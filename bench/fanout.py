"""Issue 22: a fan-out through `edgerun serve` to thousands of simulated nodes.

`python bench/fanout.py [--nodes N] [--rounds R] [--store sqlite|postgresql|both]`:
a private Mosquitto, one `serve` (a process), bench/swarm.py's simulated nodes (one
paho client each, answering accepted, running, succeeded with empty output as the
contract says), then R times `edgerun run 'sw*' -- true` as a real CLI process.

Per round: seconds until the last final is recorded in the store, seconds until
`run` exits, tasks/s, and the CPU per task of `serve` and of its PostgreSQL backends
(from /proc, the whole round). Also: seconds until the store knows every node online.
Reports, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, mosquitto
from bench.controlplane import Serve, _drop, _pg_database
from bench.swarmkit import SwarmGroup
from tests.brokers import wait_until

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def pg_backends(db: str) -> list[int]:
    if not db.startswith("postgresql"):
        return []
    import psycopg
    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname=current_database() "
                            "AND application_name='edgerun-scheduler'").fetchall()
    return [int(r[0]) for r in rows]


def _count(db: str, sql: str) -> int:
    """On a read-only connection of its own: opening a Store runs its migrations, whose
    lock waits behind a busy serve, so the watcher saw finals seconds late (PostgreSQL)."""
    from bench.workqueue import _one  # it imports this module
    return _one(db, sql)


def _watch(db: str, target: int, start: float, done: threading.Event,
           recorded: list[float]) -> None:
    """When the store holds `target` succeeded tasks: seconds since `start`."""
    while not done.is_set():
        if _count(db, "SELECT COUNT(*) FROM tasks WHERE state='succeeded'") >= target:
            recorded.append(time.monotonic() - start)
            return
        done.wait(0.1)


def fanout(tmp: Path, broker_url: str, db: str, nodes: int, rounds: int) -> dict[str, Any]:
    serve = Serve(tmp, broker_url, db)
    swarm = SwarmGroup(broker_url, nodes, node_prefix="sw")
    rows: list[dict[str, Any]] = []
    try:
        t0 = time.monotonic()
        swarm.wait_ready(300)
        learned = wait_until(lambda: _count(db, "SELECT COUNT(*) FROM nodes WHERE "
                                            "state='online'") >= nodes, 300, 0.2)
        learn_s = time.monotonic() - t0
        token = (serve.dir / "token").read_text().strip()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERUN_API": f"http://127.0.0.1:"
               f"{serve.port}", "EDGERUN_TOKEN": token}
        env.pop("EDGERUN_CONFIG", None)
        for r in range(rounds):
            before = _count(db, "SELECT COUNT(*) FROM tasks WHERE state='succeeded'")
            backends = pg_backends(db)
            cpu0 = cpu_s(serve.proc.pid), sum(cpu_s(p) for p in backends)
            recorded: list[float] = []
            done = threading.Event()
            start = time.monotonic()
            watcher = threading.Thread(target=_watch, args=(db, before + nodes, start, done,
                                                            recorded), daemon=True)
            watcher.start()
            proc = subprocess.run([sys.executable, "-m", "edgerun.scheduler", "run", "sw*",
                                   "--", "true"], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=900, check=False)
            exit_s = time.monotonic() - start
            watcher.join(120)
            done.set()
            cpu1 = cpu_s(serve.proc.pid), sum(cpu_s(p) for p in backends)
            final_s = recorded[0] if recorded else None
            rows.append({"round": r + 1, "run_exit_code": proc.returncode,
                         "run_stderr_tail": proc.stderr.strip().splitlines()[-1:],
                         "final_recorded_s": round(final_s, 2) if final_s else None,
                         "run_exit_s": round(exit_s, 2),
                         "tasks_per_s": round(nodes / final_s, 1) if final_s else None,
                         "serve_cpu_ms_per_task": round((cpu1[0] - cpu0[0]) * 1000 / nodes, 3),
                         "db_cpu_ms_per_task": round((cpu1[1] - cpu0[1]) * 1000 / nodes, 3)
                         if backends else None})
        return {"nodes": nodes, "learn_online_s": round(learn_s, 2) if learned else None,
                "rounds": rows}
    finally:
        swarm.stop()
        serve.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgerun-fanout-") as tmp_name:
        tmp = Path(tmp_name)
        broker = mosquitto(tmp / "mosquitto")
        try:
            if args.store in ("sqlite", "both"):
                out["sqlite"] = fanout(tmp, broker.url, str(tmp / "f.db"), args.nodes,
                                       args.rounds)
                print(json.dumps({"sqlite": out["sqlite"]}), flush=True)
            if args.store in ("postgresql", "both"):
                name, pg = _pg_database()
                try:
                    out["postgresql"] = fanout(tmp, broker.url, pg, args.nodes, args.rounds)
                    print(json.dumps({"postgresql": out["postgresql"]}), flush=True)
                finally:
                    _drop(name)
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
