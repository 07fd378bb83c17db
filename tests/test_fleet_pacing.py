"""Per-node pacing: at most `pace` tasks outstanding per node, the rest held `queued` and
released as earlier ones end, so a backlog never fills an agent's queue (`busy`)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from edgerun.protocol import Cancel, format_time, parse_command
from edgerun.scheduler.store.fleetdb import FleetDB
from edgerun.scheduler.store.tasks import Store

from .brokers import Mosquitto, wait_until
from .scheduler_kit import Api, running_app, start_agent

TASKS, QUEUE_SIZE, PACE = 500, 64, 8


def test_500_tasks_to_one_node_with_queue_64_all_succeed_none_busy(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    with running_app(mosquitto.url, tmp_path, pace=PACE, grace=30.0) as app:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        agent = start_agent(mosquitto.url, "pace-a", tmp_path, "--queue-size", str(QUEUE_SIZE),
                            "--log-level", "warning")
        api.wait_node("pace-a")
        db = FleetDB(svc.store)
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], db.outstanding("pace-a", time.time()))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            ids = [svc.dispatch(["pace-a"], False, {"type": "shell", "command": "true"})[0].id
                   for _ in range(TASKS)]
            held = svc.store.count_by_state().get("queued", 0)
            assert held > 0, "the backlog was not held back"

            def done() -> bool:
                counts = svc.store.count_by_state()
                return sum(n for s, n in counts.items() if s not in (
                    "queued", "dispatched", "accepted", "running")) >= TASKS
            assert wait_until(done, 300, 0.2), svc.store.count_by_state()
        finally:
            stop.set()
            sampler.join()
            agent.terminate()
        counts = svc.store.count_by_state()
        assert counts == {"succeeded": TASKS}, counts
        assert 0 < peak[0] <= PACE, peak[0]
        busy = [u for u in svc.store.updates("pace-a", ids[-1]) if u["state"] == "rejected"]
        assert not busy


def test_a_held_task_can_be_canceled_before_it_is_sent(mosquitto: Mosquitto,
                                                       tmp_path: Path) -> None:
    with running_app(mosquitto.url, tmp_path, pace=1) as app:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        start_agent(mosquitto.url, "pace-b", tmp_path)
        api.wait_node("pace-b")
        [first] = svc.dispatch(["pace-b"], False, {"type": "shell", "command": "sleep 30"})
        [second] = svc.dispatch(["pace-b"], False, {"type": "shell", "command": "true"})
        api.wait_state(first.id, "pace-b", "running")
        assert api.task(second.id, "pace-b")["state"] == "queued"  # pace 1: held
        svc.cancel(second.id, "pace-b")
        canceled = api.wait_state(second.id, "pace-b", "canceled")
        assert canceled["dispatched_at"] is None  # never sent
        assert "before it was sent" in canceled["error"]["message"]
        svc.cancel(first.id, "pace-b")
        api.wait_state(first.id, "pace-b", "canceled")


def test_a_task_held_past_its_expiry_ends_expired(mosquitto: Mosquitto,
                                                  tmp_path: Path) -> None:
    with running_app(mosquitto.url, tmp_path, pace=1) as app:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        start_agent(mosquitto.url, "pace-c", tmp_path)
        api.wait_node("pace-c")
        [first] = svc.dispatch(["pace-c"], False, {"type": "shell", "command": "sleep 30"})
        expires = format_time(datetime.now(UTC) + timedelta(seconds=1))
        [held] = svc.dispatch(["pace-c"], False, {"type": "shell", "command": "true",
                                                  "expires_at": expires})
        lost = api.wait_state(held.id, "pace-c", "lost")
        assert lost["error"]["code"] == "expired" and lost["dispatched_at"] is None
        svc.cancel(first.id, "pace-c")


def test_claims_count_against_the_pace_lapse_and_are_dropped(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "claims.db"))
    try:
        for i in range(5):
            task = parse_command({"v": 1, "kind": "task", "id": f"t{i}", "type": "shell",
                                  "command": "true"})
            assert not isinstance(task, Cancel)
            store.add_task("n1", task, source="api")
        db = FleetDB(store)
        first = db.claim("n1", 3, now=100.0, ttl=10.0)
        assert [t.id for t in first] == ["t0", "t1", "t2"]  # oldest first
        assert db.claim("n1", 3, now=105.0, ttl=10.0) == []  # claimed ones count
        assert db.outstanding("n1", 105.0) == 3
        assert db.nodes_with_ready(105.0, 3) == [] and db.nodes_with_ready(105.0, 4) == ["n1"]
        # renews only that instance's claims
        db.renew_claims("someone-else", 200.0, [t.seq for t in first])
        again = db.claim("n1", 3, now=111.0, ttl=10.0, owner="me")  # the claims lapsed
        assert [t.id for t in again] == ["t0", "t1", "t2"]
        # alive: its claims hold past their first lapse
        db.renew_claims("me", 130.0, [t.seq for t in again])
        assert db.claim("n1", 3, now=125.0, ttl=10.0) == []
        assert db.outstanding("n1", 125.0) == 3
        db.drop_claims()
        assert [t.id for t in db.claim("n1", 8, now=112.0, ttl=10.0)] == [
            "t0", "t1", "t2", "t3", "t4"]
    finally:
        store.close()
