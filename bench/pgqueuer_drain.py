"""Issue 22's anchor: PGQueuer, a PostgreSQL job queue for Python, draining no-op jobs.

`python bench/pgqueuer_drain.py [--jobs N]`: a database of its own on the local
PostgreSQL, PGQueuer's schema installed, N jobs enqueued in one call, then one
QueueManager (batch 10, mode drain, a no-op entrypoint) until the queue is empty.
Prints jobs/s, and the CPU per job of this process and of the PostgreSQL backends
(from /proc). Run it beside bench/fanout.py on the same machine and database server:
the issue's target is edgerun's PostgreSQL tasks/s >= 0.35x this drain rate.
Needs `pgqueuer` (the bench extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.controlplane import _drop, _pg_database
from bench.fanout import cpu_s


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drain(url: str, jobs: int) -> dict[str, Any]:
    import psycopg
    from pgqueuer import PsycopgDriver, QueueManager
    from pgqueuer.models import Job
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        driver = PsycopgDriver(conn)
        queries = Queries(driver)
        await queries.install()
        for start in range(0, jobs, 10_000):
            n = min(10_000, jobs - start)
            await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
        backends = [int(r[0]) for r in await (await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname=current_database()")).fetchall()]
        qm = QueueManager(queries)
        done = 0

        @qm.entrypoint("noop")
        async def noop(_job: Job) -> None:
            nonlocal done
            done += 1
        cpu0, db0 = _self_cpu(), sum(cpu_s(p) for p in backends)
        t0 = time.monotonic()
        await qm.run(batch_size=10, mode=QueueExecutionMode.drain)
        elapsed = time.monotonic() - t0
        cpu1, db1 = _self_cpu(), sum(cpu_s(p) for p in backends)
        return {"jobs": jobs, "done": done, "seconds": round(elapsed, 2),
                "jobs_per_s": round(done / elapsed, 1),
                "worker_cpu_ms_per_job": round((cpu1 - cpu0) * 1000 / max(done, 1), 3),
                "db_cpu_ms_per_job": round((db1 - db0) * 1000 / max(done, 1), 3)}
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    args = parser.parse_args(argv)
    name, url = _pg_database()
    try:
        print(json.dumps({"pgqueuer": asyncio.run(drain(url, args.jobs))}), flush=True)
    finally:
        _drop(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
