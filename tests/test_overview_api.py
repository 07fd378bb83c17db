"""The overview's aggregates and the job view's filtered tasks, over HTTP against a live
service with simulated nodes (retained status messages) on a private Mosquitto."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerun.protocol import format_time

from .apikit import FakeFleet, Stack, stack, wait_for
from .pg import pg_database, pg_url  # noqa: F401

SIMS = [f"ov-{i:02d}" for i in range(12)]


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("overview"), node="ov-agent") as st:
        yield st


@pytest.fixture(scope="module")
def fleet(s: Stack) -> Iterator[FakeFleet]:
    fake = FakeFleet(s.mosquitto.url)
    fake.online(SIMS)
    api = s.api()
    wait_for(lambda: api.get("/nodes", match="ov-??", online=1)["total"] == len(SIMS), 60)
    yield fake
    fake.close()


def go_offline(fleet: FakeFleet, node: str) -> None:
    body = {"v": 1, "kind": "status", "node": node, "state": "offline", "at": format_time(),
            "agent": "fake", "running": []}
    fleet.client.publish(f"edgerun/nodes/{node}/status", json.dumps(body), qos=1,
                         retain=True).wait_for_publish(30)


def test_overview_counts_nodes_tasks_and_links_the_latest_failures(
        s: Stack, fleet: FakeFleet) -> None:
    api = s.api(s.operator)
    job = api.post("/jobs", {"id": "ov-job", "targets": ["ov-0*"],
                             "steps": [{"type": "shell", "command": "true"}]})
    assert job["progress"]["tasks"] == 10
    for node in SIMS[:7]:
        fleet.finish(node, "ov-job.0")
    for node in SIMS[7:10]:
        fleet.finish(node, "ov-job.0", state="failed", exit_code=1)
    wait_for(lambda: api.get("/jobs/ov-job")["progress"]["done"] == 10, 60)
    about = api.get("/jobs/ov-job/tasks")["job"]
    assert about["ended_at"] is not None and about["ended_at"] >= about["started_at"]
    go_offline(fleet, "ov-11")
    wait_for(lambda: api.get("/overview")["nodes"]["recently_lost"] >= 1, 30)

    view = s.api(s.viewer).get("/overview")  # a viewer reads it
    assert view["nodes"]["online"] == 12  # 11 simulated + the real agent
    assert view["nodes"]["offline"] == 1
    assert view["nodes"]["lost"][0]["node"] == "ov-11"
    assert view["tasks"]["failed_last_hour"] == 3
    assert view["tasks"]["queued"] == 0
    failed = {(f["node"], f["id"]) for f in view["failures"]}
    assert failed == {(n, "ov-job.0") for n in SIMS[7:10]}
    assert all(f["job"] == "ov-job" and f["error"]["code"] == "exit_status"
               for f in view["failures"])

    series = api.get("/overview/series")
    assert len(series["outcomes"]) == 60 and len(series["online"]) == 97
    assert sum(m["succeeded"] for m in series["outcomes"]) == 7
    assert sum(m["failed"] for m in series["outcomes"]) == 3
    assert series["outcomes"][-1]["minute"] <= series["at"]
    assert series["online"][-1]["online"] == 12
    # before the test's nodes came online the count was lower: rebuilt from the event log
    assert series["online"][0]["online"] < 12


def test_overview_needs_a_token(s: Stack) -> None:
    reply = s.http("GET", "/v1/overview")
    assert reply.status == 401 and reply.body["code"] == "unauthorized"
    reply = s.http("GET", "/v1/overview/series", token=s.viewer)
    assert reply.status == 200
    for path, field in (("/v1/overview?since=1h", "since"), ("/v1/overview/series?x=1", "x"),
                        ("/v1/jobs/ov-job/tasks?limit=0", "limit"),
                        ("/v1/jobs/ov-job/tasks?limit=99999999", "limit"),
                        ("/v1/jobs/ov-job/tasks?state=failed&state=lost", "state"),
                        ("/v1/jobs/ov-job/tasks?cursor=%27;drop", "cursor")):
        reply = s.http("GET", path, token=s.viewer)
        assert reply.status == 422 and reply.body["field"] == field, (path, reply.body)
    reply = s.http("POST", "/v1/overview", token=s.operator, body={})
    assert reply.status == 405 and reply.body["code"] == "method_not_allowed"


def test_job_tasks_filter_by_state_failures_first_with_creator_and_times(
        s: Stack, fleet: FakeFleet) -> None:
    api = s.api(s.operator)
    api.post("/jobs", {"id": "ov-filter", "targets": ["ov-0*"],
                       "steps": [{"type": "shell", "command": "true"}]})
    for node in SIMS[:4]:
        fleet.finish(node, "ov-filter.0")
    fleet.finish("ov-05", "ov-filter.0", state="failed", exit_code=1)
    wait_for(lambda: api.get("/jobs/ov-filter")["progress"]["done"] == 5, 60)

    everything = api.get("/jobs/ov-filter/tasks")
    assert everything["total"] == 10 and len(everything["tasks"]) == 10
    assert everything["tasks"][0]["node"] == "ov-05"  # the failure first
    assert everything["tasks"][0]["state"] == "failed"
    about = everything["job"]
    assert about["creator"] == "ops" and about["started_at"] and about["ended_at"] is None
    assert about["progress"]["tasks"] == 10 and about["graph"] is False
    assert everything["counts"]["succeeded"] == 4

    bad = api.get("/jobs/ov-filter/tasks", state="bad")
    assert [t["node"] for t in bad["tasks"]] == ["ov-05"] and bad["total"] == 1
    ok = api.get("/jobs/ov-filter/tasks", state="succeeded", limit=3)
    assert [t["node"] for t in ok["tasks"]] == ["ov-00", "ov-01", "ov-02"]
    rest = api.get("/jobs/ov-filter/tasks", state="succeeded", limit=3, cursor=ok["next"])
    assert [t["node"] for t in rest["tasks"]] == ["ov-03"] and rest["next"] is None

    wrong = s.http("GET", "/v1/jobs/ov-filter/tasks?state=exploded", token=s.viewer)
    assert wrong.status == 422 and wrong.body["field"] == "state"
    wrong = s.http("GET", "/v1/jobs/ov-filter/tasks?cursor=-1", token=s.viewer)
    assert wrong.status == 422 and wrong.body["field"] == "cursor"
    missing = s.http("GET", "/v1/jobs/nope/tasks", token=s.viewer)
    assert missing.status == 404
    api.post("/jobs/ov-filter/cancel", {})



def test_the_same_aggregates_on_postgresql(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    with stack(tmp_path, node="ovpg-agent", db=pg_url) as st:
        fake = FakeFleet(st.mosquitto.url)
        try:
            fake.online(["ovpg-1", "ovpg-2", "ovpg-3"])
            api = st.api(st.operator)
            wait_for(lambda: api.get("/nodes", match="ovpg-?", online=1)["total"] == 3, 60)
            # `_` is a LIKE wildcard: the creator of pg_job_1 is not that of pgXjob_1
            st.api().post("/jobs", {"id": "pgXjob_1", "targets": ["ovpg-3"],
                                    "steps": [{"type": "shell", "command": "true"}]})
            api.post("/jobs", {"id": "pg_job_1", "targets": ["ovpg-?"],
                               "steps": [{"type": "shell", "command": "true"}]})
            fake.finish("ovpg-1", "pg_job_1.0")
            fake.finish("ovpg-2", "pg_job_1.0", state="failed", exit_code=1)
            wait_for(lambda: api.get("/jobs/pg_job_1")["progress"]["done"] == 2, 60)
            view = api.get("/overview")
            assert view["nodes"]["online"] == 4 and view["tasks"]["failed_last_hour"] == 1
            assert [f["node"] for f in view["failures"]] == ["ovpg-2"]
            series = api.get("/overview/series")
            assert sum(m["succeeded"] + m["failed"] for m in series["outcomes"]) == 2
            assert series["online"][-1]["online"] == 4
            assert api.get("/jobs/pgXjob_1/tasks")["job"]["creator"] != "ops"
            # a job from before schema 6 has no created_by: its creator comes from the
            # audit log, and `_` in its id is no wildcard there
            assert st.app.service is not None
            with st.app.service.store.db.write() as db:
                db.execute("UPDATE jobs SET created_by=NULL")
            assert api.get("/jobs/pg_job_1/tasks")["job"]["creator"] == "ops"
            assert api.get("/jobs/pgXjob_1/tasks")["job"]["creator"] != "ops"
            tasks = api.get("/jobs/pg_job_1/tasks")
            assert [t["node"] for t in tasks["tasks"]] == ["ovpg-2", "ovpg-3", "ovpg-1"]
            assert tasks["job"]["creator"] == "ops" and tasks["job"]["ended_at"] is None
        finally:
            fake.close()


@pytest.mark.parametrize("event, move", [
    ({"v": 1, "kind": "node_event", "node": "n", "previous": "online", "state": "offline",
      "info": {"facts": {"x": "y" * 5000}}}, ("online", "offline")),
    ({"v": 1, "kind": "node_event", "node": "n", "previous": None, "state": "online"},
     (None, "online")),
    ({"v": 1, "kind": "node_event", "node": "n", "previous": "online", "state": "online"},
     None),
    # keys in another order, or a node id that looks like the head: parsed in full
    ({"info": {"node": 'x", "previous": "online", "state": "online'}, "previous": "offline",
      "state": "online"}, ("offline", "online")),
])
def test_a_node_event_is_read_as_a_transition_from_its_head_or_in_full(
        event: dict[str, object], move: tuple[str | None, str | None] | None) -> None:
    from edgerun.scheduler.api.overview import _transition
    assert _transition(json.dumps(event)) == move
    assert _transition(json.dumps(event, separators=(",", ":"))) == move
