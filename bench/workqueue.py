"""Issue 22: the classic work-queue test at this project's scale, through `edgerun serve`.

`python bench/workqueue.py [--tasks N] [--rate R] [--nodes M] [--batch B]
[--store sqlite|postgresql|both]` (also item 10 of bench/run.py): a private Mosquitto,
one `serve`, M simulated nodes in one process (bench/swarm.py --echo: each answers
`echo K` with stdout `K\\n`, as the contract says), and N tasks, each carrying one
integer, with one target each (round robin over the nodes), sent at R tasks/s in
batches of B consecutive tasks as `POST /v1/task-batches` (default 100: one HTTP request
and one store commit per batch; a batch goes when its last task is due), or with
`--batch 1` one `POST /v1/tasks` per task.

Why the HTTP API and not the CLI: at hundreds of tasks a second an operator's program
keeps a connection open and POSTs; `edgerun run` is a process per task (a Python start,
about 0.2 s of CPU) and would measure itself; a program with many tasks batches them
(as River's InsertMany), since one request per task costs serve about 3 ms of CPU in
HTTP alone, a ceiling near 300 tasks/s on one core. The submitters are a few threads, each
with one keep-alive connection, sending on one shared schedule (task i is due at
i / R s); when serve answers slower than that, the lag shows as a lower offered rate.

At the end every task row is read back from the store: the sum of the integers in the
recorded outputs must equal the sum sent, each id once, each with its own integer.
Reported: total time (first submit to last final recorded), the steady-state rate (the
middle 80 % of finals), latency p50/p99 (submit to the final's `updated_at`), the depth
of tasks not yet final each second (a PNG), the store's size, CPU per task of serve and
of its PostgreSQL backends. Reports, asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, mosquitto
from bench.controlplane import Serve, _drop, _pg_database
from bench.fanout import cpu_s, pg_backends
from bench.swarmkit import SwarmGroup
from tests.brokers import wait_until

TARGET_S = 20 * 60.0
PLOT = ROOT / "bench" / "workqueue_depth.png"


class Submitter:
    """`threads` keep-alive connections sending task i at start + i / rate: in batches of
    `batch` consecutive tasks to POST /v1/task-batches, each sent when its last task is
    due; with `batch` 1, one POST /v1/tasks per task."""

    def __init__(self, port: int, token: str, values: list[int], nodes: list[str],
                 rate: float, threads: int, batch: int = 100) -> None:
        self.port, self.token, self.values, self.nodes = port, token, values, nodes
        self.rate, self.threads, self.batch = rate, threads, max(1, batch)
        self.sent_at: list[float] = [0.0] * len(values)  # wall clock, before the POST
        self.ids: list[str | None] = [None] * len(values)
        self.post_ms: list[float] = []
        self.errors: dict[str, int] = {}
        self._next = 0
        self._lock = threading.Lock()
        self.start = 0.0

    def run(self) -> float:
        self.start = time.monotonic() + 0.2
        workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.monotonic() - self.start

    def _take(self) -> range | None:
        """The next batch's task indexes."""
        with self._lock:
            i = self._next
            if i >= len(self.values):
                return None
            self._next = min(len(self.values), i + self.batch)
            return range(i, self._next)

    def _item(self, i: int) -> dict[str, Any]:
        return {"targets": [self.nodes[i % len(self.nodes)]],
                "task": {"type": "shell", "command": ["echo", str(self.values[i])]}}

    def _work(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        single = self.batch == 1
        path = "/v1/tasks" if single else "/v1/task-batches"
        while (todo := self._take()) is not None:
            pause = self.start + todo[-1] / self.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            # bytes: http.client then sends headers and body in one write (a str body goes
            # in a second write, which Nagle holds for the peer's delayed ACK: 40 ms)
            body = json.dumps(self._item(todo[0]) if single else
                              {"tasks": [self._item(i) for i in todo]}).encode()
            for _attempt in range(3):
                now = time.time()
                for i in todo:
                    self.sent_at[i] = now
                t0 = time.monotonic()
                try:
                    conn.request("POST", path, body, headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    self._error(type(exc).__name__)
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                    continue  # not sent, or the answer lost: the sum check tells
                self.post_ms.append((time.monotonic() - t0) * 1000)
                if resp.status == 201:
                    made = json.loads(data)["tasks"]
                    for task in made:  # one target per item: one task each, in item order
                        self.ids[todo[task.get("item", 0)]] = task["id"]
                    break
                self._error(str(resp.status))
                time.sleep(0.5)
        conn.close()

    def _error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _rows(db: str, prefix: str) -> list[tuple[str, str, str | None, str]]:
    return [(r[0], r[1], r[2], r[3]) for r in query(
        db, "SELECT id, state, result, updated_at FROM tasks WHERE node LIKE ?", (prefix + "%",))]


def query(db: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a read, on a connection of its own that never writes: opening a Store
    would run its migrations, which take the writer's lock that a busy serve holds."""
    if db.startswith("postgresql"):
        import psycopg
        with psycopg.connect(db, autocommit=True) as conn:
            # no arguments: None, so that a literal % (LIKE 'x%') is not read as a placeholder
            return [tuple(r) for r in conn.execute(sql.replace("?", "%s"),  # type: ignore[arg-type]
                                                   args or None).fetchall()]
    import sqlite3
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        return list(conn.execute(sql, args).fetchall())
    finally:
        conn.close()


def _one(db: str, sql: str) -> int:
    """One number; 0 while serve has not created the store's tables yet."""
    import sqlite3

    from psycopg.errors import UndefinedTable
    try:
        rows = query(db, sql)
    except (sqlite3.OperationalError, UndefinedTable):
        return 0
    return int(rows[0][0] or 0) if rows else 0


def store_bytes(db: str) -> int:
    if db.startswith("postgresql"):
        import psycopg
        with psycopg.connect(db, autocommit=True) as conn:
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            return int(row[0]) if row else 0
    return sum(os.path.getsize(p) for p in (db, db + "-wal", db + "-shm") if os.path.exists(p))


def check(sub: Submitter, rows: list[tuple[str, str, str | None, str]]) -> dict[str, Any]:
    """The sum check, and per-task latency (submit to the final's updated_at)."""
    want = {tid: (sub.values[i], sub.sent_at[i]) for i, tid in enumerate(sub.ids) if tid}
    seen: dict[str, int] = {}
    total, bad_output, not_final, unknown = 0, 0, 0, 0
    finals: list[float] = []
    latency: list[float] = []
    for tid, state, result, updated in rows:
        seen[tid] = seen.get(tid, 0) + 1
        if tid not in want:
            unknown += 1
            continue
        if state != "succeeded":
            not_final += 1
            continue
        try:
            value = int(json.loads(result or "{}").get("stdout", "").strip())
        except ValueError:
            bad_output += 1
            continue
        if value != want[tid][0]:
            bad_output += 1
        total += value
        at = _epoch(updated)
        finals.append(at)
        latency.append((at - want[tid][1]) * 1000)
    expected = sum(sub.values)
    return {"expected_sum": expected, "recorded_sum": total, "sum_exact": total == expected,
            "not_submitted": sum(1 for t in sub.ids if t is None),
            "lost": sum(1 for t in want if t not in seen), "twice": sum(
                1 for n in seen.values() if n > 1), "not_final": not_final,
            "wrong_output": bad_output, "unknown_rows": unknown,
            "_finals": finals, "_latency": latency}


def depth_series(sent: list[float], finals: list[float], t0: float) -> list[tuple[float, int]]:
    """(seconds since t0, submitted - finished) every second."""
    sent, finals = sorted(sent), sorted(finals)
    end = max(sent[-1] if sent else t0, finals[-1] if finals else t0)
    out, a, b, t = [], 0, 0, t0
    while t <= end + 1:
        while a < len(sent) and sent[a] <= t:
            a += 1
        while b < len(finals) and finals[b] <= t:
            b += 1
        out.append((round(t - t0, 1), a - b))
        t += 1.0
    return out


def workqueue(tmp: Path, broker_url: str, db: str, tasks: int, rate: float, nodes: int,
              threads: int, seed: int = 22, batch: int = 100) -> dict[str, Any]:
    serve = Serve(tmp, broker_url, db)
    swarm = SwarmGroup(broker_url, nodes, node_prefix="wq", echo=True)
    try:
        swarm.wait_ready(300)
        wait_until(lambda: _one(db, "SELECT COUNT(*) FROM nodes WHERE state='online'")
                   >= nodes, 300, 0.2)
        token = (serve.dir / "token").read_text().strip()
        rng = random.Random(seed)  # noqa: S311 - test data, not secrets
        values = [rng.randrange(1, 10**9) for _ in range(tasks)]
        sub = Submitter(serve.port, token, values, swarm.nodes, rate, threads, batch)
        backends = pg_backends(db)
        cpu0 = cpu_s(serve.proc.pid), sum(cpu_s(p) for p in backends)
        wall0 = time.time()
        submit_s = sub.run()
        done = wait_until(lambda: _one(db, "SELECT COUNT(*) FROM tasks WHERE state="
                                       "'succeeded'") >= tasks - sub.ids.count(None),
                          max(120.0, tasks / 50), 1.0)
        cpu1 = cpu_s(serve.proc.pid), sum(cpu_s(p) for p in backends)
        rows = _rows(db, "wq")
        size = store_bytes(db)
        swarm_totals = swarm.totals()
    finally:
        swarm.stop()
        serve.stop()
    got = check(sub, rows)
    finals, latency = got.pop("_finals"), got.pop("_latency")
    first = min(sub.sent_at) if tasks else wall0
    total_s = (max(finals) - first) if finals else None
    ordered = sorted(finals)
    lo, hi = int(0.1 * len(ordered)), int(0.9 * len(ordered)) - 1
    steady = (hi - lo) / (ordered[hi] - ordered[lo]) if hi > lo and ordered[hi] > ordered[lo] \
        else None
    series = depth_series([s for s, t in zip(sub.sent_at, sub.ids, strict=True) if t],
                          finals, first)
    return {"tasks": tasks, "rate_asked": rate, "nodes": nodes, "submit_threads": threads,
            "batch": sub.batch,
            "all_final": done, **got,
            "submit_s": round(submit_s, 1), "offered_rate": round(tasks / submit_s, 1),
            "total_s": round(total_s, 1) if total_s else None,
            "steady_rate": round(steady, 1) if steady else None,
            "latency_p50_ms": _r(_pct(latency, 50)), "latency_p99_ms": _r(_pct(latency, 99)),
            "post_p50_ms": _r(_pct(sub.post_ms, 50)), "post_p99_ms": _r(_pct(sub.post_ms, 99)),
            "post_errors": sub.errors, "max_depth": max((d for _, d in series), default=0),
            "store_bytes": size, "bytes_per_task": round(size / tasks) if tasks else None,
            "serve_cpu_ms_per_task": round((cpu1[0] - cpu0[0]) * 1000 / tasks, 3),
            "db_cpu_ms_per_task": round((cpu1[1] - cpu0[1]) * 1000 / tasks, 3)
            if backends else None,
            "swarm_duplicates": int(swarm_totals.get("duplicates", 0)),
            "target_met": bool(tasks >= 1_000_000 and total_s is not None and total_s <= TARGET_S
                               and got["sum_exact"]),
            "depth": series, "load_average": os.getloadavg()}


def _r(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


def plot(results: dict[str, dict[str, Any]], path: Path = PLOT) -> Path | None:
    """Depth of tasks not yet final over time, one line per store; None without
    matplotlib (the figures are reported all the same)."""
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib: no depth plot", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, r in results.items():
        if r.get("depth"):
            xs, ys = zip(*r["depth"], strict=True)
            ax.plot(xs, ys, label=f"{label}: {r['tasks']:,} tasks at {r['rate_asked']:g}/s "
                                  f"asked, {r['steady_rate']}/s steady")
    ax.set_xlabel("seconds since the first submit")
    ax.set_ylabel("tasks submitted, not yet final")
    ax.set_title("Work queue through `edgerun serve`: depth over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def item10(tmp: Path, *, tasks: int, rate: float, nodes: int, threads: int = 4,
           stores: tuple[str, ...] = ("sqlite", "postgresql"), batch: int = 100
           ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    broker = mosquitto(tmp / "mosquitto-wq")
    try:
        for label in stores:
            if label == "sqlite":
                out[label] = workqueue(tmp, broker.url, str(tmp / "wq.db"), tasks, rate, nodes,
                                       threads, batch=batch)
            else:
                name, pg = _pg_database()
                try:
                    out[label] = workqueue(tmp, broker.url, pg, tasks, rate, nodes, threads,
                                           batch=batch)
                finally:
                    _drop(name)
            print(json.dumps({label: {k: v for k, v in out[label].items() if k != "depth"}}),
                  flush=True)
    finally:
        broker.stop()
    made = plot(out)
    return {"runs": out, "plot": str(made.relative_to(ROOT)) if made else None}


def render(r: dict[str, Any]) -> list[str]:
    lines = ["## 10. Work queue: N integers through `edgerun serve`, summed", "",
             "Each task `echo K` to one of the simulated nodes (bench/swarm.py --echo), sent "
             "in batches (POST /v1/task-batches; batch 1: POST /v1/tasks per task) on "
             "keep-alive connections at a steady rate; the sum of the "
             "recorded outputs is read back from the store. Latency: submit to the final's "
             "`updated_at`. Target: <= 20 min for 1,000,000 tasks.", "",
             "| store | tasks | batch | asked/s | offered/s | total s | steady/s | p50 ms | "
             "p99 ms | "
             "sum exact | lost | twice | max depth | store MiB | serve CPU ms/task | "
             "db CPU ms/task | 20 min |", "|" + "---|" * 17]
    for label, x in r["runs"].items():
        projected = 1_000_000 / x["steady_rate"] if x.get("steady_rate") else None
        lines.append(
            f"| {label} | {x['tasks']:,} | {x.get('batch', 1)} | {x['rate_asked']:g} | "
            f"{x['offered_rate']} | "
            f"{x['total_s']} | {x['steady_rate']} | {x['latency_p50_ms']} | "
            f"{x['latency_p99_ms']} | {'yes' if x['sum_exact'] else 'NO'} | {x['lost']} | "
            f"{x['twice']} | {x['max_depth']:,} | {x['store_bytes'] / 2**20:.1f} | "
            f"{x['serve_cpu_ms_per_task']} | {x['db_cpu_ms_per_task'] or '-'} | "
            + (("met" if x["target_met"] else "**missed**") if x["tasks"] >= 1_000_000 else
               f"1M at this rate: {projected / 60:.0f} min" if projected else "-") + " |")
    if r.get("plot"):
        # results.md sits in bench/results/, RESULTS.md in bench/ beside the plot
        lines += ["", f"![depth](../{Path(r['plot']).name})"]
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="tasks per second asked")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=4, help="submitting connections")
    parser.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--batch", type=int, default=100,
                        help="tasks per POST /v1/task-batches (1 to 1000); 1: one POST "
                             "/v1/tasks per task")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= 1000:
        parser.error("--batch takes 1 to 1000 tasks (a batch's limit, api/batch.py)")
    stores = ("sqlite", "postgresql") if args.store == "both" else (args.store,)
    with tempfile.TemporaryDirectory(prefix="edgerun-wq-") as tmp:
        out = item10(Path(tmp), tasks=args.tasks, rate=args.rate, nodes=args.nodes,
                     threads=args.threads, stores=stores, batch=args.batch)
    print("\n".join(render(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
