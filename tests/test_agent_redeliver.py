"""At-least-once delivery of final updates across a kill -9 of the agent.

A final update the broker never acknowledged (PUBACK) is published again by the
next run of the agent, read from its task log; one it did acknowledge is not:
a clean restart sends nothing old. The broker side is a real private Mosquitto
behind a proxy that can swallow traffic, so the final update is written by the
agent and lost on the way, as when a broker stalls right as a task ends.
"""

from __future__ import annotations

import json
from pathlib import Path

from .brokers import Mosquitto, wait_until
from .mqttkit import AgentProcess, Observer, shell
from .tcpproxy import TcpProxy


def _logged_state(state_dir: Path, task_id: str) -> str | None:
    """The task's latest state in the agent's own task log."""
    latest = None
    path = state_dir / "tasks.jsonl"
    for line in path.read_bytes().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("id") == task_id:
            latest = record.get("state")
    return latest


def test_unacknowledged_final_update_is_sent_again_after_kill(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with TcpProxy(mosquitto.port) as proxy:
        agent = AgentProcess(proxy.url("mqtt").rstrip("/"), "node-r", tmp_path / "a").start()
        agent.wait_online(observer)
        observer.send("node-r", shell("lost-1", f"sleep 1; echo x >> {marker}; echo done"))
        observer.wait("update", id="lost-1", state="running")
        proxy.swallowing.set()  # the task ends while nothing reaches the broker
        assert wait_until(lambda: _logged_state(tmp_path / "a" / "state", "lost-1")
                          == "succeeded", 15), agent.log()[-3000:]
        agent.kill()  # its final update was never acknowledged: only its task log knows it
        proxy.cut()
        proxy.swallowing.clear()
        assert observer.states("lost-1") == ["accepted", "running"], \
            "the final update got through: the test did not lose it"
        again = AgentProcess(proxy.url("mqtt").rstrip("/"), "node-r", tmp_path / "a").start()
        final = observer.final("lost-1")
        assert final["state"] == "succeeded"
        # the task log keeps no output tails on disk: the outcome comes back, marked cut
        assert final["exit_code"] == 0 and final["truncated"] is True
        assert marker.read_text() == "x\n", "the task ran twice"
        # delivered now: a clean restart sends it no more
        again.wait_online(observer)
        observer.send("node-r", shell("after-1", "true"))
        observer.final("after-1")
        assert again.terminate() == 0
        AgentProcess(mosquitto.url, "node-r", tmp_path / "a").start()
        observer.send("node-r", shell("after-2", "true"))
        observer.final("after-2")
        assert len(observer.updates("lost-1")) == 3, observer.updates("lost-1")


def test_clean_restart_sends_no_old_updates(mosquitto: Mosquitto, observer: Observer,
                                            tmp_path: Path) -> None:
    agent = AgentProcess(mosquitto.url, "node-c", tmp_path / "a").start()
    agent.wait_online(observer)
    ids = [f"c-{i}" for i in range(5)]
    for task_id in ids:
        observer.send("node-c", shell(task_id, "echo hi"))
    for task_id in ids:
        observer.final(task_id)
    observer.send("node-c", {"v": 1, "kind": "task", "id": "bad-1", "type": "nope"})
    assert observer.final("bad-1")["state"] == "rejected"
    assert agent.terminate() == 0
    for probe in ("probe-1", "probe-2"):  # twice: the marks survive the start's compaction
        agent = AgentProcess(mosquitto.url, "node-c", tmp_path / "a").start()
        agent.wait_online(observer)
        observer.send("node-c", shell(probe, "true"))  # its updates come after any re-sent
        observer.final(probe)
        assert agent.terminate() == 0
    sent = {task_id: len(observer.updates(task_id)) for task_id in [*ids, "bad-1", "probe-1"]}
    assert sent == {**{task_id: 3 for task_id in ids}, "bad-1": 1, "probe-1": 3}, \
        "updates the broker had acknowledged were sent again"


def _update(task_id: str, state: str) -> bytes:
    return json.dumps({"v": 1, "kind": "update", "id": task_id, "node": "node-h",
                       "state": state, "at": "2026-11-22T06:00:00.000Z"}).encode()


def test_hostile_delivered_marks(mosquitto: Mosquitto, observer: Observer,
                                 tmp_path: Path) -> None:
    """Mark lines that cannot be trusted are skipped: what they would have marked is sent
    again (a duplicate, never a loss), and a mark never hides another id's update."""
    state = tmp_path / "a" / "state"
    state.mkdir(parents=True)
    (state / "tasks.jsonl").write_bytes(b"\n".join([
        _update("done-1", "succeeded"), _update("open-1", "succeeded"),
        _update("open-2", "failed"), _update("run-1", "running"),
        b'{"delivered":["done-1"]}',  # the one good mark
        b'{"delivered":"open-1"}', b'{"delivered":[7,"open-1"]}', b'{"delivered":["../x"]}',
        b'{"delivered":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"delivered":["open-2"],"x":' + b"\xff" * 10 + b"}",
        b'{"delivered":["run-1"]}',  # not final: marks nothing, the task is still ended
        b'{"delivered":["open-2"',  # torn
    ]) + b"\n")
    agent = AgentProcess(mosquitto.url, "node-h", tmp_path / "a").start()
    agent.wait_online(observer)
    assert observer.final("open-1")["state"] == "succeeded"
    assert observer.final("open-2")["state"] == "failed"
    assert observer.final("run-1")["error"]["code"] == "internal"
    observer.send("node-h", shell("probe-h", "true"))
    observer.final("probe-h")
    assert observer.updates("done-1") == []
    assert agent.alive() and "Traceback" not in agent.log()
    assert "could not be trusted" in agent.log()
