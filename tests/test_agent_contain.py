"""Nothing a task starts survives it: real processes that leave the group and the session.

Each task's command starts processes that try to escape: `setsid`, `nohup setsid`,
a double fork (the intermediate exits, the grandchild is orphaned), all in the
background. Every escapee carries a unique token in its command line, so the
test finds it by scanning /proc. After the task's final update (exit, timeout,
cancel, SIGTERM, or an agent killed with -9 and started again) none may live.
Both containment modes run: a cgroup v2 per task (where writable) and the
fallback (subreaper and a walk of /proc).
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerun.agent.contain import Containment, cgroup_base
from edgerun.agent.outcome import Control
from edgerun.agent.shell import run_shell
from edgerun.protocol import ShellTask, State

from .brokers import Mosquitto, wait_until
from .mqttkit import AgentProcess, Observer, shell

MODES = ["auto", "off"]


def escapees(token: str) -> str:
    """A script that leaves four processes behind in every way a shell can."""
    return (f"setsid sleep 1000.{token}1 >/dev/null 2>&1 & "
            f"nohup setsid sleep 1000.{token}2 >/dev/null 2>&1 & "
            f"(sh -c 'sleep 1000.{token}3 >/dev/null 2>&1 &' &) ; "
            f"(setsid sh -c 'sleep 1000.{token}4 & exec sleep 1000.{token}5' "
            f">/dev/null 2>&1 &) ; ")


def living(token: str) -> list[int]:
    """Pids of processes whose command line holds `token` (zombies do not count)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{name}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if token.encode() in cmdline and state != b"Z" and int(name) != os.getpid():
            found.append(int(name))
    return found


def all_started(token: str) -> bool:
    return len(living(token)) >= 5


@pytest.fixture
def token() -> Iterator[str]:
    value = str(uuid.uuid4().int)[:12]
    yield value
    for pid in living(value):  # a failing test must not leave its sleepers behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _task(token: str, tail: str, timeout: float = 60) -> ShellTask:
    return ShellTask(id=f"t{token}", command=escapees(token) + tail, timeout=timeout)


@pytest.mark.parametrize("mode", MODES)
def test_runner_command_exit_ends_every_escapee(token: str, mode: str, tmp_path: Path) -> None:
    jail = Containment(f"test-{token}", cgroups=mode == "auto")
    outcome = run_shell(_task(token, "sleep 0.5; echo done"), Control.for_timeout(60),
                        lambda *_: None, jail)
    assert outcome.state == State.SUCCEEDED, outcome
    assert outcome.fields["stdout"] == "done\n"
    assert living(token) == []
    jail.close()


@pytest.mark.parametrize("mode", MODES)
def test_runner_timeout_ends_every_escapee(token: str, mode: str, tmp_path: Path) -> None:
    jail = Containment(f"test-{token}", cgroups=mode == "auto")
    outcome = run_shell(_task(token, "trap '' TERM; sleep 1000", timeout=1.5),
                        Control.for_timeout(1.5), lambda *_: None, jail)
    assert outcome.state == State.TIMED_OUT, outcome
    assert living(token) == []
    jail.close()


def test_cgroup_mode_is_used_where_cgroup_v2_is_writable(tmp_path: Path) -> None:
    base = cgroup_base()
    if base is None:
        pytest.skip("no writable cgroup v2 here")
    jail = Containment("test-probe", cgroups=True)
    assert jail.cgroup_dir is not None and jail.cgroup_dir.startswith(base)
    jail.close()


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    return tmp_path / "agent"


def _start(mosquitto: Mosquitto, observer: Observer, workdir: Path, mode: str,
           *args: str) -> AgentProcess:
    agent = AgentProcess(mosquitto.url, "node-c", workdir, "--contain", mode, *args).start()
    agent.wait_online(observer)
    return agent


@pytest.mark.parametrize("mode", MODES)
def test_cancel_ends_every_escapee(mosquitto: Mosquitto, observer: Observer, agent_dir: Path,
                                   token: str, mode: str) -> None:
    agent = _start(mosquitto, observer, agent_dir, mode)
    observer.send("node-c", shell("c1", escapees(token) + "sleep 1000"))
    assert wait_until(lambda: all_started(token), 15)
    observer.send("node-c", {"v": 1, "kind": "cancel", "id": "c1"})
    assert observer.final("c1")["state"] == "canceled"
    assert living(token) == []
    assert agent.terminate() == 0


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_ends_every_escapee(mosquitto: Mosquitto, observer: Observer, agent_dir: Path,
                                    token: str, mode: str) -> None:
    agent = _start(mosquitto, observer, agent_dir, mode, "--grace", "0.5")
    observer.send("node-c", shell("s1", escapees(token) + "sleep 1000"))
    assert wait_until(lambda: all_started(token), 15)
    assert agent.terminate() == 0
    assert observer.final("s1")["state"] == "canceled"
    assert living(token) == []


@pytest.mark.parametrize("mode", MODES)
def test_agent_killed_then_restarted_ends_what_the_task_left(
        mosquitto: Mosquitto, observer: Observer, agent_dir: Path, token: str,
        mode: str) -> None:
    agent = _start(mosquitto, observer, agent_dir, mode)
    observer.send("node-c", shell("k1", escapees(token) + "sleep 1000"))
    assert wait_until(lambda: all_started(token), 15)
    agent.kill()
    again = _start(mosquitto, observer, agent_dir, mode)
    final = observer.final("k1")
    assert final["state"] == "failed" and final["error"]["code"] == "internal", final
    assert living(token) == [], "a task reported failed keeps running"
    assert "killed" in final["error"]["message"], final
    assert again.terminate() == 0
