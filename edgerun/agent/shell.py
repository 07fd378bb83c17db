"""Run a shell task: one selector loop per task over its pipes, nothing left behind.

The command runs in a session (and so a process group) of its own, and in the
task's cgroup where there is one (contain.py). Timeout and cancel send SIGTERM
to every process of the task, wherever it went, and SIGKILL after `KILL_GRACE`;
when the command's main process exits, whatever the task left is killed too, so
a task never leaves processes behind.
"""

from __future__ import annotations

import codecs
import os
import select
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from typing import IO, Any

from edgerun.protocol import ErrorCode, ShellTask, State

from .contain import Containment, Jail
from .outcome import Control, Outcome, failure

CHUNK = 16 * 1024          # most bytes in one output message
TAIL = 64 * 1024           # bytes of each stream kept for the final update
FLUSH_S = 0.25             # live output goes out at least this often
KILL_GRACE = 2.0           # SIGTERM, then SIGKILL after this long
LINGER_S = 2.0             # after the main process exits, wait this long for pipes to close

# Sends one chunk of live output; returns False when it was dropped (memory budget,
# no connection), which the final update counts in `output_dropped`.
Emit = Callable[[str, str], "bool | None"]


class _Stream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.tail = bytearray()
        self.pending = bytearray()
        self.truncated = False
        self.dropped = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> None:
        self.pending += data
        self.tail += data
        if len(self.tail) > TAIL:
            del self.tail[: len(self.tail) - TAIL]
            self.truncated = True

    def drain(self, emit: Emit, final: bool = False) -> None:
        while self.pending:
            piece = bytes(self.pending[:CHUNK])
            del self.pending[:CHUNK]
            text = self.decoder.decode(piece, final=final and not self.pending)
            if text and emit(self.name, text) is False:
                self.dropped += len(piece)

    def text(self) -> str:
        data = bytes(self.tail)
        if self.truncated:  # the cut may have split a character: skip its continuation bytes
            skip = 0
            while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
                skip += 1
            data = data[skip:]
        return data.decode("utf-8", errors="replace")


_PLAIN: Containment | None = None


def _plain() -> Containment:
    """Containment for a runner used on its own (tests): no cgroup, no subreaper."""
    global _PLAIN
    if _PLAIN is None:
        _PLAIN = Containment("plain", cgroups=False, subreaper=False)
    return _PLAIN


def run_shell(task: ShellTask, control: Control, emit: Emit,
              jail: Containment | None = None,
              running: Callable[[], None] | None = None) -> Outcome:
    """Run the task's command to its end. `running` is called once the command was
    started (or failed to start), before any output is emitted: the agent publishes its
    `running` update there, while the command runs, not before the fork on its way."""
    started = time.monotonic()
    contain = jail or _plain()
    argv = ["/bin/sh", "-c", task.command] if isinstance(task.command, str) \
        else list(task.command)
    env = {**os.environ, **task.env, **contain.env(task.id)}
    try:
        proc, cell = contain.spawn(task.id, lambda: subprocess.Popen(
            argv, stdin=subprocess.PIPE if task.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=task.cwd,
            env=env, start_new_session=True, close_fds=True), lambda p: p.pid)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        if running is not None:
            running()  # accepted -> running -> failed, as for every task that was run
        text = getattr(exc, "strerror", None) or str(exc)
        where = f" in {task.cwd}" if task.cwd else ""
        return failure(ErrorCode.SPAWN_FAILED, f"cannot start {argv[0]!r}{where}: {text}",
                       duration_s=round(time.monotonic() - started, 3))
    try:
        if running is not None:
            running()
        streams, stopped = _pump(proc, task, control, emit, contain, cell)
        code = proc.wait()
    finally:
        contain.end(cell)
    fields: dict[str, Any] = {
        "exit_code": code, "stdout": streams[0].text(), "stderr": streams[1].text(),
        "truncated": streams[0].truncated or streams[1].truncated,
        "duration_s": round(time.monotonic() - started, 3),
    }
    dropped = streams[0].dropped + streams[1].dropped
    if dropped:
        fields["output_dropped"] = dropped
    if stopped == "timeout":
        return failure(ErrorCode.TIMEOUT, f"the command did not finish within "
                       f"{task.timeout:g} s; every process it started was killed",
                       state=State.TIMED_OUT, **fields)
    if stopped == "cancel":
        return failure(ErrorCode.CANCELED, control.why or "canceled", state=State.CANCELED,
                       **fields)
    if code in task.ok_codes:
        return Outcome(State.SUCCEEDED, fields)
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return failure(ErrorCode.EXIT_STATUS, f"the command {how}; success is "
                   f"{', '.join(map(str, task.ok_codes))}", **fields)


def _pump(proc: subprocess.Popen[bytes], task: ShellTask, control: Control, emit: Emit,
          contain: Containment, cell: Jail) -> tuple[tuple[_Stream, _Stream], str | None]:
    """Move bytes until both pipes close; returns the streams and why it stopped early."""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Stream("stdout"), _Stream("stderr")
    sel = selectors.DefaultSelector()
    for pipe, stream in ((proc.stdout, out), (proc.stderr, err)):
        os.set_blocking(pipe.fileno(), False)
        sel.register(pipe, selectors.EVENT_READ, stream)
    stdin_left = memoryview((task.stdin or "").encode("utf-8"))
    if proc.stdin is not None:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE, None)
    stopped: str | None = None
    kill_at = exited_at = None
    last_flush = time.monotonic()
    try:
        while sel.get_map():
            now = time.monotonic()
            if stopped is None and (control.cancel.is_set() or now >= control.deadline):
                stopped = "cancel" if control.cancel.is_set() else "timeout"
                contain.signal(cell, signal.SIGTERM)
                kill_at = now + KILL_GRACE
            if kill_at is not None and now >= kill_at:
                contain.signal(cell, signal.SIGKILL)
                kill_at = None
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                contain.end(cell)  # no orphans hold the pipes
            if exited_at is not None and now - exited_at > LINGER_S:
                break  # a process that left the group still holds a pipe
            for key, _ in sel.select(min(FLUSH_S, max(0.0, control.deadline - now) + 0.01)):
                if key.data is None:
                    stdin_left = _feed_stdin(sel, key.fileobj, stdin_left)  # type: ignore[arg-type]
                    continue
                try:
                    data = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if data:
                    key.data.feed(data)
                else:
                    sel.unregister(key.fileobj)
            if len(out.pending) >= CHUNK or len(err.pending) >= CHUNK or \
                    time.monotonic() - last_flush >= FLUSH_S:
                out.drain(emit)
                err.drain(emit)
                last_flush = time.monotonic()
    finally:
        sel.close()
        for end in (proc.stdin, proc.stdout, proc.stderr):
            if end is not None:
                end.close()
    if proc.poll() is None:  # pipes closed early but the process lives on
        stopped = _wait_or_kill(proc, control, stopped, contain, cell)
    out.drain(emit, final=True)
    err.drain(emit, final=True)
    return (out, err), stopped


def _wait_or_kill(proc: subprocess.Popen[bytes], control: Control, stopped: str | None,
                  contain: Containment, cell: Jail) -> str | None:
    """Reap the command once its pipes have closed, still honouring cancel and deadline.

    Usually it is exiting already: its pipes close a moment before it can be reaped, so
    this is the common path. A pidfd (Linux 5.3) wakes us at the exit itself;
    `Popen.wait(timeout)` polls, first after 1 ms, which cost `true` a third of its
    round trip."""
    pidfd = _pidfd(proc.pid)
    poller = select.poll()
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    try:
        while True:
            if pidfd is not None:
                poller.poll(50)
                if proc.poll() is not None:
                    break
            else:
                try:
                    proc.wait(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
            if stopped is None and (control.cancel.is_set()
                                    or time.monotonic() >= control.deadline):
                stopped = "cancel" if control.cancel.is_set() else "timeout"
                contain.signal(cell, signal.SIGKILL)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return stopped


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):  # before Linux 5.3, or the pid is gone already
        return None


def _feed_stdin(sel: selectors.BaseSelector, pipe: IO[bytes], left: memoryview) -> memoryview:
    try:
        written = os.write(pipe.fileno(), left[:65536]) if left else 0
    except BlockingIOError:
        return left
    except (BrokenPipeError, OSError):
        written, left = 0, memoryview(b"")
    left = left[written:]
    if not left:
        sel.unregister(pipe)
        pipe.close()
    return left
