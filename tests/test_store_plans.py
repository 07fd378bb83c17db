"""PostgreSQL reads tasks by key through the index however the table grew.

psycopg prepares a statement that runs five times and PostgreSQL then reuses a generic plan
made with the statistics of that moment. The tasks table of a fresh store grows from
nothing to thousands of rows in seconds, before autovacuum analyzes it: the keyed read,
written as a semi-join, got a hash over a scan of the whole table while the table was a
handful of rows and kept it (issue 22: a one-task POST cost more database CPU the more
tasks the table held). Its shape now leaves one plan, a probe of the unique index per key.
The test asks PostgreSQL for the plan of the very statement psycopg prepared
(`EXPLAIN EXECUTE` of its name in pg_prepared_statements).
"""

from __future__ import annotations

from edgerun.protocol import ShellTask
from edgerun.scheduler.store.tasks import Store

from .pg import pg_database, pg_url  # noqa: F401  (fixtures)


def test_keyed_reads_probe_the_index_after_the_table_grew(pg_url: str) -> None:  # noqa: F811
    store = Store(pg_url)
    try:
        store.add_tasks(["n1", "n2"], ShellTask(id="t0", command="true"), source="api")
        for _ in range(15):  # prepared, and planned generically, while the table is tiny
            assert len(store.tasks_of([("n1", "t0")])) == 1
        nodes = [f"n{i:05d}" for i in range(3000)]
        for j in range(3):
            store.add_tasks(nodes, ShellTask(id=f"t{j + 1}", command="true"), source="api")
        found = store.tasks_of([("n00007", "t2"), ("n1", "t0"), ("n1", "nope")])
        assert sorted((t.node, t.id) for t in found) == [("n00007", "t2"), ("n1", "t0")]
        with store.read() as db:
            prepared = [str(r[0]) for r in db.execute(
                "SELECT name FROM pg_prepared_statements WHERE statement LIKE %s "
                "AND statement LIKE %s", ("%unnest%", "%FROM tasks%")).fetchall()]
            assert prepared, "the keyed read was not prepared"
            plans = ["\n".join(str(r[0]) for r in db.execute(
                f"EXPLAIN EXECUTE {name}('{{n00007,n1}}', '{{t2,t0}}')").fetchall())
                for name in prepared]
    finally:
        store.close()
    for plan in plans:
        assert "Seq Scan on tasks" not in plan, plan
        assert "Index Scan" in plan, plan
