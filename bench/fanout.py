"""Issue 22: a fan-out through `edgerun serve` to thousands of simulated nodes.

`python bench/fanout.py [--nodes N] [--rounds R] [--store sqlite|postgresql|both]
[--instances K]`: a private Mosquitto, one `serve` (a process; K on one PostgreSQL
database with --instances, SQLite keeps one), bench/swarm.py's simulated nodes (one
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
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, mosquitto
from bench.controlplane import Serve, _drop, _pg_database
from bench.swarmkit import SwarmGroup
from tests.brokers import wait_until

TICK = os.sysconf("SC_CLK_TCK")
log = logging.getLogger(__name__)


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


def _serves(tmp: Path, broker_url: str, db: str, instances: int) -> list[Serve]:
    """One serve, or `instances` on one database sharing the updates through a `$share/`
    group, each with a client id of its own (as controlplane.updates_rate starts them)."""
    if instances == 1:
        return [Serve(tmp, broker_url, db)]
    if db.startswith("postgresql"):
        from edgerun.scheduler.store.tasks import Store
        Store(db).close()  # schema in place before several instances race for it
    group = uuid.uuid4().hex[:6]
    serves: list[Serve] = []
    try:
        for i in range(instances):
            serves.append(Serve(tmp, broker_url, db, "--client-id", f"fan-{group}-{i}",
                                "--share-group", group))
    except BaseException:
        for serve in serves:
            serve.stop()
        raise
    return serves


def _log_tail(serves: list[Serve], lines: int = 6) -> list[str]:
    """What the serves logged last, for a round whose `run` failed (their directories
    go with the bench's temporary directory)."""
    out: list[str] = []
    for i, serve in enumerate(serves):
        serve.log.flush()
        text = (serve.dir / "serve.log").read_text(errors="replace").strip().splitlines()
        out += [f"serve {i}: {line}" for line in text[-lines:]]
    return out


def fanout(tmp: Path, broker_url: str, db: str, nodes: int, rounds: int,
           instances: int = 1) -> dict[str, Any]:
    """`run` talks to the first instance's API; CPU is summed over every serve."""
    serves = _serves(tmp, broker_url, db, instances)
    swarm: SwarmGroup | None = None
    rows: list[dict[str, Any]] = []
    try:
        swarm = SwarmGroup(broker_url, nodes, node_prefix="sw")
        t0 = time.monotonic()
        swarm.wait_ready(300)
        learned = wait_until(lambda: _count(db, "SELECT COUNT(*) FROM nodes WHERE "
                                            "state='online'") >= nodes, 300, 0.2)
        learn_s = time.monotonic() - t0
        api = serves[0]
        token = (api.dir / "token").read_text().strip()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERUN_API": f"http://127.0.0.1:"
               f"{api.port}", "EDGERUN_TOKEN": token}
        env.pop("EDGERUN_CONFIG", None)
        pids = [s.proc.pid for s in serves]
        for r in range(rounds):
            before = _count(db, "SELECT COUNT(*) FROM tasks WHERE state='succeeded'")
            backends = pg_backends(db)
            cpu0 = sum(cpu_s(p) for p in pids), sum(cpu_s(p) for p in backends)
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
            cpu1 = sum(cpu_s(p) for p in pids), sum(cpu_s(p) for p in backends)
            final_s = recorded[0] if recorded else None
            serve_ms = (cpu1[0] - cpu0[0]) * 1000 / nodes
            db_ms = (cpu1[1] - cpu0[1]) * 1000 / nodes if backends else None
            rows.append({"round": r + 1, "run_exit_code": proc.returncode,
                         "run_stderr_tail": proc.stderr.strip().splitlines()[-1:],
                         "final_recorded_s": round(final_s, 2) if final_s else None,
                         "run_exit_s": round(exit_s, 2),
                         "tasks_per_s": round(nodes / final_s, 1) if final_s else None,
                         "serve_cpu_ms_per_task": round(serve_ms, 3),
                         "db_cpu_ms_per_task": round(db_ms, 3) if db_ms is not None else None,
                         "cpu_ms_per_task": round(serve_ms + (db_ms or 0.0), 3),
                         "db_backends": len(backends),
                         "serve_log_tail": [] if proc.returncode == 0 else _log_tail(serves),
                         "load_average": [round(x, 2) for x in os.getloadavg()]})
        return {"nodes": nodes, "instances": instances,
                "learn_online_s": round(learn_s, 2) if learned else None,
                "swarm_errors": swarm.totals().get("errors", 0), "rounds": rows}
    finally:
        if swarm is not None:
            swarm.stop()
        for serve in serves:
            serve.stop()


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(median(values), 3) if values else None


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    """The median over the rounds whose `run` exited 0 (all, if none did) of each figure,
    and the 1-minute load after each round counted."""
    rows = [r for r in run["rounds"] if r["run_exit_code"] == 0] or run["rounds"]
    return {k: _median(rows, k) for k in ("final_recorded_s", "run_exit_s", "tasks_per_s",
                                           "serve_cpu_ms_per_task", "db_cpu_ms_per_task",
                                           "cpu_ms_per_task")} | {
        "load_1m": [r["load_average"][0] for r in rows],
        "rounds_counted": [r["round"] for r in rows]}


def _guarded(label: str, fn: Any, *args: Any) -> dict[str, Any]:
    """One part's failure is reported in its row; the other parts still run."""
    try:
        out: dict[str, Any] = fn(*args)
        return out
    except Exception as exc:  # reported, not raised: the item reports what it could measure
        log.exception("item 9 %s", label)
        return {"error": f"{type(exc).__name__}: {exc}",
                "load_average": [round(x, 2) for x in os.getloadavg()]}


def _pg_fanout(tmp: Path, broker_url: str, nodes: int, rounds: int,
               instances: int) -> dict[str, Any]:
    name, pg = _pg_database()
    try:
        return fanout(tmp, broker_url, pg, nodes, rounds, instances)
    finally:
        _drop(name)


def _pgqueuer(jobs: int) -> dict[str, Any]:
    import asyncio

    from bench.pgqueuer_drain import drain
    name, url = _pg_database()
    try:
        out = asyncio.run(drain(url, jobs))
    finally:
        _drop(name)
    return out | {"load_average": [round(x, 2) for x in os.getloadavg()]}


def _bridge_floor(tmp: Path, nodes: int, rounds: int) -> dict[str, Any]:
    from bench.scale import scale_bridge
    out = scale_bridge(tmp / f"item9-bridge-{nodes}", nodes, rounds)
    return {"nodes": nodes, "fanout_s": round(out["fanout_s"], 3),
            "fanout_runs_s": [round(x, 3) for x in out["fanout_runs_s"]],
            "swarm_errors": out["swarm_errors"],
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def item9_fanout(tmp: Path, broker_url: str, nodes: int, rounds: int,
                 jobs: int) -> dict[str, Any]:
    """Item 9's fan-out part: SQLite, PostgreSQL with one serve and with three, PGQueuer's
    drain on the same server, and the bridge alone (item 3's floor) at the same N."""
    out: dict[str, Any] = {"nodes": nodes, "rounds": rounds, "instances": 3}
    out["sqlite"] = _guarded("sqlite", fanout, tmp, broker_url, str(tmp / "fan.db"), nodes,
                             rounds)
    out["postgresql"] = _guarded("postgresql", _pg_fanout, tmp, broker_url, nodes, rounds, 1)
    out["postgresql_3"] = _guarded("postgresql x3", _pg_fanout, tmp, broker_url, nodes,
                                   rounds, 3)
    out["pgqueuer"] = _guarded("pgqueuer", _pgqueuer, jobs)
    out["bridge"] = _guarded("bridge", _bridge_floor, tmp, nodes, rounds)
    for key in ("sqlite", "postgresql", "postgresql_3"):
        if "rounds" in out[key]:
            out[key]["summary"] = _summary(out[key])
    return out


# --- rendering (bench/controlplane.render calls it) -----------------------------------
CPU_TARGET_MS = 1.0
FINAL_TARGET = (10_000, 10.0)  # all finals of 10,000 nodes within 10 s


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "missed")


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _s(r: dict[str, Any], key: str) -> Any:
    return r.get("summary", {}).get(key)


def _load(r: dict[str, Any]) -> str:
    loads = _s(r, "load_1m") or r.get("load_average", [None])[:1]
    return ", ".join(f"{x:.1f}" for x in loads if x is not None) or "-"


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:,}" if isinstance(x, int) else f"{x:g}"


def render_fanout(f: dict[str, Any]) -> list[str]:
    n, labels = f["nodes"], {"sqlite": "SQLite, 1 serve", "postgresql": "PostgreSQL, 1 serve",
                             "postgresql_3": f"PostgreSQL, {f['instances']} serves"}
    lines = ["", f"### Fan-out through serve: `edgerun run 'sw*' -- true` to {n:,} nodes",
             "", f"One private Mosquitto, {n:,} simulated nodes (bench/swarm.py, one paho "
             "client each), `run` as a real CLI process against one serve's API; with "
             f"{f['instances']} serves they share one PostgreSQL database (`--share-group`, "
             "distinct `--client-id`) and CPU is summed over them. Final: seconds until the "
             "store holds every final; exit: until `run` exits. CPU per task from /proc over "
             f"the round (serve, and the database's edgerun backends). {f['rounds']} rounds; "
             "the summary is the median of the rounds whose `run` exited 0. bench/fanout.py.",
             ""]
    rows = []
    for key, label in labels.items():
        r = f[key]
        if "error" in r:
            rows.append(f"| {label} | error: {r['error']} |||||||||")
            continue
        for x in r["rounds"]:
            rows.append(f"| {label} | {x['round']} | {_fmt(x['final_recorded_s'])} | "
                        f"{_fmt(x['run_exit_s'])} | {_fmt(x['tasks_per_s'])} | "
                        f"{_fmt(x['serve_cpu_ms_per_task'])} | {_fmt(x['db_cpu_ms_per_task'])} "
                        f"| {_fmt(x['cpu_ms_per_task'])} | {x['run_exit_code']} | "
                        f"{x['load_average'][0]:.1f} |")
    lines += ["| setup | round | final (s) | exit (s) | tasks/s | serve CPU ms/task | "
              "db CPU ms/task | serve+db ms/task | run exit code | load 1m |",
              "|---|---|---|---|---|---|---|---|---|---|", *rows]
    for key, label in labels.items():
        for x in f[key].get("rounds", []):
            if x["run_exit_code"] != 0:
                tail = " / ".join(x.get("serve_log_tail", [])[-6:]) or "-"
                lines += ["", f"{label}, round {x['round']}: `run` exited "
                          f"{x['run_exit_code']} ({' '.join(x['run_stderr_tail'])}); not "
                          f"counted in the summary. The serves' logs ended: `{tail}`"]
    pgq, br = f["pgqueuer"], f["bridge"]
    lines += ["", "PGQueuer (bench/pgqueuer_drain.py: one QueueManager, batch 10, mode drain, "
              "a no-op job) on the same PostgreSQL server: " + (
                  f"error: {pgq['error']}" if "error" in pgq else
                  f"{pgq['done']:,} jobs in {pgq['seconds']} s, {pgq['jobs_per_s']:,} jobs/s, "
                  f"worker {pgq['worker_cpu_ms_per_job']} + db {pgq['db_cpu_ms_per_job']} "
                  f"ms CPU per job (load {_load(pgq)})."),
              "", "The floor, measured in this run: the bridge alone fanning a task out to the "
              f"same {n:,} nodes (bench/scale.py's scale_bridge, item 3; RabbitMQ in, every "
              "final back on RabbitMQ): " + (
                  f"error: {br['error']}" if "error" in br else
                  f"{br['fanout_s']} s (median of {', '.join(map(str, br['fanout_runs_s']))}; "
                  f"load {_load(br)})."), ""]
    lines += _targets(f, n)
    return lines


def _targets(f: dict[str, Any], n: int) -> list[str]:
    sq, pg, pg3 = f["sqlite"], f["postgresql"], f["postgresql_3"]
    pgq, br = f["pgqueuer"], f["bridge"]
    rows: list[tuple[str, str, str, bool | None, str]] = []

    def ratio_row(what: str, target: str, r: float | None, ok: bool | None, load: str) -> None:
        rows.append((what, target, _fmt(r), ok if r is not None else None, load))

    r = _ratio(_s(pg, "tasks_per_s"), pgq.get("jobs_per_s"))
    ratio_row("edgerun PostgreSQL tasks/s / PGQueuer jobs/s", ">= 0.35", r,
              r is not None and r >= 0.35, f"{_load(pg)}; {_load(pgq)}")
    r = _ratio(_s(pg, "tasks_per_s"), _s(sq, "tasks_per_s"))
    ratio_row("PostgreSQL / SQLite tasks/s", ">= 0.8", r, r is not None and r >= 0.8,
              f"{_load(pg)}; {_load(sq)}")
    for key, label in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL"),
                       ("postgresql_3", f"PostgreSQL x{f['instances']}")):
        c = _s(f[key], "cpu_ms_per_task")
        ratio_row(f"{label}: serve+db CPU ms per task", f"<= {CPU_TARGET_MS:g}", c,
                  c is not None and c <= CPU_TARGET_MS, _load(f[key]))
    for key, label in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL"),
                       ("postgresql_3", f"PostgreSQL x{f['instances']}")):
        s = _s(f[key], "final_recorded_s")
        judged = n >= FINAL_TARGET[0]
        rows.append((f"{label}: all {n:,} finals recorded (s)",
                     f"<= {FINAL_TARGET[1]:g} s at {FINAL_TARGET[0]:,} nodes"
                     + ("" if judged else f" (not judged at {n:,})"), _fmt(s),
                     (s is not None and s <= FINAL_TARGET[1]) if judged and s is not None
                     else None, _load(f[key])))
    r = _ratio(_s(pg3, "cpu_ms_per_task"), _s(pg, "cpu_ms_per_task"))
    ratio_row(f"{f['instances']} serves / 1: serve+db CPU per task", "<= 1.2", r,
              r is not None and r <= 1.2, f"{_load(pg3)}; {_load(pg)}")
    r = _ratio(_s(pg3, "tasks_per_s"), _s(pg, "tasks_per_s"))
    ratio_row(f"{f['instances']} serves / 1: tasks/s", ">= 1.0", r, r is not None and r >= 1.0,
              f"{_load(pg3)}; {_load(pg)}")
    floor = br.get("fanout_s")
    for key, label in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL")):
        s = _s(f[key], "final_recorded_s")
        rows.append((f"{label} final (s) / bridge alone {_fmt(floor)} s", "floor, no target",
                     _fmt(_ratio(s, floor)), None, f"{_load(f[key])}; {_load(br)}"))
    return ["Targets (issue 22), from the medians above:", "",
            "| what | target | measured | verdict | load 1m |", "|---|---|---|---|---|",
            *[f"| {w} | {t} | {m} | {_verdict(ok)} | {ld} |" for w, t, m, ok, ld in rows], ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--instances", type=int, default=1,
                        help="serves on one database (a --share-group, PostgreSQL only)")
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
                    out["postgresql"] = fanout(tmp, broker.url, pg, args.nodes, args.rounds,
                                               args.instances)
                    print(json.dumps({"postgresql": out["postgresql"]}), flush=True)
                finally:
                    _drop(name)
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
