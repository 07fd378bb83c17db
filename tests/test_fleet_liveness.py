"""Liveness: a node with tasks in flight goes offline (its Last Will): followers are told at
once, after --offline-grace its running task ends `lost`, and the final update that
still comes later is recorded and wins."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

from edgerun.scheduler.store.events import Subscription

from .brokers import Mosquitto
from .scheduler_kit import Api, running_app, start_agent


def events_until(sub: Subscription, done: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while not done(seen):
        try:
            item = sub.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no further event; seen {[_short(e) for e in seen]}") from None
        assert item is not None, "the hub closed"
        seen.append(item[1])
    return seen


def _short(event: dict[str, Any]) -> str:
    alert = event.get("alert") or {}
    return f"{event.get('state')}{'!' + alert['code'] if alert else ''}"


def test_agent_killed_mid_task_alerts_then_lost_after_the_grace_then_late_truth_wins(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    with running_app(mosquitto.url, tmp_path, grace=60.0, offline_grace=1.0) as app:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        agent = start_agent(mosquitto.url, "live-a", tmp_path)
        api.wait_node("live-a")
        [task] = svc.dispatch(["live-a"], False, {"type": "shell", "command": "sleep 60",
                                                  "timeout": 120})
        sub = svc.hub.subscribe(ids=[task.id], kinds=["task_event"])
        try:
            api.wait_state(task.id, "live-a", "running")
            agent.kill()  # SIGKILL: the broker publishes its Last Will
            seen = events_until(sub, lambda s: any(e["state"] == "lost" for e in s))
            alerts = [e for e in seen if e.get("alert")]
            assert alerts and alerts[0]["alert"]["code"] == "node_offline", \
                [_short(e) for e in seen]
            assert alerts[0]["state"] == "running" and "live-a" in alerts[0]["alert"]["message"]
            # told first, lost after the grace
            assert seen.index(alerts[0]) < next(i for i, e in enumerate(seen)
                                                if e["state"] == "lost")
            lost = api.task(task.id, "live-a")
            assert lost["state"] == "lost"
            assert "offline" in lost["error"]["message"] and "1 s" in lost["error"]["message"]
            # the agent comes back: the task it was running when it died is reported
            # failed (internal); that later truth replaces `lost`, history keeps both
            agent.start()
            late = events_until(sub, lambda s: any(e["state"] == "failed" for e in s))
            assert late[-1]["previous"] == "lost"
        finally:
            svc.hub.unsubscribe(sub)
        final = api.wait_state(task.id, "live-a", "failed")
        states = [u["state"] for u in final["updates"]]
        assert states[-2:] == ["lost", "failed"], states
        assert final["error"]["code"] == "internal"


def test_a_node_back_within_the_grace_keeps_its_task(mosquitto: Mosquitto,
                                                     tmp_path: Path) -> None:
    with running_app(mosquitto.url, tmp_path, grace=60.0, offline_grace=30.0) as app:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        agent = start_agent(mosquitto.url, "live-b", tmp_path)
        api.wait_node("live-b")
        [task] = svc.dispatch(["live-b"], False, {"type": "shell", "command": "sleep 60"})
        sub = svc.hub.subscribe(ids=[task.id], kinds=["task_event"])
        try:
            api.wait_state(task.id, "live-b", "running")
            agent.kill()
            events_until(sub, lambda s: any(e.get("alert") for e in s))
            agent.start()
            # back within the grace: the restarted agent's own report ends the task
            back = events_until(sub, lambda s: any(e["state"] == "failed" for e in s))
            assert all(e["state"] != "lost" for e in back)
        finally:
            svc.hub.unsubscribe(sub)
        final = api.wait_state(task.id, "live-b", "failed")
        assert "lost" not in [u["state"] for u in final["updates"]]
