"""Rollouts on 50 real agents (one process): a sliding window, the abort rule, pause and
resume, an offline node that fails fast instead of hanging the batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from edgerun.control.errors import BadRequest
from edgerun.scheduler.fleet.rollout import parse_abort, parse_options, parse_rate
from edgerun.scheduler.service import Service
from edgerun.control.errors import Conflict

from .brokers import Mosquitto, wait_until
from .fleet_kit import AgentSpec, pool
from .scheduler_kit import Api, running_app, start_agent

NODES = 50


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, Service]]:
    tmp = tmp_path_factory.mktemp("rollout")
    broker = Mosquitto(tmp / "mosquitto").start()
    try:
        with running_app(broker.url, tmp, offline_grace=2.0, grace=30.0) as app:
            api, svc = Api(app.api_url), app.service
            assert svc is not None
            gone = start_agent(broker.url, "roll-gone", tmp)  # known, then offline
            api.wait_node("roll-gone")
            assert gone.terminate() == 0
            api.wait_node("roll-gone", "offline")
            agents = [AgentSpec(f"roll-{i:03d}", parallel=2) for i in range(NODES)]
            with pool(broker.url, tmp / "agents", agents, api):
                yield api, svc
    finally:
        broker.stop()


def wait_rollout(svc: Service, rollout_id: str, states: set[str],
                 timeout: float = 120.0) -> dict[str, Any]:
    rollouts = svc.rollouts
    assert wait_until(lambda: rollouts.show(rollout_id)["state"] in states, timeout, 0.1), \
        rollouts.show(rollout_id)
    return rollouts.show(rollout_id)


def settle(svc: Service, rollout_id: str) -> dict[str, Any]:
    """Wait until no target is in flight any more."""
    rollouts = svc.rollouts
    assert wait_until(lambda: rollouts.show(rollout_id)["counts"]["active"] == 0, 60, 0.1)
    return rollouts.show(rollout_id)


def test_batch_5_aborts_after_3_failures_and_leaves_the_rest_untouched(
        fleet: tuple[Api, Service]) -> None:
    _, svc = fleet
    started = svc.rollouts.create(
        ["roll-0*"], False, {"type": "shell", "command": "sleep 0.2; exit 1"},
        {"batch": 5, "abort_after": 3})
    assert started["counts"]["total"] == NODES
    assert started["counts"]["active"] <= 5
    rollout = wait_rollout(svc, started["id"], {"aborted"})
    # the rule fires at the 3rd failure it sees; targets of the window that ended at the
    # same moment are counted too
    failed = int(rollout["reason"].split(" targets failed", 1)[0])
    assert 3 <= failed <= 5 and "the limit is 3 (--abort-after 3)" in rollout["reason"]
    rollout = settle(svc, started["id"])
    touched = [t for t in rollout["targets"] if t["phase"] != "skipped"]
    untouched = [t for t in rollout["targets"] if t["phase"] == "skipped"]
    # at most the window plus those that started while the first failures came in
    assert 3 <= len(touched) <= 5 + 2, [(t["node"], t["phase"]) for t in touched]
    assert len(untouched) == NODES - len(touched)
    for target in untouched:
        task = svc.store.get(target["node"], target["task"])
        assert task is not None
        assert task.state == "canceled" and task.dispatched_at is None
        assert task.error is not None and task.error.code == "rollout_aborted"
        assert rollout["reason"] in task.error.message
        updates = svc.store.updates(target["node"], target["task"])
        assert all(u.get("by") == "scheduler" for u in updates)  # nothing from the node
    assert {t["state"] for t in touched} <= {"failed", "canceled"}
    # visible afterwards too, the abort reason kept
    assert svc.rollouts.show(started["id"])["reason"] == rollout["reason"]


def test_the_window_never_holds_more_than_batch_targets(fleet: tuple[Api, Service]) -> None:
    _, svc = fleet
    peak = [0]
    stop = threading.Event()
    started = svc.rollouts.create(
        ["roll-00*", "roll-01*"], False, {"type": "shell", "command": "sleep 0.3"},
        {"batch": 4})

    def sample() -> None:
        while not stop.wait(0.02):
            counts = svc.rollouts.show(started["id"])["counts"]
            peak[0] = max(peak[0], counts["active"])
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        rollout = wait_rollout(svc, started["id"], {"finished"})
    finally:
        stop.set()
        sampler.join()
    assert rollout["counts"]["succeeded"] == 20 and rollout["reason"] is None
    assert 1 <= peak[0] <= 4, peak[0]


def test_an_offline_target_fails_fast_and_counts_as_a_failure(
        fleet: tuple[Api, Service]) -> None:
    _, svc = fleet
    started = svc.rollouts.create(
        ["roll-gone", "roll-02*"], False, {"type": "shell", "command": "true"},
        {"batch": 3, "abort_after": "50%", "abort_min": 5})
    rollout = wait_rollout(svc, started["id"], {"finished"}, timeout=60)
    gone = next(t for t in rollout["targets"] if t["node"] == "roll-gone")
    assert gone["phase"] == "lost" and gone["error"]["code"] == "unreachable"
    assert rollout["counts"] == {**rollout["counts"], "succeeded": 10, "failed": 1}


def test_pause_holds_new_targets_and_resume_finishes(fleet: tuple[Api, Service]) -> None:
    _, svc = fleet
    rollouts = svc.rollouts
    started = rollouts.create(["roll-03*"], False, {"type": "shell", "command": "sleep 0.3"},
                              {"batch": 2})
    paused = rollouts.pause(started["id"])
    assert paused["state"] == "paused"
    settled = settle(svc, started["id"])
    assert settled["state"] == "paused" and settled["counts"]["pending"] >= 6
    time.sleep(0.5)  # nothing starts while paused
    assert rollouts.show(started["id"])["counts"]["pending"] == settled["counts"]["pending"]
    with pytest.raises(Conflict, match="only a running rollout can be paused"):
        rollouts.pause(started["id"])
    rollouts.resume(started["id"])
    done = wait_rollout(svc, started["id"], {"finished"})
    assert done["counts"]["succeeded"] == 10
    with pytest.raises(Conflict, match="nothing to abort"):
        rollouts.abort(started["id"])


def test_rate_and_abort_rules_parse_and_refuse_nonsense() -> None:
    assert parse_rate("10/min") == 10 and parse_rate("2/s") == 120 and parse_rate(30) == 30
    assert parse_abort("3") == (3, None) and parse_abort("10%") == (None, 10.0)
    for bad, problem in (("fast", "N/min"), ("0/min", "more than 0"), ("-3/min", "N/min")):
        with pytest.raises(BadRequest, match=problem):
            parse_rate(bad)
    for bad, problem in (("150%", "at most 100"), ("0", "at least 1"), ("two", "number"),
                         ("2.5", "whole number")):
        with pytest.raises(BadRequest, match=problem):
            parse_abort(bad)
    with pytest.raises(BadRequest, match="needs `batch`"):
        parse_options({"abort_after": 3})
    with pytest.raises(BadRequest, match="at least 1"):
        parse_options({"batch": 0})
