"""The store's SQL lives in one file of named queries per back end (store/sql/): both files
define the same names, every name the code asks for exists, every query in them is used,
the migrations agree with SCHEMA_VERSION, and a file that misses a name is a clear error.
The plans of the hot and list queries keep using their indexes (SQLite's EXPLAIN QUERY
PLAN here; PostgreSQL's in the store's README)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerun.protocol import ShellTask
from edgerun.scheduler.errors import StoreError
from edgerun.scheduler.store import queries
from edgerun.scheduler.store.db import PostgresDatabase
from edgerun.scheduler.store.schema import MIGRATIONS, SCHEMA_VERSION
from edgerun.scheduler.store.tasks import Store

from .pg import pg_database, pg_url  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
CALL = re.compile(r"""\.(?:run|one|all)\(\s*["'](\w+)["']|_sql\(\s*["'](\w+)["']""")
LITERAL = re.compile(r"""["'](\w+)["']""")


def _sources() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "edgerun").rglob("*.py"))


def test_both_back_ends_define_the_same_names() -> None:
    files = queries.load()
    sqlite, pg = set(files["sqlite"]), set(files["postgresql"])
    assert queries.shared(sqlite) == queries.shared(pg)
    assert sqlite - pg == {n for n in sqlite if n.startswith("sqlite_")}
    assert pg - sqlite == {n for n in pg if n.startswith("pg_")}


def test_every_name_the_code_runs_exists_and_every_query_is_used() -> None:
    files = queries.load()
    code = _sources()
    called = {a or b for a, b in CALL.findall(code)}
    assert called, "the pattern finds the calls"
    for kind, named in files.items():
        prefix = queries.ONLY["postgresql" if kind == "sqlite" else "sqlite"]
        missing = {n for n in called if not n.startswith(prefix)} - set(named)
        assert not missing, f"sql/{kind}.sql lacks {sorted(missing)}"
    literals = set(LITERAL.findall(code))
    migrations = set(MIGRATIONS.values())
    unused = {n for f in files.values() for n in f} - literals - migrations
    assert not unused, f"queries no code names: {sorted(unused)}"


def test_migrations_are_named_queries_numbered_up_to_the_schema_version() -> None:
    assert {n: f"migrate_{n}" for n in range(1, SCHEMA_VERSION + 1)} == MIGRATIONS
    for kind, named in queries.load().items():
        numbers = sorted(int(n.split("_")[1]) for n in named if n.startswith("migrate_"))
        assert numbers == list(range(1, SCHEMA_VERSION + 1)), kind


def test_pg_listen_listens_on_the_channel_notify_uses() -> None:
    assert queries.of("postgresql")["pg_listen"] == f"LISTEN {PostgresDatabase.CHANNEL}"


def test_a_name_one_back_end_lacks_is_a_store_error_naming_it() -> None:
    with pytest.raises(StoreError, match=r"sql/postgresql.sql lacks get_task") as info:
        queries.check({"sqlite": {"get_task": "SELECT 1", "a": "x"},
                       "postgresql": {"a": "x", "pg_ping": "SELECT 1"}})
    assert "\n" not in str(info.value)
    with pytest.raises(StoreError, match=r"sql/sqlite.sql defines postgresql-only pg_x"):
        queries.check({"sqlite": {"pg_x": "x"}, "postgresql": {"pg_x": "x"}})


def test_the_parser_refuses_a_duplicate_an_empty_or_a_bad_name() -> None:
    text = "-- header\n-- name: a\nSELECT 1;\n-- a comment with 50% and ?\n-- name: b\nSELECT ?\n"
    assert queries.parse(text) == {"a": "SELECT 1", "b": "SELECT ?"}
    with pytest.raises(StoreError, match="defined twice"):
        queries.parse("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n")
    with pytest.raises(StoreError, match="'a' is empty"):
        queries.parse("-- name: a\n-- only a comment\n")
    with pytest.raises(StoreError, match="bad query name"):
        queries.parse("-- name: drop table\nSELECT 1\n")


def test_an_unknown_name_is_a_store_error(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.db"))
    try:
        with pytest.raises(StoreError, match="no query named 'nope' for sqlite"):
            store.db.run("nope")
    finally:
        store.close()


def test_lists_and_rows_reach_both_back_ends(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    """An IN list, a multi-row insert and keyed reads: the same arguments on both back
    ends, empty ones too."""
    for target in (str(tmp_path / "s.db"), pg_url):
        store = Store(target)
        try:
            with store.transaction() as tx:
                tx.db.run_many("insert_updates", [])
                tx.db.run_many("insert_updates", [
                    ("n1", "t1", "running", None, "2026", "{}"),
                    ("n1", "t1", "accepted", "at", "2026", '{"x": "50% \\u00e9 ?"}')])
            rows = store.db.all("task_history", ("n1", "t1"))
            assert [r["body"] for r in rows] == ['{"x": "50% \\u00e9 ?"}', "{}"], target
            assert store.db.one("fleet_job_unsucceeded", ("j", []))[0] == 0
            assert store.db.all("tasks_by_keys", (queries.Rows([], 2),)) == []
            store.add_tasks(["a", "b"], ShellTask(id="t", command="true"), source="api")
            got = store.db.all("tasks_by_keys", (queries.Rows([("b", "t"), ("x", "t"),
                                                                ("a", "t")], 2),))
            assert [(r["node"], r["id"]) for r in got] == [("a", "t"), ("b", "t")], target
        finally:
            store.close()


BY_NODE = ("tasks_by_node_state", "tasks_by_root", "sqlite_autoindex_tasks_1")
PLANS = {
    # name: (arguments, the indexes the plan may use: as the SQL built per call did)
    "get_task": (("n", "t"), ("sqlite_autoindex_tasks_1",)),
    "transition_verdict": (("s", "u", None, None, "n", "t", ["running"]),
                         ("sqlite_autoindex_tasks_1",)),
    "find_tasks": (("t",), ("tasks_by_id",)),
    "task_page_by_node": ({"node": "n", "state": None, "job": None, "before": 9,
                           "limit": 5}, BY_NODE),
    "fleet_ready_on_nodes": (("s%", 1.0, 1.0, ["a", "b"]), ("tasks_by_state", *BY_NODE)),
    "fleet_outstanding_by_node": ((["a"], ["running"], "s%", 1.0), BY_NODE),
    "job_target_rows": (("j", ["a", "b"]), ("tasks_by_job",)),
    "touch_nodes": (("x", ["a", "b"]), ("sqlite_autoindex_nodes_1",)),
    "node_states_in_range": (("rk", "rk\U0010ffff"), ("sqlite_autoindex_nodes_1",)),
    "node_ids_in_range": (("rk", "rk\U0010ffff", 11), ("sqlite_autoindex_nodes_1",)),
    "nodes_by_ids": ((["a", "b"],), ("sqlite_autoindex_nodes_1",)),
    "node_states_by_ids": ((["a", "b"],), ("sqlite_autoindex_nodes_1",)),
    "count_tasks_in_states": ((["queued", "running"],), ("tasks_by_state",)),
    "overview_failed_since": (("2026-01-01", ["failed", "lost"]),
                              ("tasks_by_updated", "tasks_by_state")),
    "overview_outcomes": (("2026-01-01", ["failed", "lost"]),
                          ("tasks_by_updated", "tasks_by_state")),
    "overview_latest_failures": ({"states": ["failed", "lost"], "limit": 10},
                                 ("tasks_by_updated",)),
    "task_history": (("n", "t"), ("updates_by_task",)),
    "lock_tasks_by_keys": ((queries.Rows([("n", "t")] * 250, 2),),
                           ("sqlite_autoindex_tasks_1",)),
    "prune_tasks": (([1],), ("INTEGER PRIMARY KEY",)),
    "prune_task_updates": (([1],), ("updates_by_task",)),  # was a SCAN of updates
}


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """A store with some history, analysed: the planner chooses with statistics."""
    store = Store(str(tmp_path_factory.mktemp("plans") / "s.db"))
    nodes = [f"n{i:04d}" for i in range(500)]
    for j in range(8):
        store.add_tasks(nodes, ShellTask(id=f"t{j}", command="true"), source="api",
                        job_id=f"j{j % 2}", step=j)
    with store.db.write() as db:
        db.execute("ANALYZE")
    yield store
    store.close()


WALKS = {"overview_latest_failures"}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_sqlite_plans_use_the_indexes(populated: Store, name: str) -> None:
    args, index = PLANS[name]
    plan = " | ".join(populated.db.explain(name, args))
    assert any(f"USING {i}" in plan or f"USING INDEX {i}" in plan
               or f"USING COVERING INDEX {i}" in plan for i in index), plan
    if name in WALKS:  # newest first along the index, stopped by LIMIT: a walk by design
        plan = plan.replace(f"SCAN tasks USING INDEX {index[0]}", "WALK")
    assert not re.search(r"\bSCAN (tasks|updates|nodes|t)\b", plan), plan


# the list pages' SQL as it was built per call: the fixed queries are planned the same
BUILT = {
    "task_page_by_job": ("SELECT * FROM tasks WHERE state != '__new__' AND job_id=? AND "
                         "seq < ? ORDER BY seq DESC LIMIT ?", ("j1", 9999, 5),
                         {"job": "j1", "state": None, "before": 9999, "limit": 5}),
    "task_page_by_state": ("SELECT * FROM tasks WHERE state != '__new__' AND state=? AND "
                           "seq < ? ORDER BY seq DESC LIMIT ?", ("queued", 9999, 5),
                           {"state": "queued", "before": 9999, "limit": 5}),
    "task_page_by_node": ("SELECT * FROM tasks WHERE state != '__new__' AND node=? AND "
                          "seq < ? ORDER BY seq DESC LIMIT ?", ("n0001", 9999, 5),
                          {"node": "n0001", "state": None, "job": None, "before": 9999,
                           "limit": 5}),
    "task_page": ("SELECT * FROM tasks WHERE state != '__new__' AND seq < ? ORDER BY seq "
                  "DESC LIMIT ?", (9999, 5), {"before": 9999, "limit": 5}),
}


@pytest.mark.parametrize("name", sorted(BUILT))
def test_sqlite_list_pages_are_planned_as_the_sql_built_per_call(populated: Store,
                                                                 name: str) -> None:
    built, args, named = BUILT[name]
    db = populated.db
    was = [str(r[-1]) for r in db.execute("EXPLAIN QUERY PLAN " + built, args)]
    assert db.explain(name, named) == was
