"""Issue 22: history at scale. A store seeded with 1,000,000 tasks and 100,000 nodes, then
the API's list and filter pages measured over HTTP against a real `edgerun serve`.

`python bench/history.py [--tasks N] [--nodes M] [--samples S] [--store ...] [--retention]`
(also item 11 of bench/run.py). The schema is the real one: `Store(db)` runs the
migrations, then the rows go in by bulk SQL (SQLite executemany in one transaction,
PostgreSQL COPY), then ANALYZE. The history: fan-outs of one task id to 9 nodes (90 %
of rows) and jobs of 100 nodes (10 %), created over 60 days, nearly all final (96 %
succeeded, 3 % failed, ...), one recorded update per task (its final one).

Each page is asked `samples` times on one keep-alive connection, one at a time; p50/p99
in ms. With --retention: serve restarted with --keep-days 30 (so the older half goes, in
batches of 2,000), while single-target tasks are dispatched at 20/s to simulated nodes;
dispatch latency (POST to the final's `updated_at`) during the sweep against before it.
Reports, asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import mosquitto
from bench.controlplane import Serve, _drop, _pg_database
from bench.swarmkit import SwarmGroup
from bench.workqueue import _epoch, _one, _pct, query, store_bytes
from tests.brokers import wait_until

TARGET_P99_MS = 50.0
FAN = 9  # nodes per fan-out task
JOB_NODES = 100
DAYS = 60
TASK_COLUMNS = ("node", "id", "type", "spec", "source", "state", "created_at", "updated_at",
                "dispatched_at", "timeout", "exit_code", "error_code", "error_message",
                "result", "job_id", "step", "attempt", "previous")
UPDATE_COLUMNS = ("node", "task_id", "state", "at", "received_at", "body")
NODE_COLUMNS = ("node", "state", "first_seen", "last_seen", "changed_at", "agent", "facts",
                "running")


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _state(rng: random.Random, age_fraction: float) -> str:
    if age_fraction > 0.999:  # the newest 0.1 %: still in flight
        return rng.choice(("queued", "dispatched", "accepted", "running"))
    x = rng.random()
    return ("succeeded" if x < 0.96 else "failed" if x < 0.99 else "timed_out" if x < 0.995
            else "canceled" if x < 0.998 else "lost")


def history(tasks: int, nodes: int, seed: int = 22) -> dict[str, Any]:
    """The rows to seed: {"nodes": [...], "tasks": [...], "updates": [...], "jobs": [...]}
    and what the pages will ask for (a node, a job, an id prefix)."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    now = datetime.now(UTC)
    start = now - timedelta(days=DAYS)
    names = [f"h{i:06d}" for i in range(nodes)]
    node_rows = [(n, "offline", _stamp(start), _stamp(now), _stamp(now), "0.1.0",
                  json.dumps({"hostname": n, "arch": "x86_64", "cpus": 8}), "[]")
                 for n in names]
    task_rows: list[tuple[Any, ...]] = []
    update_rows: list[tuple[Any, ...]] = []
    jobs: list[tuple[str, str, str, str]] = []
    step_s = DAYS * 86400 / max(1, tasks)
    i = 0
    fanouts = 0
    while i < tasks:
        at = start + timedelta(seconds=i * step_s)
        if fanouts % 90 == 89 and i + JOB_NODES <= tasks:  # a job of 100 nodes, one step
            job_id = f"job-{len(jobs):05d}"
            first = rng.randrange(nodes)
            targets = [names[(first + k) % nodes] for k in range(JOB_NODES)]
            jobs.append((job_id, _stamp(at), json.dumps(targets), json.dumps(
                [{"type": "shell", "command": "uptime"}])))
            group, task_id, step = targets, f"{job_id}-s0", 0
        else:
            first = rng.randrange(nodes)
            group = [names[(first + k * 7) % nodes] for k in range(FAN)]
            task_id, job_id, step = str(uuid.UUID(int=rng.getrandbits(128), version=4)), None, None
        fanouts += 1
        spec = json.dumps({"v": 1, "kind": "task", "id": task_id, "type": "shell",
                           "command": "uptime", "timeout": 60})
        for node in group[:tasks - i]:
            state = _state(rng, i / tasks)
            stamp = _stamp(at)
            final = state in ("succeeded", "failed", "timed_out", "canceled", "lost")
            code = 0 if state == "succeeded" else 1 if state == "failed" else None
            result = json.dumps({"stdout": " 12:00:00 up 3 days\n", "stderr": "",
                                 "duration_s": 0.01}) if final else None
            task_rows.append((node, task_id, "shell", spec, "api", state, stamp, stamp, stamp,
                              60.0, code, "timeout" if state == "timed_out" else None,
                              None, result, job_id, step, 1, "running" if final else None))
            if final:
                update_rows.append((node, task_id, state, stamp, stamp, json.dumps(
                    {"v": 1, "kind": "update", "id": task_id, "node": node, "state": state,
                     "at": stamp, "exit_code": code})))
            i += 1
    pick = task_rows[len(task_rows) // 2]
    return {"nodes": node_rows, "tasks": task_rows, "updates": update_rows, "jobs": jobs,
            "node": pick[0], "job": jobs[len(jobs) // 2][0] if jobs else None,
            "prefix": next(r[1] for r in task_rows[len(task_rows) // 3:] if not r[14])[:8],
            "node_prefix": names[nodes // 2][:5]}


def seed(db: str, data: dict[str, Any]) -> float:
    """Bulk rows into a store whose schema the store's own migrations made; seconds."""
    from edgerun.scheduler.store.tasks import Store
    Store(db).close()
    t0 = time.monotonic()
    tables = (("nodes", NODE_COLUMNS, data["nodes"]), ("tasks", TASK_COLUMNS, data["tasks"]),
              ("updates", UPDATE_COLUMNS, data["updates"]),
              ("jobs", ("id", "created_at", "nodes", "steps"), data["jobs"]))
    if db.startswith("postgresql"):
        import psycopg
        with psycopg.connect(db) as conn:
            for table, cols, rows in tables:
                with conn.cursor().copy(f"COPY {table} ({','.join(cols)}) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
            conn.commit()
            conn.autocommit = True
            conn.execute("VACUUM ANALYZE")
    else:
        import sqlite3
        conn = sqlite3.connect(db)
        with conn:
            for table, cols, rows in tables:
                conn.executemany(f"INSERT INTO {table} ({','.join(cols)}) VALUES "  # noqa: S608
                                 f"({','.join('?' * len(cols))})", rows)
        conn.execute("ANALYZE")
        conn.close()
    return time.monotonic() - t0


def pages(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, path) of each page measured."""
    node, job, prefix = data["node"], data["job"], data["prefix"]
    return [
        ("tasks, newest 100", "/v1/tasks?limit=100"),
        ("tasks by node", f"/v1/tasks?node={node}"),
        ("tasks by state: running (rare)", "/v1/tasks?state=running"),
        ("tasks by state: failed (3 %)", "/v1/tasks?state=failed"),
        ("tasks by state: succeeded (96 %)", "/v1/tasks?state=succeeded"),
        ("tasks by node and state", f"/v1/tasks?node={node}&state=succeeded"),
        ("tasks by job", f"/v1/tasks?job={job}"),
        ("tasks, a page deep in (cursor)", "/v1/tasks?cursor=200000&limit=100"),
        ("task by id prefix (8 chars)", f"/v1/tasks/{prefix}"),
        ("nodes, first 100", "/v1/nodes?limit=100"),
        ("nodes by prefix (glob)", f"/v1/nodes?match={data['node_prefix']}*&limit=100"),
        ("a node and its 20 latest tasks", f"/v1/nodes/{node}"),
        ("jobs, newest 50", "/v1/jobs"),
        ("a job", f"/v1/jobs/{job}"),
        ("a job's targets", f"/v1/jobs/{job}/targets"),
        ("a job's tasks (console)", f"/v1/jobs/{job}/tasks"),
        ("overview (console)", "/v1/overview"),
    ]


def measure(port: int, token: str, paths: list[tuple[str, str]], samples: int,
            budget_s: float = 30.0) -> list[dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Authorization": f"Bearer {token}"}
    out = []
    for name, path in paths:
        times: list[float] = []
        status, size = 0, 0
        began = time.monotonic()
        for _ in range(samples):
            t0 = time.monotonic()
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            times.append((time.monotonic() - t0) * 1000)
            status, size = resp.status, len(body)
            if time.monotonic() - began > budget_s:
                break
        p99 = _pct(times, 99)
        out.append({"page": name, "path": path, "status": status, "bytes": size,
                    "n": len(times), "p50_ms": round(_pct(times, 50) or 0, 1),
                    "p99_ms": round(p99 or 0, 1),
                    "met": bool(p99 is not None and p99 <= TARGET_P99_MS and status == 200)})
    conn.close()
    return out


# The list query's shapes (Store.task_page, task_ids_with_prefix), for EXPLAIN only.
EXPLAINED: dict[str, tuple[str, str | None]] = {
    "by node": ("SELECT * FROM tasks WHERE state != '__new__' AND node=? ORDER BY seq DESC "
                "LIMIT ?", "node"),
    "by state running": ("SELECT * FROM tasks WHERE state != '__new__' AND state=? ORDER BY "
                         "seq DESC LIMIT ?", "running"),
    "by state failed": ("SELECT * FROM tasks WHERE state != '__new__' AND state=? ORDER BY "
                        "seq DESC LIMIT ?", "failed"),
    "by job": ("SELECT * FROM tasks WHERE state != '__new__' AND job_id=? ORDER BY seq DESC "
               "LIMIT ?", "job"),
    "newest": ("SELECT * FROM tasks WHERE state != '__new__' ORDER BY seq DESC LIMIT ?", None),
}


def explain(db: str, data: dict[str, Any]) -> dict[str, str]:
    """The plan of each list query shape (SQLite: EXPLAIN QUERY PLAN; PostgreSQL:
    EXPLAIN ANALYZE's plan lines and its execution time)."""
    out = {}
    args = {"node": data["node"], "job": data["job"]}
    if db.startswith("postgresql"):
        import psycopg
        with psycopg.connect(db, autocommit=True) as conn:
            for name, (sql, arg) in EXPLAINED.items():
                params = (args.get(arg, arg), 101) if arg else (101,)
                rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS OFF) "  # type: ignore[arg-type]
                                    + sql.replace("?", "%s"), params).fetchall()
                out[name] = " / ".join(r[0].strip() for r in rows if "Planning" not in r[0])
        return out
    import sqlite3
    conn = sqlite3.connect(db)
    for name, (sql, arg) in EXPLAINED.items():
        params = (args.get(arg, arg), 101) if arg else (101,)
        t0 = time.monotonic()
        conn.execute(sql, params).fetchall()
        ms = (time.monotonic() - t0) * 1000
        plan = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        out[name] = " / ".join(str(r[-1]) for r in plan) + f" ({ms:.1f} ms)"
    conn.close()
    return out


def dispatch_latency(port: int, token: str, nodes: list[str], seconds: float, rate: float,
                     db: str, until: Any = None) -> dict[str, Any]:
    """Single-target tasks at `rate`/s for `seconds` (or until `until()` is true, then
    5 s more); POST time and POST-to-final latency from the store's `updated_at`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    sent: dict[str, float] = {}
    post_ms: list[float] = []
    started = time.monotonic()
    stop_at = started + seconds
    i = 0
    while time.monotonic() < stop_at:
        if until is not None and stop_at - time.monotonic() > 5 and until():
            stop_at = time.monotonic() + 5
        pause = started + i / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        body = json.dumps({"targets": [nodes[i % len(nodes)]],
                           "task": {"type": "shell", "command": "true"}}).encode()
        wall, t0 = time.time(), time.monotonic()
        conn.request("POST", "/v1/tasks", body, headers)
        resp = conn.getresponse()
        data = resp.read()
        post_ms.append((time.monotonic() - t0) * 1000)
        if resp.status == 201:
            sent[json.loads(data)["tasks"][0]["id"]] = wall
        i += 1
    conn.close()
    wait_until(lambda: _finals_of(db, list(sent)) >= len(sent), 120, 0.5)
    lat = [(_epoch(u) - sent[t]) * 1000 for t, u in _final_times(db, list(sent))]
    return {"tasks": len(sent), "seconds": round(time.monotonic() - started, 1),
            "post_p50_ms": round(_pct(post_ms, 50) or 0, 1),
            "post_p99_ms": round(_pct(post_ms, 99) or 0, 1),
            "post_max_ms": round(max(post_ms, default=0), 1),
            "final_p50_ms": round(_pct(lat, 50) or 0, 1),
            "final_p99_ms": round(_pct(lat, 99) or 0, 1),
            "final_max_ms": round(max(lat, default=0), 1), "finals": len(lat)}


def api_up(port: int, timeout: float = 60.0) -> bool:
    """True once serve answers its API (GET /v1/health, no token: 401 is an answer)."""
    def answers() -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/health")
            conn.getresponse().read()
            conn.close()
            return True
        except OSError:
            return False
    return wait_until(answers, timeout, 0.2)


def _final_times(db: str, ids: list[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k in range(0, len(ids), 500):
        chunk = ids[k:k + 500]
        out += [(r[0], r[1]) for r in query(
            db, f"SELECT id, updated_at FROM tasks WHERE state='succeeded' AND id IN "  # noqa: S608
            f"({','.join('?' * len(chunk))})", tuple(chunk))]
    return out


def _finals_of(db: str, ids: list[str]) -> int:
    return len(_final_times(db, ids))


def retention(tmp: Path, broker_url: str, db: str, token: str,
              baseline_s: float) -> dict[str, Any]:
    """Dispatch latency before and during a retention sweep of the older half (`token`:
    the admin token the store's first serve wrote; later ones write none)."""
    swarm = SwarmGroup(broker_url, 50, node_prefix="hr")
    out: dict[str, Any] = {}
    try:
        swarm.wait_ready(120)
        serve = Serve(tmp, broker_url, db)
        try:
            wait_until(lambda: _one(db, "SELECT COUNT(*) FROM nodes WHERE node LIKE 'hr%' "
                                    "AND state='online'") >= 50, 120, 0.3)
            api_up(serve.port)
            out["before"] = dispatch_latency(serve.port, token, swarm.nodes, baseline_s, 20.0,
                                             db)
        finally:
            serve.stop()
        before = _one(db, "SELECT COUNT(*) FROM tasks")
        low = [_one(db, "SELECT MIN(seq) FROM tasks"), time.monotonic()]

        moved = [False]

        def swept() -> bool:  # the oldest row moved, then stood for 5 s: the sweep is over
            now_low = _one(db, "SELECT MIN(seq) FROM tasks")
            if now_low != low[0]:
                low[:] = [now_low, time.monotonic()]
                moved[0] = True
            return time.monotonic() - low[1] > (5 if moved[0] else 60)

        serve = Serve(tmp, broker_url, db, "--keep-days", str(DAYS / 2))
        try:
            api_up(serve.port)
            t0 = low[1] = time.monotonic()
            out["during"] = dispatch_latency(serve.port, token, swarm.nodes, 1800, 20.0, db,
                                             until=swept)
            out["sweep_s"] = round(low[1] - t0, 1)
        finally:
            serve.stop()
        out["pruned_tasks"] = before - _one(db, "SELECT COUNT(*) FROM tasks")
    finally:
        swarm.stop()
    return out


def run_store(tmp: Path, label: str, db: str, data: dict[str, Any], samples: int,
              broker_url: str, with_retention: bool) -> dict[str, Any]:
    seeded = seed(db, data)
    row: dict[str, Any] = {"store": label, "seed_s": round(seeded, 1),
                           "store_bytes": store_bytes(db), "explain": explain(db, data)}
    serve = Serve(tmp, broker_url, db)
    try:
        wait_until(lambda: (serve.dir / "token").exists(), 60, 0.2)
        api_up(serve.port)
        token = (serve.dir / "token").read_text().strip()
        row["pages"] = measure(serve.port, token, pages(data), samples)
    finally:
        serve.stop()
    print(json.dumps(row), flush=True)  # the pages, before the retention run
    if with_retention:
        try:
            row["retention"] = retention(tmp, broker_url, db, token, 20.0)
        except Exception as exc:  # a report, not a test: keep the pages measured
            row["retention_error"] = f"{type(exc).__name__}: {exc}"
    return row


def item11(tmp: Path, *, tasks: int, nodes: int, samples: int, retention: bool = True,
           stores: tuple[str, ...] = ("sqlite", "postgresql")) -> dict[str, Any]:
    data = history(tasks, nodes)
    out: dict[str, Any] = {"tasks": len(data["tasks"]), "nodes": nodes,
                           "updates": len(data["updates"]), "jobs": len(data["jobs"]),
                           "samples": samples, "runs": []}
    broker = mosquitto(tmp / "mosquitto-hist")
    try:
        for label in stores:
            if label == "sqlite":
                out["runs"].append(run_store(tmp, label, str(tmp / "hist.db"), data, samples,
                                             broker.url, retention))
            else:
                name, pg = _pg_database()
                try:
                    out["runs"].append(run_store(tmp, label, pg, data, samples, broker.url,
                                                 retention))
                finally:
                    _drop(name)
            print(json.dumps(out["runs"][-1]), flush=True)
    finally:
        broker.stop()
    return out


def render(r: dict[str, Any]) -> list[str]:
    lines = [f"## 11. History at scale: {r['tasks']:,} tasks, {r['nodes']:,} nodes", "",
             f"Seeded by bulk SQL into the migrated schema ({r['updates']:,} updates, "
             f"{r['jobs']:,} jobs); each page asked up to {r['samples']} times, one at a "
             "time, on one keep-alive connection. Milliseconds; target p99 <= 50.", ""]
    runs = r["runs"]
    head = "| page | " + " | ".join(f"{x['store']} p50 | {x['store']} p99 | p99 <= 50"
                                    for x in runs) + " |"
    lines += [head, "|---|" + "---|---|---|" * len(runs)]
    for k, page in enumerate(runs[0]["pages"] if runs else []):
        cells = []
        for x in runs:
            p = x["pages"][k]
            cells.append(f"{p['p50_ms']} | {p['p99_ms']} | "
                         f"{'met' if p['met'] else '**missed**'}")
        lines.append(f"| {page['page']} (`{page['path']}`) | " + " | ".join(cells) + " |")
    for x in runs:
        lines += ["", f"{x['store']}: seeded in {x['seed_s']} s, "
                      f"{x['store_bytes'] / 2**20:,.0f} MiB."]
        ret = x.get("retention")
        if ret:
            b, d = ret["before"], ret["during"]
            lines.append(
                f"Retention sweep of {ret['pruned_tasks']:,} tasks in {ret['sweep_s']} s; "
                f"dispatch at 20/s, POST to final p50/p99/max: before {b['final_p50_ms']}/"
                f"{b['final_p99_ms']}/{b['final_max_ms']} ms, during {d['final_p50_ms']}/"
                f"{d['final_p99_ms']}/{d['final_max_ms']} ms (POST alone p99 "
                f"{b['post_p99_ms']} -> {d['post_p99_ms']} ms).")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--retention", action="store_true",
                        help="also measure dispatch during a retention sweep")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    stores = ("sqlite", "postgresql") if args.store == "both" else (args.store,)
    with tempfile.TemporaryDirectory(prefix="edgerun-hist-") as tmp:
        out = item11(Path(tmp), tasks=args.tasks, nodes=args.nodes, samples=args.samples,
                     retention=args.retention, stores=stores)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print("\n".join(render(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
