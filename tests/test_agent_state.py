"""The state directory: a hostile task log never stops the agent, a lost one is rebuilt.

Each case plants something in `<state>/tasks.jsonl` before the agent starts:
garbage, JSON nested past the parser's depth, lone surrogates, records of the
wrong shape, a torn last line, a symlink, a FIFO, a directory. The agent must
start, keep every record it can trust (a task id it had finished is still not
run again) and keep remembering on disk. A state directory removed while the
agent runs is recreated without losing the at-most-once memory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .brokers import Mosquitto
from .mqttkit import AgentProcess, Observer, shell

GOOD = {"v": 1, "kind": "update", "id": "old-1", "node": "node-s", "state": "succeeded",
        "at": "2026-11-22T06:00:00.000Z", "exit_code": 0, "stdout": "old\n"}


def _lines(*extra: bytes) -> bytes:
    return json.dumps(GOOD).encode() + b"\n" + b"\n".join(extra) + b"\n"


CONTENTS = {
    "garbage": _lines(bytes(range(256)), b"\xff\xfe" * 1000, b"{", b"]]]"),
    "deep": _lines(b'{"id":"deep-1","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "surrogate": _lines(b'{"id":"sur-1","state":"succeeded","stdout":"\\ud800"}'),
    "shapes": _lines(b"[]", b"null", b"42", b'"id"', b'{"id":7}', b'{"id":"../../etc"}',
                     b'{"id":"' + b"x" * 5000 + b'","state":"running"}',
                     b'{"id":"ok-2","state":{"nested":true}}', b'{"id":"ok-3","at":1e999}'),
    "torn": _lines(b'{"id":"torn-1","state":"succ'),
    "huge-numbers": _lines(b'{"id":"num-1","state":"succeeded","exit_code":' + b"9" * 5000
                           + b"}"),
}


def _start(mosquitto: Mosquitto, observer: Observer, workdir: Path) -> AgentProcess:
    agent = AgentProcess(mosquitto.url, "node-s", workdir).start()
    agent.wait_online(observer)
    return agent


def _runs_once_more(observer: Observer, marker: Path, task_id: str) -> None:
    observer.send("node-s", shell(task_id, f"echo x >> {marker}"))
    assert observer.final(task_id)["state"] == "succeeded"


@pytest.mark.parametrize("case", sorted(CONTENTS))
def test_hostile_task_log_contents(mosquitto: Mosquitto, observer: Observer, tmp_path: Path,
                                   case: str) -> None:
    state = tmp_path / "a" / "state"
    state.mkdir(parents=True)
    (state / "tasks.jsonl").write_bytes(CONTENTS[case])
    agent = _start(mosquitto, observer, tmp_path / "a")
    observer.send("node-s", shell("old-1", "echo again"))
    republished = observer.final("old-1")
    assert republished["at"] == GOOD["at"], "a trusted record was lost"
    marker = tmp_path / "ran"
    _runs_once_more(observer, marker, "new-1")
    assert agent.alive()
    agent.kill()  # the memory must be on disk, not only in the process
    _start(mosquitto, observer, tmp_path / "a")
    observer.send("node-s", shell("new-1", f"echo x >> {marker}"))
    assert observer.wait("update", count=2, id="new-1", state="succeeded")
    assert marker.read_text() == "x\n", "a task ran twice"


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_task_log_that_is_not_a_regular_file(mosquitto: Mosquitto, observer: Observer,
                                             tmp_path: Path, kind: str) -> None:
    state = tmp_path / "a" / "state"
    state.mkdir(parents=True)
    log = state / "tasks.jsonl"
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    if kind == "symlink":
        log.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(log)
    else:
        log.mkdir()
        (log / "inside").write_text("x")
    agent = _start(mosquitto, observer, tmp_path / "a")
    marker = tmp_path / "ran"
    _runs_once_more(observer, marker, "n-1")
    assert victim.read_text() == "keep me\n", "the agent wrote through a symlink"
    agent.kill()
    _start(mosquitto, observer, tmp_path / "a")
    observer.send("node-s", shell("n-1", f"echo x >> {marker}"))
    assert observer.wait("update", count=2, id="n-1", state="succeeded")
    assert marker.read_text() == "x\n", "a task ran twice"
    assert "Traceback" not in agent.log()


def test_state_directory_removed_while_running(mosquitto: Mosquitto, observer: Observer,
                                               tmp_path: Path) -> None:
    agent = _start(mosquitto, observer, tmp_path / "a")
    marker = tmp_path / "ran"
    _runs_once_more(observer, marker, "r-1")
    shutil.rmtree(tmp_path / "a" / "state")
    _runs_once_more(observer, marker, "r-2")
    agent.kill()
    _start(mosquitto, observer, tmp_path / "a")
    for task_id in ("r-1", "r-2"):
        observer.send("node-s", shell(task_id, f"echo x >> {marker}"))
        assert observer.wait("update", count=2, id=task_id, state="succeeded")
    assert marker.read_text() == "x\nx\n", "the at-most-once memory was lost"


def test_state_directory_unwritable_for_a_while(mosquitto: Mosquitto, observer: Observer,
                                                tmp_path: Path) -> None:
    """A file where the directory was: the agent keeps serving from memory, says so once,
    and writes the whole memory out as soon as the directory can be made again."""
    agent = _start(mosquitto, observer, tmp_path / "a")
    marker = tmp_path / "ran"
    state = tmp_path / "a" / "state"
    _runs_once_more(observer, marker, "u-1")
    shutil.rmtree(state)
    state.write_text("in the way\n")  # root ignores modes; a file blocks mkdir for anyone
    _runs_once_more(observer, marker, "u-2")
    assert "cannot be written again" in agent.log()
    state.unlink()
    _runs_once_more(observer, marker, "u-3")
    agent.kill()
    _start(mosquitto, observer, tmp_path / "a")
    for task_id in ("u-1", "u-2", "u-3"):
        observer.send("node-s", shell(task_id, f"echo x >> {marker}"))
        assert observer.wait("update", count=2, id=task_id, state="succeeded")
    assert marker.read_text() == "x\n" * 3, "the at-most-once memory was lost"
