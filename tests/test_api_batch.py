"""POST /v1/task-batches against a real service and a real agent: many distinct tasks in
one request, all or nothing. Hostile bodies first (each refused with the right status and
the item's field path, nothing created), then the happy path (each item its own task with
its own output), the audit record and an Idempotency-Key replay."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerun.scheduler.api.batch import MAX_ITEMS, MAX_TASKS

from .apikit import FakeFleet, Stack, stack, wait_for
from .pg import pg_database, pg_url  # noqa: F401

PATH = "/v1/task-batches"


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("batch"), node="batch-a") as st:
        yield st


def shell(command: Any, **more: Any) -> dict[str, Any]:
    return {"type": "shell", "command": command, **more}


def item(s: Stack, command: Any = "true", **more: Any) -> dict[str, Any]:
    return {"targets": [s.node], "task": shell(command, **more)}


def count(s: Stack) -> int:
    """Every task row the API lists, page by page."""
    total, cursor = 0, ""
    while True:
        page = s.http("GET", f"/v1/tasks?limit=1000&cursor={cursor}", s.viewer)
        assert page.status == 200
        total += len(page.body["tasks"])
        if page.body["next"] is None:
            return total
        cursor = page.body["next"]


def refused(s: Stack, body: Any = None, raw: bytes | None = None, token: str | None = None,
            ) -> Any:
    """POST `body`; check nothing was created whatever the answer; return the answer."""
    before = count(s)
    reply = s.http("POST", PATH, token or s.operator, body, raw=raw)
    assert reply.status >= 400, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    assert isinstance(reply.body, dict) and reply.body["code"]
    assert count(s) == before
    return reply


@pytest.mark.parametrize("raw", [b"[]", b"[{\"targets\": [\"batch-a\"]}]", b"42", b"\"x\"",
                                 b"{\"tasks\": ", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_400(s: Stack, raw: bytes) -> None:
    reply = refused(s, raw=raw)
    assert reply.status == 400 and reply.body["code"] == "bad_json"


@pytest.mark.parametrize("body", [{}, {"tasks": None}, {"tasks": {"0": {}}}, {"tasks": "x"},
                                  {"tasks": 3}])
def test_tasks_missing_or_not_a_list_is_422(s: Stack, body: Any) -> None:
    reply = refused(s, body)
    assert reply.status == 422 and reply.body["field"] == "tasks"
    assert "list" in reply.body["error"]


def test_an_unknown_top_level_key_is_422_naming_it(s: Stack) -> None:
    reply = refused(s, {"tasks": [item(s)], "taks": []})
    assert reply.status == 422 and reply.body["field"] == "taks"


def test_an_empty_list_is_422(s: Stack) -> None:
    reply = refused(s, {"tasks": []})
    assert reply.status == 422 and reply.body["field"] == "tasks"
    assert "at least one" in reply.body["error"]


def test_more_items_than_the_limit_is_422_and_the_limit_is_taken(s: Stack) -> None:
    reply = refused(s, {"tasks": [item(s) for _ in range(MAX_ITEMS + 1)]})
    assert reply.status == 422 and reply.body["field"] == "tasks"
    assert str(MAX_ITEMS) in reply.body["error"].replace(",", "")
    before = count(s)
    full = s.http("POST", PATH, s.operator, {"tasks": [item(s) for _ in range(MAX_ITEMS)]})
    assert full.status == 201 and len(full.body["tasks"]) == MAX_ITEMS
    assert count(s) == before + MAX_ITEMS


@pytest.mark.parametrize("bad", [None, 7, "echo 1", [item.__name__], True])
def test_an_item_that_is_not_an_object_is_422_naming_it(s: Stack, bad: Any) -> None:
    reply = refused(s, {"tasks": [item(s), item(s), bad]})
    assert reply.status == 422 and reply.body["field"] == "tasks.2"


@pytest.mark.parametrize(("bad", "field"), [
    ({"targets": ["batch-a"], "task": shell("")}, "tasks.3.task.command"),
    ({"targets": ["batch-a"], "task": shell("true", timout=5)}, "tasks.3.task.timout"),
    ({"targets": ["batch-a"], "task": {"type": "nope"}}, "tasks.3.task.type"),
    ({"targets": ["batch-a"]}, "tasks.3.task"),
    ({"targets": ["batch-a"], "task": shell("true"), "extra": 1}, "tasks.3.extra"),
    ({"targets": "batch-a", "task": shell("true")}, "tasks.3.targets"),
    ({"targets": ["batch-a"], "task": shell("true"), "retry": {"retries": 99}},
     "tasks.3.retry.retries"),
    ({"targets": ["batch-a"], "task": shell("true"), "where": ["arch"]}, "tasks.3.where"),
    ({"task": shell("true")}, "tasks.3.targets"),
    ({"targets": ["batch-a"], "task": shell("true", id="has space")}, "tasks.3.task.id"),
    ({"targets": ["batch-a"], "task": shell("bad\u0000nul")}, "tasks.3.task.command"),
])
def test_one_bad_item_refuses_the_whole_batch_naming_its_field(
        s: Stack, bad: dict[str, Any], field: str) -> None:
    reply = refused(s, {"tasks": [item(s, "echo a"), item(s, "echo b"), item(s, "echo c"),
                                  bad, item(s, "echo e")]})
    assert reply.status == 422, reply.body
    assert reply.body["code"] == "invalid" and reply.body["field"] == field, reply.body
    assert "tasks.3" in reply.body["error"] or "item 3" in reply.body["error"]


def test_an_item_too_large_for_an_agent_is_413_naming_it(s: Stack) -> None:
    big = "x" * (s.app.service.cfg.max_message_bytes + 10) if s.app.service else ""
    reply = refused(s, {"tasks": [item(s), item(s, "echo " + big)]})
    assert reply.status == 413 and reply.body["field"] == "tasks.1.task"


def test_an_unknown_node_is_404_and_nothing_is_created(s: Stack) -> None:
    reply = refused(s, {"tasks": [item(s, "echo 1"),
                                  {"targets": ["no-such-node"], "task": shell("echo 2")}]})
    assert reply.status == 404 and reply.body["code"] == "unknown_node"
    assert "no-such-node" in reply.body["error"] and "tasks.1" in reply.body["error"]


def test_an_explicit_id_two_items_share_is_409_and_nothing_is_created(s: Stack) -> None:
    shared = f"shared-{uuid.uuid4().hex[:8]}"
    reply = refused(s, {"tasks": [item(s, "echo 1", id=shared), item(s, "echo 2"),
                                  item(s, "echo 3", id=shared)]})
    assert reply.status == 409 and reply.body["code"] == "conflict"
    assert shared in reply.body["error"] and "tasks.2" in reply.body["error"]
    assert s.http("GET", f"/v1/tasks/{shared}", s.viewer).status == 404


def test_an_explicit_id_that_exists_is_409_and_the_rest_is_not_created(s: Stack) -> None:
    taken = f"taken-{uuid.uuid4().hex[:8]}"
    assert s.http("POST", "/v1/tasks", s.operator, item(s, "true", id=taken)).status == 201
    fresh = f"fresh-{uuid.uuid4().hex[:8]}"
    reply = refused(s, {"tasks": [item(s, "echo 1", id=fresh), item(s, "echo 2", id=taken)]})
    assert reply.status == 409 and taken in reply.body["error"]
    assert s.http("GET", f"/v1/tasks/{fresh}", s.viewer).status == 404


def test_a_viewer_token_is_403_and_no_token_401(s: Stack) -> None:
    reply = refused(s, {"tasks": [item(s)]}, token=s.viewer)
    assert reply.status == 403 and reply.body["code"] == "forbidden"
    bare = s.http("POST", PATH, None, {"tasks": [item(s)]})
    assert bare.status == 401


def test_a_body_over_the_limit_is_413(s: Stack) -> None:
    one = {"targets": [s.node], "task": shell("echo " + "y" * 2000)}
    raw = json.dumps({"tasks": [one] * 600}).encode()
    assert len(raw) > 1024 * 1024
    reply = refused(s, raw=raw)
    assert reply.status == 413 and reply.body["code"] == "too_large"


def test_three_items_run_each_with_its_own_output_in_item_order(s: Stack) -> None:
    words = [f"w{uuid.uuid4().hex[:6]}-{k}" for k in range(3)]
    before = count(s)
    reply = s.http("POST", PATH, s.operator,
                   {"tasks": [item(s, ["echo", w]) for w in words]})
    assert reply.status == 201, reply.body
    tasks = reply.body["tasks"]
    assert [t["item"] for t in tasks] == [0, 1, 2]
    assert [t["node"] for t in tasks] == [s.node] * 3
    assert len({t["id"] for t in tasks}) == 3
    assert [t["spec"]["command"] for t in tasks] == [["echo", w] for w in words]
    assert all("stdout" not in (t.get("result") or {}) for t in tasks)  # without tails
    assert count(s) == before + 3
    api = s.api(s.viewer)
    for task, word in zip(tasks, words, strict=True):
        done = api.wait_state(task["id"], s.node, "succeeded")
        assert done["result"]["stdout"] == f"{word}\n"
    assert s.app.service is not None
    audits = [e for _, e in s.app.service.store.events_after(0, 1_000_000)
              if e.get("kind") == "audit" and tasks[0]["id"] in (e.get("tasks") or [])]
    assert len(audits) == 1
    assert (audits[0]["action"], audits[0]["by"], audits[0]["count"]) == ("batch", "ops", 3)
    assert sorted(audits[0]["tasks"]) == sorted(t["id"] for t in tasks)


def test_an_item_may_target_several_nodes_and_the_answer_keeps_item_order(s: Stack) -> None:
    reply = s.http("POST", PATH, s.operator, {"tasks": [
        {"targets": [s.node, s.node], "task": shell("true")},
        {"online": True, "task": shell("true")}]})
    assert reply.status == 201, reply.body
    assert [t["item"] for t in reply.body["tasks"]] == [0, 1]


def test_an_idempotency_key_replays_the_answer_and_creates_nothing_more(s: Stack) -> None:
    key = str(uuid.uuid4())
    body = {"tasks": [item(s, f"echo {uuid.uuid4().hex}") for _ in range(4)]}
    headers = {"Idempotency-Key": key}
    before = count(s)
    first = s.http("POST", PATH, s.operator, body, headers=headers)
    again = s.http("POST", PATH, s.operator, body, headers=headers)
    assert first.status == again.status == 201
    assert again.body == first.body and again.headers.get("idempotent-replayed") == "true"
    assert count(s) == before + 4
    other = s.http("POST", PATH, s.operator, {"tasks": body["tasks"][:1]}, headers=headers)
    assert other.status == 409 and other.body["code"] == "idempotency_key_reused"
    assert count(s) == before + 4


def test_a_refused_batch_does_not_use_up_its_key(s: Stack) -> None:
    key = str(uuid.uuid4())
    headers = {"Idempotency-Key": key}
    bad = s.http("POST", PATH, s.operator, {"tasks": [item(s), {"task": 1}]}, headers=headers)
    assert bad.status == 422
    good = s.http("POST", PATH, s.operator, {"tasks": [item(s)]}, headers=headers)
    assert good.status == 201 and len(good.body["tasks"]) == 1


def test_more_tasks_than_a_batch_makes_is_422_before_anything_is_stored(s: Stack) -> None:
    """Items that fan out: their targets resolved, a batch makes at most MAX_TASKS tasks
    (one bounded transaction); more is refused whole. Last: it adds simulated nodes."""
    fleet = FakeFleet(s.mosquitto.url)
    try:
        fleet.online([f"batch-sim-{k}" for k in range(MAX_TASKS // MAX_ITEMS)])
        wanted = MAX_TASKS // MAX_ITEMS + 1
        wait_for(lambda: s.http("GET", "/v1/nodes?online=true", s.viewer).body["total"]
                 >= wanted)
        reply = refused(s, {"tasks": [{"online": True, "task": shell("true")}
                                      for _ in range(MAX_ITEMS)]})
        assert reply.status == 422 and reply.body["field"] == "tasks"
        assert str(MAX_TASKS) in reply.body["error"]
    finally:
        fleet.close()


def test_on_postgresql_a_conflict_rolls_back_every_item_and_a_good_batch_runs(
        tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    """The same all-or-nothing on the shared store: one transaction, rolled back whole."""
    with stack(tmp_path, node="batch-pg", db=pg_url) as pg:
        taken = f"pg-taken-{uuid.uuid4().hex[:6]}"
        assert pg.http("POST", "/v1/tasks", pg.operator, item(pg, "true", id=taken)).status \
            == 201
        reply = refused(pg, {"tasks": [item(pg, "echo 1"), item(pg, "echo 2"),
                                       item(pg, "echo 3", id=taken)]})
        assert reply.status == 409 and "tasks.2" in reply.body["error"]
        assert count(pg) == 1
        made = pg.http("POST", PATH, pg.operator,
                       {"tasks": [item(pg, ["echo", str(k)]) for k in range(3)]})
        assert made.status == 201 and [t["item"] for t in made.body["tasks"]] == [0, 1, 2]
        api = pg.api(pg.viewer)
        for k, task in enumerate(made.body["tasks"]):
            assert api.wait_state(task["id"], pg.node, "succeeded")["result"]["stdout"] \
                == f"{k}\n"
