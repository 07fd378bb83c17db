"""The store's state machine, registry and schema; the tracker's rules; target resolution.

Pure logic on a real SQLite file and a real PostgreSQL database (tests/pg.py): every
test taking the `store` fixture runs on both back ends. No broker, no mocks.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgerun.cli.follow import exit_code
from edgerun.control.errors import BadRequest, UnknownNode
from edgerun.errors import ConfigError
from edgerun.protocol import (
    AGENT_STATES,
    FINAL_STATES,
    ShellTask,
    State,
    Status,
    Update,
    can_transition,
)
from edgerun.scheduler.errors import StoreError
from edgerun.control.jobfile import load_job, parse_job
from edgerun.scheduler.fleet.targets import resolve_targets
from edgerun.scheduler.fleet.tracker import judge
from edgerun.scheduler.store.records import TaskRow
from edgerun.scheduler.store.schema import SCHEMA_VERSION
from edgerun.scheduler.store.tasks import Store

from .pg import pg_database, pg_url  # noqa: F401  (fixtures)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        target = str(tmp_path / "s.db")
    else:
        target = request.getfixturevalue("pg_url")
    opened = Store(target)
    yield opened
    opened.close()


def update(task_id: str, state: str, node: str = "n1", **extra: Any) -> tuple[Update, dict]:
    body = {"v": 1, "kind": "update", "id": task_id, "node": node, "state": state,
            "at": "2026-11-22T06:00:00.000Z", **extra}
    from edgerun.protocol import parse_update
    return parse_update(body), body


def apply(store: Store, task_id: str, state: str, **extra: Any) -> Any:
    up, body = update(task_id, state, **extra)
    return store.apply_update(up, body, grace=5.0, now=time.time())


def test_schema_is_versioned_and_wal(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.db"))
    assert store.schema_version == SCHEMA_VERSION
    store.close()
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="upgrade edgerun"):
        Store(str(tmp_path / "s.db"))


def test_unopenable_store_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        Store(str(tmp_path / "no" / "such" / "dir" / "s.db"))


def test_task_walks_its_states_and_duplicates_are_ignored(store: Store) -> None:
    task = ShellTask(id="t1", command="true", timeout=10)
    first = store.add_task("n1", task, source="api")
    assert first is not None and first.previous is None and first.task.state == "queued"
    assert store.add_task("n1", task, source="api") is None  # same id, same node: deduped
    assert store.mark_dispatched("n1", "t1", time.time() + 15).task.state == "dispatched"
    assert apply(store, "t1", "accepted").task.state == "accepted"
    assert apply(store, "t1", "accepted") is None  # redelivered
    running = apply(store, "t1", "running")
    assert running.previous == "accepted" and running.task.deadline is not None
    done = apply(store, "t1", "succeeded", exit_code=0, stdout="hi\n", duration_s=0.1)
    assert done.task.state == "succeeded" and done.task.exit_code == 0
    assert done.task.result["stdout"] == "hi\n" and done.task.deadline is None
    assert apply(store, "t1", "running") is None  # late and out of order: never backwards
    assert [u["state"] for u in store.updates("n1", "t1")] == ["accepted", "running",
                                                               "succeeded"]


def test_same_id_on_two_nodes_is_two_tasks(store: Store) -> None:
    task = ShellTask(id="shared", command="true")
    assert store.add_task("n1", task, source="api") is not None
    assert store.add_task("n2", task, source="api") is not None
    assert {t.node for t in store.find("shared")} == {"n1", "n2"}


def test_update_for_unknown_task_is_recorded_then_spec_filled(store: Store) -> None:
    change = apply(store, "ext", "running")
    assert change.previous is None and change.task.source == "update"
    task = ShellTask(id="ext", command="echo hi", timeout=7)
    assert store.note_task_seen("n1", task, deadline=time.time() + 10) is None
    row = store.get("n1", "ext")
    assert row is not None and row.spec["command"] == "echo hi"
    assert row.state == "running"


def test_task_seen_on_the_wire_is_recorded_as_external(store: Store) -> None:
    task = ShellTask(id="other", command="true")
    change = store.note_task_seen("n1", task, deadline=time.time() + 10)
    assert change is not None and change.task.state == "dispatched"
    assert change.task.source == "external"
    assert store.note_task_seen("n1", task, deadline=time.time() + 10) is None


def test_lost_then_a_late_final_update_wins(store: Store) -> None:
    store.add_task("n1", ShellTask(id="t", command="true"), source="api")
    store.mark_dispatched("n1", "t", time.time())
    apply(store, "t", "running")
    assert store.mark_lost("n1", "t", "accepted", "timeout", "x") is None  # state moved on
    lost = store.mark_lost("n1", "t", "running", "timeout", "no final update")
    assert lost.task.state == "lost" and lost.task.error is not None
    assert lost.task.error.code == "timeout"
    late = apply(store, "t", "succeeded", exit_code=0)
    assert late.previous == "lost" and late.task.state == "succeeded"
    assert late.task.error is None
    assert store.mark_lost("n1", "t", "succeeded", "timeout", "x") is None


def test_rejected_without_id_is_kept_for_the_audit(store: Store) -> None:
    body = {"v": 1, "kind": "update", "id": None, "node": "n1", "state": "rejected",
            "at": "2026-11-22T06:00:00.000Z",
            "error": {"code": "bad_message", "message": "not JSON"}}
    store.record_rejected_without_id("n1", body)
    assert store.count_by_state() == {}


def test_registry_keeps_first_and_last_seen_and_facts(store: Store) -> None:
    prev, node = store.apply_status(Status("n1", "online", agent="0.1", facts={"cpus": 4},
                                           running=()))
    assert prev is None and node.state == "online" and node.facts == {"cpus": 4}
    prev, node = store.apply_status(Status("n1", "offline"))  # the Last Will: no facts
    assert prev == "online" and node.state == "offline"
    assert node.facts == {"cpus": 4} and node.first_seen <= node.last_seen
    assert store.online_nodes() == set()
    store.apply_status(Status("n1", "online"))
    assert store.online_nodes() == {"n1"}


def test_due_and_deadline_extension(store: Store) -> None:
    store.add_task("n1", ShellTask(id="d", command="true"), source="api")
    store.mark_dispatched("n1", "d", deadline=100.0)
    assert [t.id for t in store.due(200.0)] == ["d"]
    store.extend_deadlines("n1", 300.0)
    assert store.due(200.0) == []


def test_job_heads_wait_for_success(store: Store) -> None:
    for step in range(3):
        store.add_task("n1", ShellTask(id=f"j.{step}", command="true"), source="job",
                       job_id="j", step=step)
    assert [t.id for t in store.queued_job_heads()] == ["j.0"]
    store.mark_dispatched("n1", "j.0", time.time() + 10)
    assert store.queued_job_heads() == []
    apply(store, "j.0", "succeeded", exit_code=0)
    assert [t.id for t in store.queued_job_heads()] == ["j.1"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(sorted(AGENT_STATES)), min_size=1, max_size=8))
def test_any_delivery_order_ends_in_a_reachable_state(tmp_path_factory: Any,
                                                      states: list[str]) -> None:
    store = Store(str(tmp_path_factory.mktemp("h") / "s.db"))
    current: State | None = None
    for state in states:
        extra = {"error": {"code": "x", "message": "y"}} if state == "rejected" else {}
        change = apply(store, "t", state, **extra)
        allowed = can_transition(current, State(state))
        assert (change is not None) == allowed
        if allowed:
            current = State(state)
    row = store.get("n1", "t")
    assert row is not None and row.state == str(current)
    if current in FINAL_STATES:
        assert row.deadline is None
    store.close()


# --- the tracker's rules ---------------------------------------------------------------
def task(state: str, deadline: float | None = None, expires: str | None = None) -> TaskRow:
    return TaskRow(id="t", node="n1", type="shell", state=state, source="api",
                   created_at="2026-11-22T06:00:00.000Z", updated_at="2026-11-22T06:00:00.000Z",
                   dispatched_at=None, timeout=None, expires_at=expires, deadline=deadline,
                   exit_code=None, error=None, result=None, spec=None, job=None, step=None,
                   attempt=1, parent=None, root=None, retry=None, rollout=None, hold=None)


def test_running_past_deadline_is_lost_online_or_not() -> None:
    assert judge(task("running", 10.0), online=True, now=5.0) is None
    assert judge(task("running", 10.0), online=True, now=11.0).code == "timeout"
    assert judge(task("running", 10.0), online=False, now=11.0).code == "timeout"


def test_accepted_waits_while_the_node_is_online() -> None:
    assert judge(task("accepted", 10.0), online=True, now=11.0) is None
    assert judge(task("accepted", 10.0), online=False, now=11.0).code == "timeout"


def test_dispatched_to_an_offline_node_expires_only_at_expires_at() -> None:
    expires = "2026-11-22T06:00:10.000Z"
    before, after = 1_795_327_205.0, 1_795_327_211.0  # 06:00:05 and 06:00:11 UTC
    assert judge(task("dispatched", 1.0, expires), online=False, now=before) is None
    verdict = judge(task("dispatched", 1.0, expires), online=False, now=after)
    assert verdict is not None and verdict.code == "expired" and "offline" in verdict.message
    assert judge(task("dispatched", 1.0), online=True, now=2.0).code == "timeout"
    assert judge(task("dispatched", 1.0), online=False, now=2.0) is None
    assert judge(task("succeeded", 1.0), online=False, now=2.0) is None


# --- targets -----------------------------------------------------------------------------
NODES = {"rack1-a": "online", "rack1-b": "offline", "rack2-a": "online"}


def test_explicit_ids_globs_and_online() -> None:
    assert resolve_targets(["rack1-b"], NODES) == ["rack1-b"]
    assert resolve_targets(["rack1-*"], NODES) == ["rack1-a", "rack1-b"]
    assert resolve_targets(["rack1-*"], NODES, online_only=True) == ["rack1-a"]
    assert resolve_targets([], NODES, online_only=True) == ["rack1-a", "rack2-a"]
    assert resolve_targets(["rack2-a", "*-a"], NODES) == ["rack2-a", "rack1-a"]


def test_target_errors_say_what_to_do() -> None:
    with pytest.raises(UnknownNode, match="unknown node 'nope'"):
        resolve_targets(["nope"], NODES)
    with pytest.raises(UnknownNode, match="no known node matches 'rack9-"):
        resolve_targets(["rack9-*"], NODES)
    with pytest.raises(BadRequest, match="not a node id"):
        resolve_targets(["bad id"], NODES)
    with pytest.raises(BadRequest, match="no target"):
        resolve_targets([], NODES)
    with pytest.raises(UnknownNode, match="no node is online"):
        resolve_targets([], {"x": "offline"}, online_only=True)


# --- job files and exit codes -----------------------------------------------------------
def test_job_file_toml_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('targets = ["rack1-*"]\n[[steps]]\ntype = "shell"\ncommand = "true"\n'
                    '[[steps]]\ntype = "download"\nurl = "http://x/y"\ndest = "/tmp/y"\n')
    targets, steps = load_job(str(path))
    assert targets == ["rack1-*"] and [s["type"] for s in steps] == ["shell", "download"]
    with pytest.raises(ConfigError, match="non-empty list"):
        parse_job({"steps": []})
    with pytest.raises(ConfigError, match="step 1 needs `type`"):
        parse_job({"steps": [{"command": "x"}]})
    with pytest.raises(ConfigError, match="cannot read job file"):
        load_job(str(tmp_path / "missing.toml"))


def test_exit_codes() -> None:
    def t(state: str, code: int | None = None) -> dict:
        return {"state": state, "exit_code": code}
    assert exit_code([t("succeeded", 0), t("succeeded", 0)]) == 0
    assert exit_code([t("failed", 3)]) == 3
    assert exit_code([t("failed", None)]) == 1
    assert exit_code([t("timed_out", -15)]) == 124
    assert exit_code([t("lost")]) == 125
    assert exit_code([t("rejected")]) == 126
    assert exit_code([t("canceled")]) == 130
    assert exit_code([t("failed", 3), t("succeeded", 0)]) == 1


# --- both back ends: version, retention, forget, several writers ------------------------
def test_postgres_store_refuses_a_newer_schema(pg_url: str) -> None:  # noqa: F811
    Store(pg_url).close()
    import psycopg
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value=%s WHERE key='schema_version'",
                     (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match="upgrade edgerun"):
        Store(pg_url)


def test_unreachable_postgres_is_a_store_error_without_the_password() -> None:
    with pytest.raises(StoreError, match="cannot open") as info:
        Store("postgresql://postgres:secret@127.0.0.1:1/nowhere?connect_timeout=2")
    assert "secret" not in str(info.value)


def test_prune_drops_old_finished_tasks_and_keeps_the_rest(store: Store) -> None:
    for task_id in ("old-done", "old-open", "new-done"):
        store.add_task("n1", ShellTask(id=task_id, command="true"), source="api")
        store.mark_dispatched("n1", task_id, time.time() + 10)
        apply(store, task_id, "running")
    apply(store, "old-done", "succeeded", exit_code=0)
    apply(store, "new-done", "failed", exit_code=1,
          error={"code": "exit_status", "message": "1"})
    store.record_rejected_without_id("n1", {"v": 1, "kind": "update", "id": None, "node": "n1",
                                            "state": "rejected", "at": "x"})
    assert store.prune(keep_days=1) == {"tasks": 0, "updates": 0, "jobs": 0}  # all recent
    # two days on, only the finished tasks (with their updates) and the id-less update go
    pruned = store.prune(keep_days=1, now=time.time() + 2 * 86_400)
    assert pruned["tasks"] == 2 and pruned["updates"] == 2 * 2 + 1  # running, final; id-less
    assert [t.id for t in store.tasks()] == ["old-open"]
    assert store.updates("n1", "old-done") == []
    assert [u["state"] for u in store.updates("n1", "old-open")] == ["running"]


def test_forget_removes_a_node_and_its_next_status_brings_it_back(store: Store) -> None:
    store.apply_status(Status("n1", "online", facts={"cpus": 1}))
    store.apply_status(Status("n2", "online"))
    assert store.forget_node("n1") is True
    assert store.forget_node("n1") is False
    assert [n.node for n in store.nodes()] == ["n2"]
    prev, node = store.apply_status(Status("n1", "online"))
    assert prev is None and node.facts is None


def test_unaccepted_lists_what_a_node_has_not_taken(store: Store) -> None:
    for task_id in ("a", "b", "c"):
        store.add_task("n1", ShellTask(id=task_id, command="true"), source="api")
        store.mark_dispatched("n1", task_id, time.time() + 10)
    apply(store, "b", "accepted")
    assert [t.id for t in store.unaccepted("n1")] == ["a", "c"]
    assert store.unaccepted("n2") == []


def test_event_log_ids_increase_on_both_back_ends(store: Store) -> None:
    first = store.append_event("tasks", "n1", "t", {"x": 1}, keep=0)
    second = store.append_event("tasks", "n1", "t", {"x": 2}, keep=0)
    assert second > first
    assert [body for _id, body in store.events_after(first)] == [{"x": 2}]
    assert store.event_horizon() == (0, second)


def test_two_stores_on_one_postgres_apply_each_change_once(pg_url: str) -> None:  # noqa: F811
    """Several `serve` instances: the same updates applied by two writers at once are
    recorded once each, and a status seen by both yields one `previous`."""
    import threading
    one, two = Store(pg_url), Store(pg_url)
    try:
        for i in range(50):
            one.add_task("n1", ShellTask(id=f"t{i}", command="true"), source="api")
        changes: list[Any] = []
        lock = threading.Lock()

        def writer(store: Store) -> None:
            for i in range(50):
                for state in ("accepted", "running", "succeeded"):
                    extra = {"exit_code": 0} if state == "succeeded" else {}
                    change = apply(store, f"t{i}", state, **extra)
                    if change is not None:
                        with lock:
                            changes.append((f"t{i}", state))
        threads = [threading.Thread(target=writer, args=(s,)) for s in (one, two)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(changes) == sorted((f"t{i}", s) for i in range(50)
                                         for s in ("accepted", "running", "succeeded"))
        for i in range(50):
            assert [u["state"] for u in two.updates("n1", f"t{i}")] == \
                ["accepted", "running", "succeeded"]
        previous = [one.apply_status(Status("n9", "online"))[0],
                    two.apply_status(Status("n9", "online"))[0]]
        assert previous == [None, "online"]
    finally:
        one.close()
        two.close()


def test_a_late_update_is_recorded_once_but_never_moves_the_task_back(store: Store) -> None:
    """Competing consumers may hand `accepted` to one instance after another applied
    `running`: the state stays `running`, and the update is still part of the record."""
    store.add_task("n1", ShellTask(id="t", command="true"), source="api")
    assert apply(store, "t", "running") is not None
    assert apply(store, "t", "accepted") is None
    assert apply(store, "t", "accepted") is None  # and its redelivery adds nothing
    assert store.get("n1", "t").state == "running"
    assert sorted(u["state"] for u in store.updates("n1", "t")) == ["accepted", "running"]


# --- several instances: the duties lock, the listener, the tracker's duties ---------------
def test_the_duties_lock_is_held_by_one_and_moves_when_its_holder_dies(
        pg_url: str) -> None:  # noqa: F811
    from edgerun.scheduler.store.cluster import Lease
    one, two = Lease(pg_url), Lease(pg_url)
    try:
        assert one.check() is True
        assert two.check() is False
        assert one.check() is True  # still held: verified, not taken again
        one._conn.close()  # the holder's session ends (as when its process is killed)
        assert wait_for(two.check)  # taken over as soon as PostgreSQL ends that session
        assert one.check() is False  # the old holder, connected again, does not get it
        assert two.check() is True
    finally:
        one.release()
        two.release()


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_another_instances_events_reach_the_listener_with_their_log_ids(
        pg_url: str) -> None:  # noqa: F811
    import threading
    one, two = Store(pg_url), Store(pg_url)
    heard: list[dict] = []
    got = threading.Event()

    def deliver(message: dict) -> None:
        heard.append(message)
        got.set()
    listener = two.listen(deliver)
    try:
        assert listener.ready.wait(10)
        two.append_event("tasks", "n1", "mine", {"kind": "task_event", "id": "mine"}, keep=0)
        big = {"kind": "task_event", "id": "big", "pad": "x" * 20_000}  # too big for NOTIFY
        first = one.append_event("tasks", "n1", "t", {"kind": "task_event", "id": "t"}, keep=0)
        second = one.append_event("tasks", "n1", "big", big, keep=0)
        assert wait_for(lambda: len(heard) >= 2)
        # not its own event; each commit's range of ids, the bodies read from the log
        assert [(m["a"], m["b"]) for m in heard] == [(first, first), (second, second)]
        assert listener.read(first - 1, second) == [
            (first, {"kind": "task_event", "id": "t"}), (second, big)]
    finally:
        listener.stop()
        one.close()
        two.close()


def test_the_tracker_runs_the_duties_and_retention_when_it_leads(tmp_path: Path) -> None:
    import threading

    from edgerun.scheduler.fleet.tracker import Tracker
    store = Store(str(tmp_path / "s.db"))
    calls: list[bool] = []
    tracker = Tracker(store, store.online_nodes, lambda t, v: None, threading.Event(),
                      duties=calls.append, keep_days=1.0, sweep_every=10.0)
    store.add_task("n1", ShellTask(id="old", command="true"), source="api")
    apply(store, "old", "succeeded", exit_code=0)
    with store.db.write() as db:  # finished three days ago
        db.execute("UPDATE tasks SET updated_at='2000-01-01T00:00:00.000Z'")
    assert tracker.tick(now=100.0) is True
    assert calls == [True] and store.tasks() == []  # took the lead: resume, then pruned
    assert tracker.tick(now=105.0) is True and calls == [True]
    assert tracker.tick(now=111.0) is True and calls == [True, False]  # the sweep
    store.close()


def test_the_store_url_is_shown_without_its_password() -> None:
    from edgerun.settings import redact
    assert redact("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert redact("/var/lib/edgerun/s.db") == "/var/lib/edgerun/s.db"


def _terminate_backends(url: str, application: str = "edgerun-scheduler") -> int:
    """What a PostgreSQL restart does to our sessions: end them all."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                            "application_name=%s AND datname=current_database() AND "
                            "pid <> pg_backend_pid()", (application,)).fetchall()
        return len(rows)


def test_store_and_listener_come_back_after_their_sessions_are_killed(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from edgerun.scheduler.store import db as dbmod
    monkeypatch.setattr(dbmod, "PROBE_AFTER_IDLE_S", 0.0)  # "idle": probe before each use
    one, two = Store(pg_url), Store(pg_url)
    heard: list[int] = []
    listener = two.listen(lambda m: heard.append(m["b"]))
    try:
        assert listener.ready.wait(10)
        assert _terminate_backends(pg_url) >= 3  # both stores' and the listener's
        # a write finds its session gone at BEGIN, before anything ran: it starts again
        # on a new connection; a read after an idle spell probes first; the listener
        # listens again (what was notified while it was away is lost: the log has it)
        event_id = one.append_event("tasks", "n1", "t", {"kind": "task_event"}, keep=0)
        assert two.event(event_id) == {"kind": "task_event"}
        assert wait_for(lambda: listener.connections == 2 and listener.ready.is_set(), 20)
        later = one.append_event("tasks", "n1", "t", {"kind": "task_event"}, keep=0)
        assert wait_for(lambda: later in heard)
    finally:
        listener.stop()
        one.close()
        two.close()
