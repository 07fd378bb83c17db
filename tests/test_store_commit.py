"""One transaction per change (issue 22): a change and its event commit together, event
ids are handed out in commit order across instances, readers resuming anywhere see
every event once, the history is in the agent's order, bootstrap is race-free.

Against a real PostgreSQL (tests/pg.py) and SQLite; the "instances" are Store objects
with connections of their own, each with its hub and its LISTEN relay, as `serve` has.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from edgerun.protocol import ShellTask, State, parse_update
from edgerun.scheduler.api.auth import bootstrap, digest
from edgerun.scheduler.store.events import EventHub, task_event
from edgerun.scheduler.store.tasks import Store

from .brokers import wait_until
from .instancekit import Instance, Reader
from .mqttkit import ROOT
from .pg import fresh_database, pg_database, pg_url  # noqa: F401  (fixtures)


def _update(store: Store, node: str, task_id: str, state: str, **extra: Any) -> Any:
    body = {"v": 1, "kind": "update", "id": task_id, "node": node, "state": state,
            "at": "2026-01-01T00:00:00.000Z", **extra}
    return store.apply_update(parse_update(body), body, grace=30.0, now=time.time())


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "s.db")
    return str(request.getfixturevalue("pg_url"))


# --- one transaction per change ----------------------------------------------------------
def test_a_rolled_back_change_leaves_no_event_and_gives_its_ids_back(target: str) -> None:
    store = Store(target)
    hub = EventHub(store)
    store.on_events = hub.committed
    sub = hub.subscribe()
    try:
        with pytest.raises(RuntimeError), store.transaction():
            change = store.add_task("n1", ShellTask(id="gone", command="true"), source="api")
            assert change is not None
            hub.publish(task_event(None, change.task.to_json()))
            raise RuntimeError("the request failed after the insert")
        assert store.get("n1", "gone") is None and store.events_after(0) == []
        assert sub.queue.empty()
        with store.transaction():
            change = store.add_task("n1", ShellTask(id="kept", command="true"), source="api")
            assert change is not None
            hub.publish(task_event(None, change.task.to_json()))
            assert sub.queue.empty()  # not before the commit
        [(event_id, event)] = store.events_after(0)
        assert event_id == 1 and event["id"] == "kept"  # no hole where the rollback was
        assert sub.queue.get_nowait() == (1, event)
    finally:
        store.close()


def test_many_updates_in_one_transaction_are_one_commit_with_their_events(target: str) -> None:
    store = Store(target)
    hub = EventHub(store)
    store.on_events = hub.committed
    sub = hub.subscribe(kinds=["task_event"])
    acked: list[str] = []
    try:
        with store.transaction():
            changes = store.add_tasks([f"n{i}" for i in range(50)],
                                      ShellTask(id="fan", command="true"), source="api")
            assert len(changes) == 50
            for change in changes:
                hub.publish(task_event(None, change.task.to_json()))
                store.after_commit(partial(acked.append, change.task.node))
            assert acked == []  # acks wait for the commit
        assert len(acked) == 50
        ids = [sub.queue.get_nowait()[0] for _ in range(50)]  # type: ignore[index]
        assert ids == list(range(1, 51))
        # a second add of the same (node, id) inserts nothing
        assert store.add_tasks(["n0", "new"], ShellTask(id="fan", command="true"),
                               source="api")[0].task.node == "new"
    finally:
        store.close()


# --- the history in the agent's order ------------------------------------------------------
def test_history_is_in_the_agents_order_and_a_late_running_never_reopens(target: str) -> None:
    store = Store(target)
    try:
        store.add_task("n1", ShellTask(id="t", command="true"), source="api")
        assert _update(store, "n1", "t", "succeeded", exit_code=0, stdout="ok") is not None
        assert _update(store, "n1", "t", "running") is None  # late: not applied
        assert _update(store, "n1", "t", "accepted") is None
        assert _update(store, "n1", "t", "running") is None  # a duplicate: not kept twice
        task = store.get("n1", "t")
        assert task is not None and task.state == State.SUCCEEDED and task.deadline is None
        assert [u["state"] for u in store.updates("n1", "t")] == \
            ["accepted", "running", "succeeded"]
        # a task known only from its updates, out of order too
        assert _update(store, "n2", "u", "running") is not None
        assert _update(store, "n2", "u", "accepted") is None
        assert [u["state"] for u in store.updates("n2", "u")] == ["accepted", "running"]
    finally:
        store.close()


# --- ids in commit order across instances ---------------------------------------------------
def test_three_instances_ten_thousand_events_readers_resume_anywhere(
        pg_database: str) -> None:  # noqa: F811
    url = fresh_database(pg_database)
    instances = [Instance(url) for _ in range(3)]
    total = 0
    rng = random.Random(22)
    readers: list[Reader] = []
    try:
        # every instance writes: single events and batches of up to 40, interleaved
        batches = {i: [rng.randint(1, 40) for _ in range(110)] for i in range(3)}
        total = sum(sum(b) for b in batches.values())
        assert total >= 10_000 // 2
        done = threading.Event()

        def write(i: int) -> None:
            store = instances[i].store
            for k, size in enumerate(batches[i]):
                with store.transaction():
                    for j in range(size):
                        store.log_event("tasks", {"kind": "task_event", "id": f"w{i}-{k}-{j}",
                                                  "node": f"n{i}"})

        def resume_at_random() -> None:
            while not done.is_set():
                inst = rng.choice(instances)
                since = rng.randint(0, max(0, inst.hub.last_id))
                readers.append(Reader(inst, since))
                for reader in readers:  # within the hub's queue limit
                    reader.drain()
                done.wait(0.01)  # spacing the readers' starts
        writers = [threading.Thread(target=write, args=(i,)) for i in range(3)]
        resumer = threading.Thread(target=resume_at_random)
        resumer.start()
        for _round in range(2):  # twice as many events: over 10,000
            for w in writers:
                w.start()
            for w in writers:
                w.join()
            writers = [threading.Thread(target=write, args=(i,)) for i in range(3)]
        done.set()
        resumer.join()
        total *= 2
        assert total >= 10_000
        assert wait_until(lambda: all(x.hub.last_id == total for x in instances), 30, 0.05)
        logged = [i for i, _ in instances[0].store.events_after(0, 100_000)]
        assert logged == list(range(1, total + 1))  # dense: no hole, no duplicate
        assert len(readers) > 10
        for reader in readers:
            reader.drain()
            assert reader.ids == list(range(reader.start + 1, total + 1)), \
                f"reader from {reader.start}: a gap or a repeat"
    finally:
        for inst in instances:
            inst.close()


# --- kill -9 between commit and publication ----------------------------------------------
WRITER = """
import sys, time
from edgerun.protocol import ShellTask
from edgerun.scheduler.store.events import EventHub, task_event
from edgerun.scheduler.store.tasks import Store
store = Store(sys.argv[1])
hub = EventHub(store)
store.on_events = hub.committed
print("ready", flush=True)
i = 0
while True:
    with store.transaction():
        for j in range(5):
            change = store.add_task(f"n{j}", ShellTask(id=f"k{sys.argv[2]}-{i}", command="true"),
                                    source="api")
            hub.publish(task_event(None, change.task.to_json()))
    i += 1
"""


def test_kill_9_between_commit_and_publication_loses_no_event(
        target: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(9)
    for round_ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, target, str(round_)],
                                stdout=subprocess.PIPE, env=env, cwd=tmp_path)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.4))  # a random moment in the write loop
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    store = Store(target)
    try:
        with store.read() as db:
            tasks = {(r["node"], r["id"]) for r in db.execute("SELECT node, id FROM tasks")}
        logged = store.events_after(0, 1_000_000)
        assert len(tasks) > 0
        assert [i for i, _ in logged] == list(range(1, len(logged) + 1))
        assert {(e["node"], e["id"]) for _, e in logged} == tasks  # every change, its event
        assert len(logged) == len(tasks)
    finally:
        store.close()


# --- bootstrap ------------------------------------------------------------------------------
def _bootstrap_at_once(stores: list[Store], token_file: Path) -> list[str | None]:
    start = threading.Barrier(len(stores))
    made: list[str | None] = [None] * len(stores)

    def boot(i: int) -> None:
        start.wait()
        made[i] = bootstrap(stores[i], token_file)
    threads = [threading.Thread(target=boot, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return made


def test_three_instances_bootstrapping_at_once_leave_one_valid_token(
        pg_database: str, tmp_path: Path) -> None:  # noqa: F811
    for trial in range(6):
        url = fresh_database(pg_database)
        token_file = tmp_path / f"admin-token-{trial}"
        stores = [Store(url) for _ in range(3)]
        made = _bootstrap_at_once(stores, token_file)
        try:
            winners = [m for m in made if m is not None]
            assert len(winners) == 1, made
            text = token_file.read_text().strip()
            assert text == winners[0]
            assert stores[0].token_by_hash(digest(text)) is not None
            assert stores[0].count_tokens() == 1
        finally:
            for store in stores:
                store.close()


def test_a_bootstrap_whose_file_cannot_be_written_stores_no_token(tmp_path: Path) -> None:
    from edgerun.errors import ConfigError
    store = Store(str(tmp_path / "s.db"))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    try:
        with pytest.raises(ConfigError, match="cannot write the first admin token"):
            bootstrap(store, blocker / "token")
        assert store.count_tokens() == 0  # rolled back: no token nobody can read
        assert bootstrap(store, tmp_path / "token") is not None
        assert store.count_tokens() == 1
    finally:
        store.close()



# --- retention in bounded batches -------------------------------------------------------------
def test_retention_deletes_in_bounded_batches_and_keeps_what_is_open(target: str) -> None:
    store = Store(target)
    try:
        for i in range(10):
            store.add_task("n1", ShellTask(id=f"old{i}", command="true"), source="api")
            _update(store, "n1", f"old{i}", "succeeded", exit_code=0)
        store.add_task("n1", ShellTask(id="open", command="true"), source="api")
        _update(store, "n1", "open", "running")
        statements: list[str] = []
        real = store.db.run

        def counting(name: str, args: Any = ()) -> Any:
            if name == "prune_tasks":
                statements.append(name)
            return real(name, args)
        store.db.run = counting  # type: ignore[method-assign]
        pruned = store.prune(keep_days=1, now=time.time() + 2 * 86_400, batch=3)
        assert pruned == {"tasks": 10, "updates": 10, "jobs": 0}
        assert len(statements) == 4  # 3 + 3 + 3 + 1, each in a transaction of its own
        assert [t.id for t in store.tasks()] == ["open"]
        assert [u["state"] for u in store.updates("n1", "open")] == ["running"]
    finally:
        store.close()


# --- group commit: updates that arrived together -------------------------------------------
def _body(node: str, task_id: str, state: str, **extra: Any) -> dict[str, Any]:
    return {"v": 1, "kind": "update", "id": task_id, "node": node, "state": state,
            "at": "2026-01-01T00:00:00.000Z", **extra}


def test_updates_applied_together_end_as_one_by_one_would(target: str, tmp_path: Path) -> None:
    batch = [_body("n1", "a", "accepted"), _body("n1", "a", "running"),
             _body("n1", "b", "succeeded", exit_code=0, stdout="x"),
             _body("n1", "a", "succeeded", exit_code=0, stdout="done"),
             _body("n1", "a", "running"),  # late: never reopens
             _body("n2", "new", "running"), _body("n2", "new", "accepted"),  # unknown task
             _body("n1", "b", "running")]
    together, alone = Store(target), Store(str(tmp_path / "alone.db"))
    try:
        for store in (together, alone):
            for task_id in ("a", "b"):
                store.add_task("n1", ShellTask(id=task_id, command="true"), source="api")
        with together.transaction():
            got = together.apply_updates([(parse_update(b), b) for b in batch], grace=30.0,
                                         now=1000.0)
        want = [alone.apply_update(parse_update(b), b, grace=30.0, now=1000.0) for b in batch]
        assert [(c.previous, c.task.state) if c else None for c in got] == \
            [(c.previous, c.task.state) if c else None for c in want]
        assert [c is not None for c in got] == [True, True, True, True, False, True, False,
                                                False]
        for node, task_id in (("n1", "a"), ("n1", "b"), ("n2", "new")):
            one, other = together.get(node, task_id), alone.get(node, task_id)
            assert one is not None and other is not None
            assert (one.state, one.result, one.deadline) == \
                (other.state, other.result, other.deadline)
            assert [u["state"] for u in together.updates(node, task_id)] == \
                [u["state"] for u in alone.updates(node, task_id)]
    finally:
        together.close()
        alone.close()


def test_confirms_recorded_together_at_the_end_of_the_transaction(target: str) -> None:
    store = Store(target)
    hub = EventHub(store)
    store.on_events = hub.committed
    try:
        for task_id in ("c1", "c2"):
            store.add_task("n1", ShellTask(id=task_id, command="true"), source="api")
        with store.transaction() as tx:
            gathered: list[tuple[str, str, float, float | None]] = []

            def record() -> None:
                for change in store.mark_dispatched_many(gathered):
                    if change is not None:
                        hub.publish(task_event(change.previous, change.task.to_json()))
            tx.before_commit(record)
            gathered += [("n1", "c1", 50.0, None), ("n1", "nope", 50.0, None),
                         ("n1", "c2", 60.0, 99.0)]
            assert store.events_after(0) == []  # not yet: at the end
        got = store.events_after(0)
        assert [(e["id"], e["previous"], e["state"]) for _, e in got] == [
            ("c1", "queued", "dispatched"), ("c2", "queued", "dispatched")]
        c2 = store.get("n1", "c2")
        assert c2 is not None and c2.deadline == 60.0 and c2.dispatched_at
    finally:
        store.close()
