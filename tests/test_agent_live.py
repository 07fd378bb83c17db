"""The agent as a real process against a real, private Mosquitto."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .brokers import Mosquitto, wait_until
from .mqttkit import AgentProcess, Observer, shell


@pytest.fixture
def agent(mosquitto: Mosquitto, observer: Observer, tmp_path: Path):
    proc = AgentProcess(mosquitto.url, "node-a", tmp_path / "agent").start()
    proc.wait_online(observer)
    yield proc
    if proc.alive():
        proc.kill()


def test_online_status_is_retained_with_facts(agent: AgentProcess, observer: Observer,
                                              mosquitto: Mosquitto) -> None:
    status = agent.wait_online(observer)
    facts = status["facts"]
    for key in ("hostname", "kernel", "arch", "macs", "ips", "cpus", "mem_bytes"):
        assert key in facts
    assert status["agent"] and status["running"] == []
    # a client that arrives later still sees it: it is retained
    with Observer(mosquitto.url) as late:
        assert late.wait("status", node="node-a", state="online")


def test_shell_task_reports_every_step_and_live_output(agent: AgentProcess,
                                                       observer: Observer) -> None:
    observer.send("node-a", shell("t1", "echo out; echo err >&2; printf 'x%.0s' $(seq 20000)"))
    final = observer.final("t1")
    assert observer.states("t1") == ["accepted", "running", "succeeded"]
    assert final["exit_code"] == 0 and final["stderr"] == "err\n"
    assert final["stdout"].startswith("out\n") and final["stdout"].count("x") == 20000
    assert final["truncated"] is False and final["duration_s"] >= 0
    outputs = observer.wait("output", id="t1", count=2)
    assert sorted(o["seq"] for o in outputs) == list(range(len(outputs)))
    assert all(len(o["data"].encode()) <= 16 * 1024 for o in outputs)
    assert "".join(o["data"] for o in outputs if o["stream"] == "stdout") == final["stdout"]


def test_last_will_turns_a_killed_agent_offline(agent: AgentProcess, observer: Observer) -> None:
    agent.kill()
    will = observer.wait("status", node="node-a", state="offline")[-1]
    assert will == {"v": 1, "kind": "status", "node": "node-a", "state": "offline"}


def test_sigterm_cancels_queued_finishes_running_and_exits_zero(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    proc = AgentProcess(mosquitto.url, "node-t", tmp_path / "a", "--grace", "10").start()
    proc.wait_online(observer)
    # `long` runs until the test lets it end, not for a fixed time: with `sleep 1`, a host
    # that stalled the test for a second after `accepted` let `waiting` start first
    release = tmp_path / "release"
    observer.send("node-t", shell("long", f"while [ ! -e {release} ]; do sleep 0.02; done; "
                                          "echo finished"))
    observer.send("node-t", shell("waiting", "echo never"))
    observer.wait("update", id="waiting", state="accepted")
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    waiting = observer.final("waiting")  # answered at SIGTERM, while `long` still runs
    release.touch()
    assert proc.proc.wait(30) == 0
    assert observer.final("long")["state"] == "succeeded"
    assert waiting["state"] == "canceled" and waiting["error"]["code"] == "canceled"
    offline = observer.wait("status", node="node-t", state="offline")[-1]
    assert offline["at"] and offline["agent"]


def test_sigterm_grace_runs_out_and_cancels_running(mosquitto: Mosquitto, observer: Observer,
                                                    tmp_path: Path) -> None:
    proc = AgentProcess(mosquitto.url, "node-g", tmp_path / "a", "--grace", "0.5").start()
    proc.wait_online(observer)
    observer.send("node-g", shell("slow", "sleep 30"))
    observer.wait("update", id="slow", state="running")
    assert proc.terminate() == 0
    final = observer.final("slow")
    assert final["state"] == "canceled" and "shutting down" in final["error"]["message"]


def test_repeated_task_id_runs_once_and_republishes(agent: AgentProcess, observer: Observer,
                                                    tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    task = shell("once", f"echo x >> {marker}")
    observer.send("node-a", task)
    observer.final("once")
    observer.send("node-a", task)
    assert observer.wait("update", id="once", state="succeeded", count=2)
    assert marker.read_text() == "x\n"


def test_task_ids_survive_an_agent_restart(mosquitto: Mosquitto, observer: Observer,
                                           tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    proc = AgentProcess(mosquitto.url, "node-r", tmp_path / "a").start()
    proc.wait_online(observer)
    task = shell("persisted", f"echo x >> {marker}")
    observer.send("node-r", task)
    observer.final("persisted")
    assert proc.terminate() == 0
    proc.start()
    observer.send("node-r", task)
    assert observer.wait("update", id="persisted", state="succeeded", count=2)
    assert marker.read_text() == "x\n"
    proc.terminate()


def test_task_published_while_agent_is_down_runs_once_on_return(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    proc = AgentProcess(mosquitto.url, "node-d", tmp_path / "a").start()
    proc.wait_online(observer)
    assert proc.terminate() == 0
    observer.send("node-d", shell("while-down", f"echo x >> {marker}"))
    assert observer.conn.flush(5)
    proc.start()
    assert observer.final("while-down")["state"] == "succeeded"
    assert marker.read_text() == "x\n"
    proc.terminate()


def test_broker_killed_mid_task_final_update_still_arrives(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    proc = AgentProcess(mosquitto.url, "node-k", tmp_path / "a").start()
    proc.wait_online(observer)
    observer.send("node-k", shell("through-crash", "sleep 2; echo survived"))
    observer.wait("update", id="through-crash", state="running")
    mosquitto.checkpoint()
    mosquitto.kill()  # kill -9 while the task runs
    mosquitto.start()
    final = observer.final("through-crash", timeout=30)
    assert final["state"] == "succeeded" and final["stdout"] == "survived\n"
    assert proc.alive()
    proc.terminate()


def test_agent_restarted_mid_task_reports_it_failed(mosquitto: Mosquitto, observer: Observer,
                                                    tmp_path: Path) -> None:
    proc = AgentProcess(mosquitto.url, "node-x", tmp_path / "a").start()
    proc.wait_online(observer)
    observer.send("node-x", shell("interrupted", "sleep 30"))
    observer.wait("update", id="interrupted", state="running")
    proc.kill()
    proc.start()
    final = observer.final("interrupted")
    assert final["state"] == "failed" and final["error"]["code"] == "internal"
    assert "restarted" in final["error"]["message"]
    proc.terminate()


def test_updates_made_while_disconnected_are_delivered_after_reconnect(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    proc = AgentProcess(mosquitto.url, "node-o", tmp_path / "a").start()
    proc.wait_online(observer)
    observer.send("node-o", shell("offline-finish", "sleep 0.5; echo done"))
    observer.wait("update", id="offline-finish", state="running")
    mosquitto.checkpoint()
    mosquitto.kill()
    task_log = tmp_path / "a" / "state" / "tasks.jsonl"
    # the broker stays down until the agent has finished the task and recorded it
    assert wait_until(lambda: '"state":"succeeded"' in task_log.read_text(), 30)
    mosquitto.start()
    final = observer.final("offline-finish", timeout=60)
    assert final["state"] == "succeeded" and final["stdout"] == "done\n"
    proc.terminate()
