"""A string command runs as `/bin/sh -c COMMAND`, exactly.

Each command is run by the agent's shell runner and by `sh -c` itself and must give
the same exit status, stdout and stderr: the same $0 and arguments, stdin, variables,
traps, exec, and the same words in a syntax error. Real processes, no broker.
"""

from __future__ import annotations

import subprocess

import pytest

from edgerun.agent.outcome import Control, Outcome
from edgerun.agent.shell import run_shell
from edgerun.protocol import ShellTask, State

# (command, stdin)
SAME_AS_SH_C = [
    ('echo "$0 $# [$*]"', None),                 # $0 is sh, no arguments
    ("cat", None),                                 # no task stdin: EOF at once
    ("cat", "line 1\nline 2"),                    # the task's stdin, all of it
    ("read -r a; read -r b; echo \"$b/$a\"", "x\ny\n"),
    ("exit 7", None),
    ("shift", None),                               # nothing to shift, as with sh -c
    ('trap "echo bye" EXIT; echo hi', None),
    ("exec echo replaced", None),
    ('echo "[${EDGERUN_GO-unset}]"', None),       # no variable of the runner's own
    ("echo out; echo err >&2; exit 3", None),
    ("set -e; false; echo never", None),
    ('x=1; f() { echo "$x$1"; }; f 2', None),
    ("printf '%s' \"$1\"", None),
    ("ls /no/such/path", None),
    ("", None),
    ("#!/bin/sh only a comment", None),
    ("if", None),                                  # syntax errors, word for word
    ("echo (", None),
    ("echo ok; fi", None),
]


def _run(task: ShellTask) -> Outcome:
    return run_shell(task, Control.for_timeout(30), lambda stream, data: None)


@pytest.mark.parametrize(("command", "stdin"), SAME_AS_SH_C)
def test_a_string_command_behaves_as_sh_c(command: str, stdin: str | None) -> None:
    outcome = _run(ShellTask(id="same", command=command, timeout=30, stdin=stdin,
                             ok_codes=tuple(range(256))))
    plain = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                           input=stdin if stdin is not None else None,
                           stdin=subprocess.DEVNULL if stdin is None else None)
    assert outcome.state == State.SUCCEEDED, outcome
    assert (outcome.fields["exit_code"], outcome.fields["stdout"], outcome.fields["stderr"]) \
        == (plain.returncode, plain.stdout, plain.stderr)


def test_a_syntax_error_fails_the_task_with_sh_c_words() -> None:
    outcome = _run(ShellTask(id="syntax", command="if", timeout=30))
    plain = subprocess.run(["/bin/sh", "-c", "if"], capture_output=True, text=True)
    assert outcome.state == State.FAILED and outcome.fields["exit_code"] == 2
    assert outcome.fields["stderr"] == plain.stderr and "eval" not in plain.stderr
