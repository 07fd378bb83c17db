"""Three `edgerun serve` instances on one PostgreSQL database and one RabbitMQ: competing
consumers of one durable queue, periodic duties on one of them (an advisory lock), and
every instance's events on every instance's stream (LISTEN/NOTIFY).

Real everything: a private RabbitMQ and Mosquitto, the bridge as a process, the three
instances as processes (so one can be killed -9), 100 real agents (tests/agent_pool.py)
and a database of this test run (tests/pg.py).
"""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerun.control.errors import SchedulerError
from edgerun.protocol import Channel, Topics
from edgerun.scheduler.messaging.adopt import CHECK_EVERY_S, STALE_S
from edgerun.scheduler.store.tasks import Store

from .bridgekit import BridgeProcess
from .brokers import Mosquitto, wait_until
from .mqttkit import ROOT, Observer
from .multikit import EventReader, ServeProcess
from .pg import fresh_database, pg_database  # noqa: F401  (fixture)
from .rabbit import Rabbit

FINAL = {"succeeded", "failed", "timed_out", "canceled", "rejected", "lost"}
NODES = [f"mi{i:03d}" for i in range(100)]


class AgentPool:
    """`count` real agents in one process, named mi000, mi001, ..."""

    def __init__(self, broker: str, workdir: Path, count: int = len(NODES)) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(workdir / "pool.log", "wb")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.agent_pool", broker, "mi", "0", str(count),
             str(workdir)], stdout=self.log, stderr=self.log, cwd=ROOT)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def stack(tmp_path: Path, pg_database: str,  # noqa: F811
          fresh_rabbit: Rabbit) -> Iterator[dict[str, Any]]:
    rabbit = fresh_rabbit
    mosquitto = Mosquitto(tmp_path / "mosquitto").start()
    bridge = BridgeProcess(mosquitto.url, rabbit.url, tmp_path / "bridge")
    db = fresh_database(pg_database)
    token = tmp_path / "admin-token"
    serves = [ServeProcess(f"s{i}", rabbit.url, db, tmp_path / f"s{i}", token, "--tick",
                           "0.2", "--grace", "5") for i in (1, 2, 3)]
    pool: AgentPool | None = None
    try:
        bridge.start().wait_ready()
        serves[0].start().wait_ready()  # the first one writes the admin token
        for serve in serves[1:]:
            serve.start()
        for serve in serves[1:]:
            serve.wait_ready()
        pool = AgentPool(mosquitto.url, tmp_path / "agents")
        yield {"serves": serves, "db": db, "mosquitto": mosquitto, "bridge": bridge}
    finally:
        if pool is not None:
            pool.stop()
        for serve in serves:
            serve.stop()
        if bridge.alive():
            bridge.terminate()
        mosquitto.stop()


def dispatch(serve: ServeProcess, round_id: str) -> None:
    serve.client(timeout=120).post("/tasks", {
        "targets": NODES, "task": {"id": round_id, "type": "shell", "command": "true",
                                   "timeout": 120}})


def test_three_instances_one_killed_one_restarted(stack: dict[str, Any]) -> None:
    s1, s2, s3 = stack["serves"]
    store = Store(stack["db"])  # the test reads the shared database directly
    try:
        assert wait_until(lambda: len(store.online_nodes()) == len(NODES), 120, 0.5), \
            f"only {len(store.online_nodes())} of {len(NODES)} nodes came online"
        with Observer(stack["mosquitto"].url) as wire:
            wire.conn.subscribe(Topics("edgerun").wildcard(Channel.TASKS), 1)
            reader = EventReader(s3.client())  # s3 is neither killed nor restarted
            try:
                run(s1, s2, s3, store)
                check(store, wire, reader, [s1, s2, s3])
            finally:
                reader.close()
    finally:
        store.close()


def run(s1: ServeProcess, s2: ServeProcess, s3: ServeProcess, store: Store) -> None:
    for r, serve in enumerate((s1, s2, s3, s1)):
        dispatch(serve, f"r{r}")
    # kill -9 the first instance (the duties holder: it started first) while it dispatches
    killed = threading.Thread(target=lambda: _ignore(lambda: dispatch(s1, "rk")), daemon=True)
    killed.start()
    wait_until(lambda: len(store.find("rk")) >= 20, 30, 0.005)
    s1.kill()
    killed.join(60)
    # restart another one between rounds, while the third keeps going
    dispatch(s3, "r4")
    s2.stop()
    dispatch(s3, "r5")
    s2.start().wait_ready()
    for r in range(6, 10):
        dispatch((s2, s3)[r % 2], f"r{r}")

    def unfinished() -> int:
        counts = store.count_by_state()
        return sum(n for state, n in counts.items() if state not in FINAL)
    assert wait_until(lambda: unfinished() == 0, 300, 1.0), \
        f"tasks still open after 300 s: {store.count_by_state()}"


def _ignore(action: Any) -> None:
    try:
        action()
    except (SchedulerError, OSError):
        pass  # the instance was killed under the request


def check(store: Store, wire: Observer, reader: EventReader,
          serves: list[ServeProcess]) -> None:
    rounds = [f"r{r}" for r in range(10)]
    tasks = [t for r in [*rounds, "rk"] for t in store.find(r)]
    full = [t for t in tasks if t.id != "rk"]
    assert len(full) == 1000
    assert 20 <= len(tasks) - len(full) <= 100  # the round the kill cut short
    # every task ends in exactly one final state: succeeded, with one final update
    assert {t.state for t in tasks} == {"succeeded"}, collections.Counter(
        t.state for t in tasks)
    # every update recorded once: the agent's three, nothing repeated (competing
    # consumers may record `accepted` after `running`: it never moves the task back)
    for task in tasks:
        states = sorted(u["state"] for u in store.updates(task.node, task.id))
        assert states == ["accepted", "running", "succeeded"], (task.node, task.id,
                                                               states)
    # none dispatched twice: each task was published once, except the round cut short by
    # the kill -9 (a task the broker took just before the instance died stays `queued`
    # in the store and is sent again by the duties holder: the agents run an id once)
    sent = collections.Counter((topic.split("/")[2], b["id"])
                               for topic, b in _tasks_on_wire(wire))
    again = collections.Counter(task_id for (_node, task_id), n in sent.items() if n > 1)
    assert set(again) <= {"rk"}, f"published more than once, by round: {dict(again)}"
    assert {(t.node, t.id) for t in tasks} == set(sent)
    # ... and ran once: one final update per task from its agent, a repeat only where the
    # task itself was repeated (the agent answers a known id with its latest update)
    assert wait_until(lambda: len(wire.of("update", state="succeeded")) >= len(tasks), 30)
    finals = collections.Counter((u["node"], u["id"]) for u in wire.of("update",
                                                                        state="succeeded"))
    twice = {key for key, n in finals.items() if n > 1}
    assert all(sent[key] > 1 for key in twice), twice - {k for k in twice if sent[k] > 1}
    # an event stream on a survivor saw every event: every task event in the shared log
    # (whichever instance wrote it) reached the stream, and each task's final state
    assert wait_until(lambda: _seen_finals(reader) >= len(tasks), 30), \
        f"the stream saw {_seen_finals(reader)} final events of {len(tasks)}"
    seen = {e.get("_id") for e in reader.snapshot()}
    logged = [i for i, body in store.events_after(0, limit=100_000)
              if body.get("kind") in ("task_event", "node_event")]
    first = min(i for i in seen if isinstance(i, int))
    missing = [i for i in logged if i > first and i not in seen]
    assert not missing, f"{len(missing)} logged events never reached the stream"
    # the duties moved to a survivor when their holder died
    assert any("runs the periodic duties now" in s.log() for s in serves[1:]), \
        "no survivor took over the periodic duties"


def _tasks_on_wire(wire: Observer) -> list[tuple[str, dict[str, Any]]]:
    with wire._cond:
        return [(t, b) for t, b in wire.messages
                if t.endswith("/tasks") and isinstance(b, dict) and b.get("kind") == "task"]


def _seen_finals(reader: EventReader) -> int:
    return len({(e["node"], e["id"]) for e in reader.snapshot()
                if e.get("kind") == "task_event" and e.get("state") == "succeeded"})



def _updates_received(serve: ServeProcess) -> float:
    request = urllib.request.Request(f"{serve.url}/v1/metrics", headers={
        "Authorization": f"Bearer {serve.token_file.read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("edgerun_scheduler_messages_total{")
               and 'channel="updates"' in line)


def _terminate_sessions(db: str) -> None:
    import psycopg
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                     "application_name='edgerun-scheduler' AND datname=current_database() "
                     "AND pid <> pg_backend_pid()")  # this test run's database only


def test_mqtt_instances_split_updates_through_a_share_group(tmp_path: Path,
                                                            pg_database: str) -> None:  # noqa: F811
    """Direct mode: two instances in one `$share/` group on Mosquitto take turns with the
    updates (each one handles some), and each update is recorded once."""
    mosquitto = Mosquitto(tmp_path / "mosquitto").start()
    db = fresh_database(pg_database)
    token = tmp_path / "admin-token"
    serves = [ServeProcess(f"m{i}", mosquitto.url, db, tmp_path / f"m{i}", token,
                           "--share-group", "schedulers", "--client-id", f"sched-m{i}",
                           "--tick", "0.2") for i in (1, 2)]
    pool: AgentPool | None = None
    store = Store(db)
    nodes = NODES[:20]
    try:
        serves[0].start().wait_ready()
        serves[1].start().wait_ready()
        pool = AgentPool(mosquitto.url, tmp_path / "agents", len(nodes))
        assert wait_until(lambda: len(store.online_nodes()) == len(nodes), 60, 0.2)
        for r in range(6):
            serves[r % 2].client().post("/tasks", {
                "targets": nodes, "task": {"id": f"s{r}", "type": "shell", "command": "true",
                                           "timeout": 60}})
        tasks = [t for r in range(6) for t in store.find(f"s{r}")]
        assert len(tasks) == 6 * len(nodes)
        assert wait_until(lambda: all(store.get(t.node, t.id).state == "succeeded"
                                      for t in tasks), 120, 0.5)
        for task in tasks:
            states = sorted(u["state"] for u in store.updates(task.node, task.id))
            assert states == ["accepted", "running", "succeeded"], (task.id, states)
        received = [_updates_received(s) for s in serves]
        assert all(n > 0 for n in received), f"updates handled per instance: {received}"
        assert sum(received) < 2 * len(tasks) * 3, f"both received everything: {received}"
        # PostgreSQL loses every session (as in its restart): every liveness lock is
        # free at once, yet no instance takes the other for dead and adopts its session
        time.sleep(STALE_S + 2 * CHECK_EVERY_S)  # adoption armed on both
        _terminate_sessions(db)
        time.sleep(STALE_S + 3 * CHECK_EVERY_S)
        assert not any("adopting" in s.log() for s in serves), [s.log()[-1500:] for s in serves]
        serves[1].client().post("/tasks", {"targets": nodes, "task": {
            "id": "after", "type": "shell", "command": "true", "timeout": 60}})
        assert wait_until(lambda: all(
            getattr(store.get(n, "after"), "state", None) == "succeeded" for n in nodes),
            60, 0.5)
    finally:
        store.close()
        if pool is not None:
            pool.stop()
        for serve in serves:
            serve.stop()
        mosquitto.stop()


def test_mqtt_instance_killed_for_good_its_session_is_adopted(tmp_path: Path,
                                                              pg_database: str) -> None:  # noqa: F811
    """Mosquitto keeps a dead member's share of the group's messages in its session: the
    survivor adopts that session (messaging/adopt.py), so every update is recorded even
    though the killed instance never comes back."""
    mosquitto = Mosquitto(tmp_path / "mosquitto").start()
    db = fresh_database(pg_database)
    token = tmp_path / "admin-token"
    serves = [ServeProcess(f"k{i}", mosquitto.url, db, tmp_path / f"k{i}", token,
                           "--share-group", "schedulers", "--client-id", f"sched-k{i}",
                           "--tick", "0.2", "--grace", "30") for i in (1, 2)]
    pool: AgentPool | None = None
    store = Store(db)
    nodes = NODES[:20]
    try:
        serves[0].start().wait_ready()
        serves[1].start().wait_ready()
        pool = AgentPool(mosquitto.url, tmp_path / "agents", len(nodes))
        assert wait_until(lambda: len(store.online_nodes()) == len(nodes), 60, 0.2)
        for r in range(5):
            serves[0].client().post("/tasks", {
                "targets": nodes, "task": {"id": f"k{r}", "type": "shell",
                                           "command": "sleep 0.3", "timeout": 60}})
        tasks = [t for r in range(5) for t in store.find(f"k{r}")]
        assert len(tasks) == 5 * len(nodes)
        assert wait_until(lambda: store.count_by_state().get("succeeded", 0) >= 20, 60, 0.05)
        serves[1].kill()  # mid-way, for good
        assert wait_until(lambda: all(store.get(t.node, t.id).state == "succeeded"
                                      for t in tasks), 120, 0.5), store.count_by_state()
        for task in tasks:
            states = sorted(u["state"] for u in store.updates(task.node, task.id))
            assert states == ["accepted", "running", "succeeded"], (task.id, states)
        assert wait_until(lambda: "adopted and closed the MQTT session of sched-k2"
                          in serves[0].log(), 60, 0.2), serves[0].log()[-2000:]
    finally:
        store.close()
        if pool is not None:
            pool.stop()
        for serve in serves:
            serve.stop()
        mosquitto.stop()
