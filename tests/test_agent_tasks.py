"""Task handling of a live agent process: bad input, busy, cancel, order, parallel, downloads."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any

import pytest

from edgerun.protocol import format_time

from .brokers import Mosquitto
from .httpkit import PAYLOAD, PAYLOAD_SHA, http_server
from .mqttkit import ROOT, AgentProcess, Observer, shell


@pytest.fixture
def start_agent(mosquitto: Mosquitto, observer: Observer,
                tmp_path: Path) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def start(node: str, *args: str) -> AgentProcess:
        proc = AgentProcess(mosquitto.url, node, tmp_path / node, *args).start()
        proc.wait_online(observer)
        started.append(proc)
        return proc
    yield start
    for proc in started:
        if proc.alive():
            proc.kill()


def dl(task_id: str, url: str, dest: str, **extra: Any) -> dict[str, Any]:
    return {"v": 1, "kind": "task", "id": task_id, "type": "download", "url": url,
            "dest": dest, **extra}


PAST = format_time(datetime.now(UTC) - timedelta(hours=1))
# (message, expected code); an id in the message means the rejection must carry it
BAD_WITH_ID: list[tuple[dict[str, Any], str]] = [
    (shell("b-v2", "true", v=2), "bad_message"),
    (shell("b-type", "true", type="reboot"), "unsupported_type"),
    (shell("b-cmd-type", 42), "bad_message"),
    (shell("b-cmd-empty", ""), "bad_message"),
    (shell("b-argv-type", ["ls", {"a": 1}]), "bad_message"),
    (shell("b-env", "true", env={"A": 1}), "bad_message"),
    (shell("b-cwd", "true", cwd="relative"), "bad_message"),
    (shell("b-timeout", "true", timeout=-5), "bad_message"),
    (shell("b-timeout-str", "true", timeout="soon"), "bad_message"),
    (shell("b-ok-codes", "true", ok_codes="0"), "bad_message"),
    (shell("b-expired", "true", expires_at=PAST), "expired"),
    (shell("b-expires-bad", "true", expires_at="later"), "bad_message"),
    (shell("b-big", "echo " + "x" * 300_000), "too_large"),
    (shell("b-nul", "echo a\x00b"), "bad_message"),
    (dl("b-rel", "http://h/x", "relative/dest"), "bad_message"),
    (dl("b-ftp", "ftp://h/x", "/tmp/x"), "bad_message"),
    (dl("b-file-url", "file:///etc/shadow", "/tmp/x"), "bad_message"),
    (dl("b-sha", "http://h/x", "/tmp/x", sha256="nothex"), "bad_message"),
    (dl("b-mode", "http://h/x", "/tmp/x", mode="rwx"), "bad_message"),
    (dl("b-max", "http://h/x", "/tmp/x", max_bytes=-1), "bad_message"),
    (dl("b-dotdot", "http://h/x", "/tmp/../etc/x"), "bad_message"),
]
BAD_WITHOUT_ID: list[bytes] = [
    b"not json at all",
    bytes(range(256)) * 8,                      # binary garbage
    b"[" * 50_000 + b"]" * 50_000,              # deep nesting
    b'{"v":1,"kind":"task","id":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    b"[]",
    b"null",
    json.dumps(shell("has/slash", "true")).encode(),
    json.dumps(shell("x" * 200, "true")).encode(),
    json.dumps({"v": 1, "kind": "task", "type": "shell", "command": "true"}).encode(),
    b"\xff" * 300_000,                          # oversized binary
]


def test_bad_input_is_rejected_with_codes_and_the_agent_keeps_serving(
        start_agent: Any, observer: Observer) -> None:
    start_agent("node-bad")
    for message, _ in BAD_WITH_ID:
        observer.send("node-bad", message)
    for raw in BAD_WITHOUT_ID:
        observer.send("node-bad", raw)
        observer.send("node-bad", shell(f"alive-{len(raw)}", "echo ok"))  # serving in between
    observer.send("node-bad", shell("still-alive", "echo alive"))
    assert observer.final("still-alive", timeout=30)["stdout"] == "alive\n"
    for message, code in BAD_WITH_ID:
        final = observer.final(message["id"])
        assert (final["state"], final["error"]["code"]) == ("rejected", code), final
        assert final["error"]["message"]
    anonymous = observer.wait("update", id=None, count=len(BAD_WITHOUT_ID))
    assert len(anonymous) == len(BAD_WITHOUT_ID)
    assert {u["error"]["code"] for u in anonymous} <= {"bad_message", "too_large"}
    for raw in BAD_WITHOUT_ID:
        assert observer.final(f"alive-{len(raw)}")["state"] == "succeeded"


def test_failures_at_run_time_are_failed_with_codes(start_agent: Any, observer: Observer,
                                                    tmp_path: Path) -> None:
    start_agent("node-fail")
    with http_server() as base:
        observer.send("node-fail", shell("f-exit", "exit 7"))
        observer.send("node-fail", shell("f-spawn", ["/no/such/program"]))
        observer.send("node-fail", shell("f-timeout", "sleep 30", timeout=0.5))
        observer.send("node-fail", dl("f-sum", f"{base}/file", str(tmp_path / "x"),
                                      sha256="0" * 64))
        observer.send("node-fail", dl("f-404", f"{base}/missing", str(tmp_path / "y")))
        observer.send("node-fail", dl("f-max", f"{base}/file", str(tmp_path / "z"),
                                      max_bytes=10))
        expected = {"f-exit": ("failed", "exit_status"), "f-spawn": ("failed", "spawn_failed"),
                    "f-timeout": ("timed_out", "timeout"),
                    "f-sum": ("failed", "checksum_mismatch"),
                    "f-404": ("failed", "download_failed"), "f-max": ("failed", "too_large")}
        for task_id, (state, code) in expected.items():
            final = observer.final(task_id)
            assert (final["state"], final["error"]["code"]) == (state, code), final
            # `running` is published once the command was forked (or failed to be):
            # every task still says accepted -> running -> final, in that order
            assert observer.states(task_id) == ["accepted", "running", state]
    assert observer.final("f-exit")["exit_code"] == 7
    assert not any(p.exists() for p in (tmp_path / "x", tmp_path / "y", tmp_path / "z"))


def test_download_task_succeeds(start_agent: Any, observer: Observer, tmp_path: Path) -> None:
    start_agent("node-dl")
    dest = tmp_path / "out" / "payload.bin"
    with http_server() as base:
        observer.send("node-dl", dl("get", f"{base}/file", str(dest), sha256=PAYLOAD_SHA,
                                    mode="0600"))
        final = observer.final("get")
    assert final["state"] == "succeeded"
    assert (final["bytes"], final["sha256"], final["dest"]) == \
        (len(PAYLOAD), PAYLOAD_SHA, str(dest))
    assert dest.read_bytes() == PAYLOAD and oct(dest.stat().st_mode)[-3:] == "600"


def test_full_queue_rejects_busy(start_agent: Any, observer: Observer) -> None:
    start_agent("node-busy", "--queue-size", "2")
    observer.send("node-busy", shell("blocker", "sleep 30"))
    observer.wait("update", id="blocker", state="running")
    for name in ("q1", "q2", "q3"):
        observer.send("node-busy", shell(name, "true"))
    final = observer.final("q3")
    assert (final["state"], final["error"]["code"]) == ("rejected", "busy")
    assert observer.states("q1") == ["accepted"] and observer.states("q2") == ["accepted"]
    observer.send("node-busy", {"v": 1, "kind": "cancel", "id": "blocker"})
    assert observer.final("q2")["state"] == "succeeded"


def test_cancel_queued_running_and_unknown(start_agent: Any, observer: Observer) -> None:
    start_agent("node-c")
    observer.send("node-c", shell("running", "sleep 30"))
    observer.wait("update", id="running", state="running")
    observer.send("node-c", shell("queued", "echo never"))
    observer.wait("update", id="queued", state="accepted")
    for task_id in ("queued", "running", "unknown"):
        observer.send("node-c", {"v": 1, "kind": "cancel", "id": task_id})
    observer.send("node-c", shell("after", "true"))
    assert observer.final("after")["state"] == "succeeded"
    queued, running = observer.final("queued"), observer.final("running")
    assert observer.states("queued") == ["accepted", "canceled"]
    assert running["state"] == "canceled" and running["error"]["code"] == "canceled"
    assert queued["error"]["message"] == "canceled before it started"
    assert observer.updates("unknown") == []


def test_tasks_run_one_at_a_time_in_arrival_order(start_agent: Any, observer: Observer,
                                                  tmp_path: Path) -> None:
    start_agent("node-o")
    record = tmp_path / "order.txt"
    ids = [f"o{i}" for i in range(8)]
    for task_id in ids:
        observer.send("node-o", shell(task_id, f"echo {task_id} >> {record}; sleep 0.05"))
    for task_id in ids:
        observer.final(task_id)
    assert record.read_text().split() == ids


def test_command_runs_only_once_its_accepted_is_in_the_task_log(
        start_agent: Any, observer: Observer) -> None:
    """A command starts only once its `accepted` is in the task log (fdatasynced): what
    it runs must see that record, and `accepted` -> `running` -> final in order."""
    agent = start_agent("node-g")
    log_file = agent.dir / "state" / "tasks.jsonl"
    ids = [f"g{i}" for i in range(20)]
    for task_id in ids:  # string (sh -c) and argv commands are both checked
        check = f"grep '\"id\":\"{task_id}\"' {log_file} | grep -q '\"state\":\"accepted\"'"
        observer.send("node-g", shell(task_id, check if task_id != "g7" else
                                      ["/bin/sh", "-c", check]))
    for task_id in ids:
        final = observer.final(task_id)
        assert final["state"] == "succeeded", f"{task_id} ran before it was logged: {final}"
        states = [u["state"] for u in observer.of("update", id=task_id)]
        assert states == ["accepted", "running", "succeeded"], states


def test_parallel_runs_tasks_at_once(start_agent: Any, observer: Observer,
                                     tmp_path: Path) -> None:
    start_agent("node-p", "--parallel", "3")
    meet = tmp_path / "meet"
    meet.mkdir()
    # each task waits until all three have started: only possible if they run at once
    wait_all = (f"touch {meet}/$TASK; for i in $(seq 200); do "
                f"[ $(ls {meet} | wc -l) -ge 3 ] && exit 0; sleep 0.05; done; exit 1")
    for name in ("p1", "p2", "p3"):
        observer.send("node-p", shell(name, wait_all, env={"TASK": name}))
    assert all(observer.final(n, timeout=30)["state"] == "succeeded" for n in ("p1", "p2", "p3"))


def test_idle_agent_imports_no_heavy_modules(mosquitto: Mosquitto, tmp_path: Path) -> None:
    script = f"""
import json, sys, threading
from edgerun.agent import config
from edgerun.agent.core import Agent
cfg = config.load(["--broker", "{mosquitto.url}", "--node", "idle",
                   "--state-dir", "{tmp_path}/s"], {{}}, "")
agent = Agent(cfg)
thread = threading.Thread(target=agent.run)
thread.start()
assert agent.conn.connected.wait(10) and agent.conn.flush(10)
idle = sorted(sys.modules)
from tests.mqttkit import Observer
from tests.httpkit import http_server
with Observer("{mosquitto.url}") as obs, http_server() as base:
    obs.send("idle", {{"v": 1, "kind": "task", "id": "d", "type": "download",
                       "url": base + "/file", "dest": "{tmp_path}/f"}})
    obs.final("d")
agent.stop()
thread.join(30)
print(json.dumps({{"idle": idle, "after": sorted(sys.modules)}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    mods = json.loads(done.stdout.strip().splitlines()[-1])
    idle = {m.split(".")[0] for m in mods["idle"]}
    assert not idle & {"pika", "amqtt", "scheduler", "bridge", "requests", "urllib3",
                       "prometheus_client"}
    # paho's urllib.request (http.client, email, ...) waits for the first download
    assert not set(mods["idle"]) & {"http.client", "email", "tempfile"}
    # nor OpenSSL on a plain mqtt:// broker: paho's ssl and hashlib wait for first use
    assert not set(mods["idle"]) & {"_ssl", "_hashlib"}
    assert "requests" in mods["after"] and "http.client" in mods["after"]
