"""Retries: each attempt a new task linked to its parent, with back-off, only for the
outcomes chosen, never two attempts at once (also after `lost`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgerun.control.errors import BadRequest
from edgerun.control.retries import RetryPolicy, outcome, parse_retry, will_retry
from edgerun.scheduler.store.fleetdb import FleetDB

from .brokers import Mosquitto, wait_until
from .scheduler_kit import Api, running_app, start_agent


@pytest.mark.parametrize("bad, problem", [
    ("3", "must be an object"),
    ({"retries": -1}, "0 to 20"),
    ({"retries": 21}, "0 to 20"),
    ({"retries": True}, "0 to 20"),
    ({"retries": 2, "on": ["failed", "exploded"]}, "'exploded' is not an outcome"),
    ({"retries": 2, "on": []}, "non-empty list"),
    ({"retries": 2, "delay": -1}, "seconds from 0"),
    ({"retries": 2, "when": "x"}, "unknown key `when`"),
])
def test_bad_retry_requests_say_what_is_wrong(bad: Any, problem: str) -> None:
    with pytest.raises(BadRequest, match=problem):
        parse_retry(bad)


def test_which_outcomes_are_retried() -> None:
    policy = RetryPolicy(2, ("lost", "busy")).to_json()
    busy = {"state": "rejected", "error": {"code": "busy"}, "retry": policy, "attempt": 1}
    assert outcome(busy) == "busy" and will_retry(busy)
    assert not will_retry({**busy, "error": {"code": "bad_signature"}})
    assert not will_retry({"state": "failed", "retry": policy, "attempt": 1})
    assert will_retry({"state": "lost", "retry": policy, "attempt": 2})
    assert not will_retry({"state": "lost", "retry": policy, "attempt": 3})  # 1 + 2 retries
    assert not will_retry({"state": "lost", "error": {"code": "unreachable"}, "retry": policy,
                           "attempt": 1})
    assert parse_retry({"retries": 2, "on": "failed,lost"}) == RetryPolicy(2, ("failed",
                                                                                "lost"))


def test_failed_attempts_are_retried_in_turn_never_overlapping(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    log = tmp_path / "attempts.log"
    command = (f"echo start $(date +%s.%N) >> {log}; sleep 0.3; "
               f"echo end $(date +%s.%N) >> {log}; exit 3")
    with running_app(mosquitto.url, tmp_path) as app:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        start_agent(mosquitto.url, "retry-a", tmp_path, "--parallel", "4")
        api.wait_node("retry-a")
        [task] = svc.dispatch(["retry-a"], False, {"type": "shell", "command": command},
                              retry={"retries": 3, "on": ["failed"], "delay": 0.2})
        root = task.id
        last = api.wait_state(f"{root}.a4", "retry-a", {"failed", "succeeded"}, timeout=60)
        assert last["state"] == "failed"
        db = FleetDB(svc.store)
        attempts = db.attempts("retry-a", root)
        assert [a.id for a in attempts] == [root, f"{root}.a2", f"{root}.a3", f"{root}.a4"]
        assert [a.attempt for a in attempts] == [1, 2, 3, 4]
        assert [a.parent for a in attempts] == [None, root, f"{root}.a2", f"{root}.a3"]
        assert {a.state for a in attempts} == {"failed"}
        assert wait_until(lambda: len(log.read_text().split()) == 16, 10)
        stamps = [(w, float(t)) for w, t in zip(*[iter(log.read_text().split())] * 2,
                                                strict=True)]
        assert [w for w, _ in stamps] == ["start", "end"] * 4  # strictly one after another
        times = [t for _, t in stamps]
        assert times == sorted(times)
        # no fifth attempt: three retries were asked for
        assert db.task("retry-a", f"{root}.a5") is None


def test_a_lost_attempt_is_canceled_before_the_next_one_runs(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    marker, ran = tmp_path / "first-ran", tmp_path / "runs.log"
    command = (f"echo run >> {ran}; if [ -e {marker} ]; then echo second; else touch "
               f"{marker}; sleep 60; fi")
    with running_app(mosquitto.url, tmp_path, grace=60.0, offline_grace=0.5) as app:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        agent = start_agent(mosquitto.url, "retry-b", tmp_path, "--parallel", "4")
        api.wait_node("retry-b")
        [task] = svc.dispatch(["retry-b"], False, {"type": "shell", "command": command},
                              retry={"retries": 2, "on": ["lost"], "delay": 0})
        api.wait_state(task.id, "retry-b", "running")
        agent.kill()
        api.wait_state(task.id, "retry-b", "lost")
        second = f"{task.id}.a2"
        api.wait_state(second, "retry-b", {"queued", "dispatched"})
        agent.start()
        done = api.wait_state(second, "retry-b", "succeeded", timeout=60)
        assert done["result"]["stdout"] == "second\n"
        first = api.wait_state(task.id, "retry-b", {"failed", "canceled"})
        assert "lost" in [u["state"] for u in first["updates"]]  # history keeps it all
        assert ran.read_text().split() == ["run", "run"]  # each attempt ran once
        assert FleetDB(svc.store).task("retry-b", f"{task.id}.a3") is None


def test_busy_rejections_are_retried_until_the_agent_has_room(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    # pace 8 above an agent queue of 1: the agent refuses some as busy; retried, all succeed
    with running_app(mosquitto.url, tmp_path, pace=8) as app:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        start_agent(mosquitto.url, "retry-c", tmp_path, "--queue-size", "1")
        api.wait_node("retry-c")
        ids = [svc.dispatch(["retry-c"], False, {"type": "shell", "command": "sleep 0.2"},
                            retry={"retries": 10, "on": ["busy"], "delay": 0.5})[0].id
               for _ in range(4)]
        db = FleetDB(svc.store)

        def chains_done() -> bool:
            return all(db.attempts("retry-c", i)[-1].state == "succeeded" for i in ids)
        assert wait_until(chains_done, 90, 0.2), [
            [(a.id, a.state) for a in db.attempts("retry-c", i)] for i in ids]
        tried = [a for i in ids for a in db.attempts("retry-c", i)]
        busy = [a for a in tried if a.state == "rejected"]
        assert busy and all(a.error is not None and a.error.code == "busy" for a in busy)
