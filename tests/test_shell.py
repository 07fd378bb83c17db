"""The shell runner with real processes (no broker involved)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from edgerun.agent.outcome import Control
from edgerun.agent.shell import CHUNK, TAIL, run_shell
from edgerun.protocol import ShellTask, State

from .brokers import wait_until


def run(command: str | tuple[str, ...], timeout: float = 30, control: Control | None = None,
        **kw: object) -> tuple[object, list[tuple[str, str]]]:
    chunks: list[tuple[str, str]] = []
    task = ShellTask(id="t", command=command, timeout=timeout, **kw)  # type: ignore[arg-type]
    ctl = control or Control.for_timeout(timeout)
    outcome = run_shell(task, ctl, lambda stream, data: chunks.append((stream, data)))
    return outcome, chunks


def test_success_with_env_cwd_stdin(tmp_path: Path) -> None:
    outcome, chunks = run("cat; echo $GREETING; pwd", env={"GREETING": "hello"},
                          cwd=str(tmp_path), stdin="from stdin\n")
    assert outcome.state == State.SUCCEEDED
    assert outcome.fields["stdout"] == f"from stdin\nhello\n{tmp_path}\n"
    assert outcome.fields["exit_code"] == 0 and outcome.fields["truncated"] is False
    assert "".join(d for s, d in chunks if s == "stdout") == outcome.fields["stdout"]


def test_argv_runs_without_a_shell() -> None:
    outcome, _ = run(("/bin/echo", "$HOME", "a;b"))
    assert outcome.fields["stdout"] == "$HOME a;b\n"


def test_exit_code_outside_ok_codes_fails_inside_succeeds() -> None:
    failed, _ = run("exit 3")
    assert failed.state == State.FAILED and failed.fields["error"].code == "exit_status"
    assert failed.fields["exit_code"] == 3
    ok, _ = run("exit 3", ok_codes=(0, 3))
    assert ok.state == State.SUCCEEDED


def test_spawn_failures() -> None:
    missing, _ = run(("/no/such/binary",))
    assert missing.state == State.FAILED and missing.fields["error"].code == "spawn_failed"
    bad_cwd, _ = run("true", cwd="/no/such/dir")
    assert bad_cwd.fields["error"].code == "spawn_failed"
    assert "/no/such/dir" in bad_cwd.fields["error"].message


def test_large_output_keeps_the_last_64k_and_chunks_at_16k() -> None:
    outcome, chunks = run("head -c 300000 /dev/zero | tr '\\0' a; echo END")
    assert outcome.fields["truncated"] is True
    stdout = outcome.fields["stdout"]
    assert len(stdout) == TAIL and stdout.endswith("aEND\n")
    assert all(len(d.encode()) <= CHUNK for _, d in chunks)
    assert sum(len(d) for _, d in chunks) == 300004


def test_utf8_split_across_chunks_is_not_mangled() -> None:
    outcome, chunks = run("for i in $(seq 5000); do printf 'é'; done")
    text = "".join(d for _, d in chunks)
    assert text == "é" * 5000 and "\ufffd" not in outcome.fields["stdout"]


def test_timeout_kills_the_whole_group_and_leaves_no_orphans(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    outcome, _ = run(f"sleep 60 & echo $! > {pidfile}; wait", timeout=0.5)
    assert outcome.state == State.TIMED_OUT and outcome.fields["error"].code == "timeout"
    child = int(pidfile.read_text())
    assert wait_until(lambda: not _alive(child), 5)


def test_background_child_is_killed_when_main_process_exits(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    outcome, _ = run(f"sleep 60 & echo $! > {pidfile}; echo main done")
    assert outcome.state == State.SUCCEEDED and outcome.fields["stdout"] == "main done\n"
    assert wait_until(lambda: not _alive(int(pidfile.read_text())), 5)


def test_term_ignoring_command_is_killed_after_grace() -> None:
    outcome, _ = run("trap '' TERM; sleep 30", timeout=0.3)
    assert outcome.state == State.TIMED_OUT


def test_cancel_while_running() -> None:
    control = Control.for_timeout(60)
    threading.Timer(0.3, control.stop, args=("canceled by test",)).start()
    started = time.monotonic()
    outcome, _ = run("sleep 30", control=control)
    assert outcome.state == State.CANCELED
    assert outcome.fields["error"].message == "canceled by test"
    assert time.monotonic() - started < 30


def test_live_output_arrives_while_running() -> None:
    seen = threading.Event()
    control = Control.for_timeout(60)

    def emit(stream: str, data: str) -> None:
        if "first" in data:
            seen.set()
    worker = threading.Thread(target=run_shell, args=(
        ShellTask(id="t", command="echo first; sleep 2; echo second"), control, emit))
    worker.start()
    assert seen.wait(1.8), "output was not sent before the command finished"
    worker.join()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False
