"""store/records.py: the typed task and node rows give the JSON the API always gave.

Rows of a real SQLite file and of a real PostgreSQL database (tests/pg.py), every column
written with a fixed value through the store's own named queries, read back through the
store's public methods: `to_json()` must be, key for key and in the same order, the dict
`task_dict` / `node_dict` returned before the records existed (the fixed dicts below).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerun.protocol import FINAL_STATES, ShellTask
from edgerun.protocol.messages import Error
from edgerun.scheduler.store.fleetdb import FleetDB
from edgerun.scheduler.store.records import FINAL, FleetTaskRow, NodeRow, TaskRow
from edgerun.scheduler.store.tasks import Store

from .pg import pg_database, pg_url  # noqa: F401  (fixtures)

CREATED, UPDATED, SENT = ("2026-12-01T10:00:00.000Z", "2026-12-01T10:00:05.250Z",
                          "2026-12-01T10:00:01.000Z")
EXPIRES = "2026-12-02T10:00:00.000Z"
SPEC = {"v": 1, "kind": "task", "id": "known.a2", "type": "shell", "command": "exit 3",
        "timeout": 30.0, "expires_at": EXPIRES}
RETRY = {"retries": 2, "on": ["failed"], "delay": 1.5}
RESULT = {"exit_code": 3, "stdout": "out\n", "stderr": "", "duration_s": 0.25}

# what GET /v1/tasks/known.a2 listed for this task before (task_dict), in its key order
EXPECTED_TASK = {
    "id": "known.a2", "node": "rack1-a", "type": "shell", "state": "failed", "source": "job",
    "created_at": CREATED, "updated_at": UPDATED, "dispatched_at": SENT, "timeout": 30.0,
    "expires_at": EXPIRES, "deadline": None, "exit_code": 3,
    "error": {"code": "exit_nonzero", "message": "exit status 3"}, "result": RESULT,
    "spec": SPEC, "job": "known", "step": 2, "attempt": 2, "parent": "known",
    "root": "known", "retry": RETRY, "rollout": "r-1", "hold": None,
}
EXPECTED_NODE = {
    "node": "rack1-a", "state": "online", "first_seen": CREATED, "last_seen": UPDATED,
    "changed_at": UPDATED, "agent": "0.9.1", "facts": {"arch": "x86_64", "cpus": 8},
    "running": ["known.a2"],
}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    target = str(tmp_path / "s.db") if request.param == "sqlite" \
        else request.getfixturevalue("pg_url")
    opened = Store(target)
    yield opened
    opened.close()


def write_known_task(store: Store) -> None:
    """The known task, every column a fixed value (the store's named queries)."""
    task = ShellTask(id="known.a2", command="exit 3", timeout=30.0)
    with store.transaction() as tx:
        tx.run("insert_tasks", ("known.a2", "shell", json.dumps(SPEC), "job", "queued",
                                CREATED, CREATED, None, task.timeout, EXPIRES, None, None,
                                "known", 2, json.dumps(RETRY), None, ["rack1-a"]))
        tx.run("write_task", ("running", "failed", UPDATED, SENT, None, None, 3,
                              "exit_nonzero", "exit status 3", json.dumps(RESULT),
                              "rack1-a", "known.a2"))
    FleetDB(store).set_fleet("rack1-a", "known.a2", attempt=2, parent_id="known",
                             root_id="known", rollout_id="r-1", hold="job", not_before=12.5)


def test_a_known_task_reads_back_as_the_json_the_api_gave(store: Store) -> None:
    write_known_task(store)
    row = store.get("rack1-a", "known.a2")
    assert isinstance(row, TaskRow)
    assert row.error == Error("exit_nonzero", "exit status 3") and row.final
    assert row.hold is None  # a hold shows only while the task is queued
    assert row.to_json() == EXPECTED_TASK
    assert list(row.to_json()) == list(EXPECTED_TASK)  # the same keys in the same order
    assert json.dumps(row.to_json()) == json.dumps(EXPECTED_TASK)
    # every read of the store gives the same record
    assert store.find("known.a2") == [row]
    assert store.tasks_of([("rack1-a", "known.a2"), ("rack1-a", "nope")]) == [row]
    assert store.task_page(node="rack1-a")[0] == [row]
    assert store.job_steps("known", "rack1-a") == [row]
    store.add_job("known", ["rack1-a"], [SPEC])
    job = store.job("known")
    assert job is not None and job.tasks == [row] and job.nodes == ["rack1-a"]
    head = store.job_head("known")
    assert head is not None and head.tasks == [] and head.steps == [SPEC]


def test_a_fleet_read_adds_its_claim_and_position_and_nothing_else(store: Store) -> None:
    write_known_task(store)
    fleet = FleetDB(store).task("rack1-a", "known.a2")
    assert isinstance(fleet, FleetTaskRow) and fleet.not_before == 12.5 and fleet.seq >= 1
    as_json = fleet.to_json()
    assert as_json == {**EXPECTED_TASK, "not_before": 12.5, "seq": fleet.seq}
    assert list(as_json) == [*EXPECTED_TASK, "not_before", "seq"]
    assert TaskRow.to_json(fleet) == EXPECTED_TASK


def test_a_queued_task_shows_its_hold_and_a_copy_with_changes_is_a_new_record(
        store: Store) -> None:
    [change] = store.add_tasks(["n1"], ShellTask(id="q", command="true"), source="api",
                               hold="job", job_id="j", step=0)
    task = change.task
    assert change.previous is None and task.state == "queued" and task.hold == "job"
    assert task.to_json()["hold"] == "job" and task.attempt == 1 and task.error is None
    assert task.to_json()["error"] is None and task.to_json()["result"] is None
    moved = dataclasses.replace(task, state="canceled")
    assert moved.state == "canceled" and task.state == "queued"  # records are frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.state = "lost"  # type: ignore[misc]
    assert store.get("n1", "q") == task


def test_a_known_node_reads_back_as_the_json_the_api_gave(store: Store) -> None:
    with store.transaction() as tx:
        tx.run("insert_node_placeholder", ("rack1-a", "__new__", CREATED, CREATED, CREATED))
        tx.run("update_node_status", ("online", UPDATED, "online", UPDATED, "0.9.1",
                                      json.dumps({"arch": "x86_64", "cpus": 8}),
                                      json.dumps(["known.a2"]), "rack1-a"))
    node = store.node("rack1-a")
    assert isinstance(node, NodeRow) and node.facts == {"arch": "x86_64", "cpus": 8}
    assert node.to_json() == EXPECTED_NODE and list(node.to_json()) == list(EXPECTED_NODE)
    assert store.nodes() == [node] and store.node_page(state=None, after=None,
                                                       limit=10) == ([node], 1)
    with store.transaction() as tx:  # a node that never said what runs: an empty list
        tx.run("insert_node_placeholder", ("bare", "offline", CREATED, CREATED, CREATED))
    bare = store.node("bare")
    assert bare is not None and bare.to_json() == {
        "node": "bare", "state": "offline", "first_seen": CREATED, "last_seen": CREATED,
        "changed_at": CREATED, "agent": None, "facts": None, "running": []}


def test_the_final_states_are_the_protocols() -> None:
    assert set(FINAL) == {str(state) for state in FINAL_STATES}
    assert list(FINAL) == sorted(FINAL)
