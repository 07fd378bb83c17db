"""A shell command's shell is started before its task is admitted and waits at a gate.

The agent forks `sh` while it makes `accepted` durable, so the command must (1) run
nothing before the gate opens, (2) never run when the task is not admitted, and (3)
once admitted, behave as `sh -c COMMAND` does. Real processes, no broker.
"""

from __future__ import annotations

import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from edgerun.agent.outcome import Control, NotAdmitted, Outcome
from edgerun.agent.shell import run_shell
from edgerun.protocol import ShellTask, State

from .brokers import wait_until
from .test_agent_contain import living

# (command, stdin): each is run by the agent's runner and by `sh -c` and must give the
# same exit status, stdout and stderr
SAME_AS_SH_C = [
    ('echo "$0 $# [$*]"', None),                 # $0 is sh, no arguments
    ("cat", None),                                 # no task stdin: EOF at once
    ("cat", "line 1\nline 2"),                    # the task's stdin, all of it
    ("read -r a; read -r b; echo \"$b/$a\"", "x\ny\n"),
    ("exit 7", None),
    ("shift", None),                               # nothing to shift, as with sh -c
    ('trap "echo bye" EXIT; echo hi', None),
    ("exec echo replaced", None),
    ('echo "[${EDGERUN_GO-unset}]"', None),       # the gate leaves no variable behind
    ("echo out; echo err >&2; exit 3", None),
    ("set -e; false; echo never", None),
    ('x=1; f() { echo "$x$1"; }; f 2', None),
    ("printf '%s' \"$1\"", None),
    ("ls /no/such/path", None),
    ("", None),
    ("#!/bin/sh only a comment", None),
]


def _run(task: ShellTask, control: Control | None = None) -> Outcome:
    return run_shell(task, control or Control.for_timeout(30), lambda stream, data: None)


@pytest.mark.parametrize(("command", "stdin"), SAME_AS_SH_C)
def test_gated_command_behaves_as_sh_c(command: str, stdin: str | None) -> None:
    outcome = _run(ShellTask(id="same", command=command, timeout=30, stdin=stdin,
                             ok_codes=tuple(range(256))))
    plain = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                           input=stdin if stdin is not None else None,
                           stdin=subprocess.DEVNULL if stdin is None else None)
    assert outcome.state == State.SUCCEEDED, outcome
    assert (outcome.fields["exit_code"], outcome.fields["stdout"], outcome.fields["stderr"]) \
        == (plain.returncode, plain.stdout, plain.stderr)


def test_syntax_error_differs_only_by_the_word_eval() -> None:
    outcome = _run(ShellTask(id="syntax", command="if", timeout=30))
    plain = subprocess.run(["/bin/sh", "-c", "if"], capture_output=True, text=True)
    assert outcome.fields["exit_code"] == plain.returncode == 2
    assert outcome.fields["stderr"].replace("eval: ", "") == plain.stderr


def _held_run(tmp_path: Path, stdin: str | None) -> tuple[Control, Path, threading.Thread,
                                                         list[object]]:
    marker = tmp_path / "ran"
    task = ShellTask(id=f"gate-{uuid.uuid4().hex[:8]}", command=f"touch {marker}; cat",
                     timeout=30, stdin=stdin)
    control = Control.for_timeout(30)
    control.hold()
    result: list[object] = []

    def target() -> None:
        try:
            result.append(_run(task, control))
        except NotAdmitted as exc:
            result.append(exc)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    # the shell is started and waits at its gate, having run nothing of the command
    assert wait_until(lambda: len(living(str(marker))) == 1, 10)
    return control, marker, thread, result


@pytest.mark.parametrize("stdin", [None, "data"])
def test_nothing_runs_before_the_gate_opens(tmp_path: Path, stdin: str | None) -> None:
    control, marker, thread, result = _held_run(tmp_path, stdin)
    thread.join(0.5)
    assert thread.is_alive() and not marker.exists(), "the command ran before admission"
    control.admit()
    thread.join(10)
    outcome = result[0]
    assert isinstance(outcome, Outcome) and outcome.state == State.SUCCEEDED, outcome
    assert marker.exists() and outcome.fields["stdout"] == (stdin or "")
    assert living(str(marker)) == []


def test_a_task_not_admitted_never_runs_and_leaves_nothing(tmp_path: Path) -> None:
    control, marker, thread, result = _held_run(tmp_path, None)
    control.admit(False)
    thread.join(10)
    assert isinstance(result[0], NotAdmitted), result
    assert not marker.exists(), "a task that was not admitted ran"
    assert living(str(marker)) == [], "the shell waiting at the gate was left running"


def test_argv_command_is_forked_only_once_admitted(tmp_path: Path) -> None:
    marker = tmp_path / "argv-ran"
    task = ShellTask(id="gate-argv", command=("/usr/bin/touch", str(marker)), timeout=30)
    control = Control.for_timeout(30)
    control.hold()
    thread = threading.Thread(target=_run, args=(task, control), daemon=True)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive() and not marker.exists() and living(str(marker)) == []
    control.admit()
    thread.join(10)
    assert marker.exists()


def test_spawn_failure_waits_for_admission_too(tmp_path: Path) -> None:
    control = Control.for_timeout(30)
    control.hold()
    control.admit(False)
    with pytest.raises(NotAdmitted):
        _run(ShellTask(id="gate-cwd", command="true", timeout=30, cwd="/no/such/dir"),
             control)
