"""PostgreSQL plans each run of a store's statement with the table as it is now.

psycopg prepares a statement that runs five times and PostgreSQL then reuses a generic plan
made with the statistics of that moment. The tasks table of a fresh store grows from
nothing to thousands of rows in seconds, before autovacuum analyzes it: a generic plan
made at a handful of rows read every row for each keyed read (issue 22: a one-task POST
cost more database CPU the more tasks the table held). The store's connection asks for
custom plans, which PostgreSQL reports per prepared statement.
"""

from __future__ import annotations

from edgerun.protocol.messages import ShellTask
from edgerun.scheduler.store.tasks import Store

from .pg import pg_database, pg_url  # noqa: F401  (fixtures)


def test_keyed_reads_are_planned_with_the_table_as_it_is(pg_url: str) -> None:  # noqa: F811
    store = Store(pg_url)
    try:
        store.add_tasks(["n1", "n2"], ShellTask(id="t0", command="true"), source="api")
        for _ in range(15):  # past psycopg's prepare threshold, while the table is tiny
            assert len(store.tasks_of([("n1", "t0")])) == 1
        nodes = [f"n{i:05d}" for i in range(3000)]
        for j in range(3):
            store.add_tasks(nodes, ShellTask(id=f"t{j + 1}", command="true"), source="api")
        for _ in range(4):
            found = store.tasks_of([("n00007", "t2"), ("n1", "t0"), ("n1", "nope")])
            assert sorted((t.node, t.id) for t in found) == [("n00007", "t2"),
                                                                   ("n1", "t0")]
        with store.read() as db:
            plans = db.execute("SELECT statement, generic_plans, custom_plans "
                               "FROM pg_prepared_statements").fetchall()
    finally:
        store.close()
    keyed = [p for p in plans if "unnest" in str(p[0]) and "FROM tasks" in str(p[0])]
    assert keyed, plans  # the keyed read was prepared: it ran more than 5 times
    assert all(p[1] == 0 and p[2] >= 14 for p in keyed), keyed
