"""Node look-ups read what they need (issue 22, item 6 "look-ups are single-row reads"):
a node's page by id or unique prefix, the node list by glob, and dispatch by id or glob
read rows or a range of the primary key, not every node's record. Hostile ids and
globs first; then what the answers say, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerun.protocol import Status
from edgerun.scheduler.store.tasks import Store

from .apikit import FakeFleet, Stack, stack, wait_for
from .pg import fresh_database, pg_database, pg_url  # noqa: F401  (fixtures)

NASTY = ["%", "_", "'", "' OR 1=1 --", "rk\\", "rk%", "é", "\U0010ffff", "rk-0\x00",
         "a" * 300]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    target = str(tmp_path / "s.db") if request.param == "sqlite" \
        else request.getfixturevalue("pg_url")
    opened = Store(target)
    for i in range(1200):
        opened.apply_status(Status(f"rk-{i:04d}", "online" if i % 3 else "offline",
                                   facts={"i": i}))
    opened.apply_status(Status("rk_x", "online"))  # `_` is a LIKE wildcard: never one here
    opened.apply_status(Status("other", "online"))
    yield opened
    opened.close()


def test_hostile_prefixes_match_literally_and_find_nothing(store: Store) -> None:
    for text in NASTY:
        assert store.node_states(text) == [], text
        assert store.node_ids_with_prefix(text, 11) == [], text
        assert store.nodes_by_ids([text]) == [], text


def test_a_prefix_reads_its_range_in_id_order(store: Store) -> None:
    got = store.node_states("rk-00")
    assert [n for n, _ in got] == [f"rk-{i:04d}" for i in range(100)]
    assert dict(got)["rk-0000"] == "offline" and dict(got)["rk-0001"] == "online"
    assert store.node_ids_with_prefix("rk-", 3) == ["rk-0000", "rk-0001", "rk-0002"]
    assert store.node_ids_with_prefix("rk_", 3) == ["rk_x"]
    assert len(store.node_states("")) == 1202


def test_ids_are_read_in_batches_whole_and_once(store: Store) -> None:
    wanted = [f"rk-{i:04d}" for i in range(1199, -1, -1)] + ["rk-0005", "nope"]
    got = store.nodes_by_ids(wanted)
    assert [n.node for n in got] == [f"rk-{i:04d}" for i in range(1200)]
    assert got[7].facts == {"i": 7} and got[7].state == "online"
    states = store.node_states_of(wanted)
    assert [n for n, _ in states] == [f"rk-{i:04d}" for i in range(1200)]
    assert dict(states)["rk-0003"] == "offline"
    assert store.node_states_of(["\x00", "%", "nope"]) == []


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def s(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
      ) -> Iterator[Stack]:
    over = {"db": fresh_database(request.getfixturevalue("pg_database"))} \
        if request.param == "postgresql" else {}
    with stack(tmp_path_factory.mktemp("lookups"), node="lk-agent", **over) as st:
        yield st


@pytest.fixture(scope="module")
def fleet(s: Stack) -> Iterator[FakeFleet]:
    fake = FakeFleet(s.mosquitto.url)
    fake.online([f"lk-{i:03d}" for i in range(30)], macs=["52:54:00:00:00:01"])
    fake.online(["lkz-1", "lkz-2"])
    api = s.api()
    wait_for(lambda: api.get("/nodes", match="lk*", online=1)["total"] == 33, 60)
    yield fake
    fake.close()


def test_hostile_node_paths_get_json_errors(s: Stack, fleet: FakeFleet) -> None:
    for path, status in (("/v1/nodes/%25", 404), ("/v1/nodes/%27%20OR%201%3D1", 404),
                         ("/v1/nodes/lk-0%2A", 404), ("/v1/nodes/" + "a" * 129, 404),
                         ("/v1/nodes/lk", 409), ("/v1/nodes/lk-", 409),
                         ("/v1/nodes/lk%00", 422), ("/v1/nodes/lk-001%00", 422),
                         ("/v1/tasks/a%00", 422), ("/v1/tasks/%25", 404),
                         ("/v1/tasks/a%00?node=lk-001", 422),
                         ("/v1/tasks/a?node=lk%00", 422)):
        got = s.http("GET", path, s.viewer)
        assert got.status == status, (path, got.status, got.body)
        assert isinstance(got.body, dict) and got.body.get("error"), (path, got.body)
    ambiguous = s.http("GET", "/v1/nodes/lk-0", s.viewer).body
    assert ambiguous["code"] == "ambiguous"
    assert ambiguous["candidates"] == [f"lk-{i:03d}" for i in range(10)]
    for match in ("%", "'", "lk-0%", "lk_*"):
        got = s.http("GET", f"/v1/nodes?match={match.replace('%', '%25')}", s.viewer)
        assert got.status in (400, 404, 422), (match, got.status, got.body)
        assert got.body.get("error"), got.body


def test_a_node_by_id_or_unique_prefix(s: Stack, fleet: FakeFleet) -> None:
    api = s.api()
    assert api.get("/nodes/lk-017")["node"] == "lk-017"
    assert api.get("/nodes/lkz-2")["node"] == "lkz-2"
    assert api.get("/nodes/lk-a")["node"] == "lk-agent"  # unique prefix
    assert api.get("/nodes/lk-agent")["facts"]["hostname"]


def test_glob_pages_follow_the_cursor_with_whole_records(s: Stack, fleet: FakeFleet) -> None:
    api = s.api()
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = api.get("/nodes", match="lk-0*", limit=7, **({"cursor": cursor} if cursor else {}))
        assert page["total"] == 30
        seen.extend(page["nodes"])
        cursor = page["next"]
        if cursor is None:
            break
    assert [n["node"] for n in seen] == [f"lk-{i:03d}" for i in range(30)]
    assert all(n["facts"]["macs"] == ["52:54:00:00:00:01"] for n in seen)
    both = api.get("/nodes", match=["lkz-2", "lk-029", "lkz-1"], limit=2)
    assert [n["node"] for n in both["nodes"]] == ["lk-029", "lkz-1"] and both["total"] == 3
    assert api.get("/nodes", match="lkz-*", state="offline")["total"] == 0
    assert api.get("/nodes", match=["lkz-*", "lk-00*"], online=1)["total"] == 12


def test_dispatch_by_glob_id_and_mac_still_chooses_the_same_nodes(
        s: Stack, fleet: FakeFleet) -> None:
    api = s.api(s.operator)
    made = api.post("/tasks", {"targets": ["lkz-*", "lk-001"],
                               "task": {"type": "shell", "command": "true"}})["tasks"]
    assert sorted(t["node"] for t in made) == ["lk-001", "lkz-1", "lkz-2"]
    several = s.http("POST", "/v1/tasks", s.operator,
                     {"targets": ["52:54:00:00:00:01"],
                      "task": {"type": "shell", "command": "true"}})
    assert several.status == 422 and "several nodes" in several.body["error"]
    missing = s.http("POST", "/v1/tasks", s.operator,
                     {"targets": ["lkq-*"], "task": {"type": "shell", "command": "true"}})
    assert missing.status == 404 and "no known node matches" in missing.body["error"]


def test_a_task_by_id_is_one_row_and_a_hostile_node_finds_nothing(store: Store) -> None:
    from edgerun.protocol import ShellTask
    nodes = [f"rk-{i:04d}" for i in range(1200)]
    store.add_tasks(nodes, ShellTask(id="fan", command="true"), source="api")
    assert store.task_exists("fan") and not store.task_exists("fa")
    assert not store.task_exists("fan\x00") and not store.task_exists("%")
    assert [t.node for t in store.find("fan", "rk-0007")] == ["rk-0007"]
    for bad in ("rk-0007\x00", "%", "' OR 1=1 --", ""):
        assert store.find("fan", bad) == [], bad


def test_cancel_with_a_hostile_node_is_a_clear_answer(s: Stack, fleet: FakeFleet) -> None:
    api = s.api(s.operator)
    api.post("/tasks", {"targets": ["lkz-1"], "task": {"type": "shell", "command": "true",
                                                       "id": "hostile-cancel"}})
    for node in ("lkz-1\x00", "%", "' OR 1=1 --", "x" * 500):
        got = s.http("POST", "/v1/tasks/hostile-cancel/cancel", s.operator, {"node": node})
        assert got.status in (404, 422), (node, got.status, got.body)
        assert got.body.get("error"), got.body
