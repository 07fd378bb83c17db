"""The facts directory (`--facts-dir`, /etc/edgerun/facts.d): custom facts and labels.

Read at start and at every facts check of the agent (every 5 s), on the agent's
main thread, never on the MQTT or dispatcher thread:

- `*.json` files: each one JSON object, merged as it is into `facts.custom`
  in name order (a later file's top-level key wins);
- other executable files: run all at once, each printing one JSON object on
  stdout, merged the same way. Together they get `timeout` seconds per check;
  whatever still runs then, or prints more than MAX_SOURCE_BYTES, is killed
  with its process group;
- a top-level `labels` object in either sets labels (edgerun.agent.labels: the
  lowest layer, below the agent's configuration), and is not repeated in
  `custom`.

Everything is bounded: MAX_ENTRIES entries, MAX_SOURCE_BYTES per file or
output (larger ones are not read), MAX_CUSTOM_BYTES of custom facts in all. A
source that is too large, not a JSON object, fails or hangs contributes
nothing that round; the problem is logged once when it appears (and once when
it clears), and the agent carries on. Names starting with `.` or ending with
`~` are skipped, as are files neither `.json` nor executable.

Executables are started with os.posix_spawn and read with select.poll: the
idle agent imports no subprocess module for them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgerun.protocol import canonical_json

from . import contain
from .labels import LabelLayer, merge, parse_table

log = logging.getLogger(__name__)

MAX_ENTRIES = 64
MAX_SOURCE_BYTES = 32 * 1024
MAX_CUSTOM_BYTES = 64 * 1024
STDERR_KEPT = 512  # the tail of an executable's stderr, quoted when it fails
_REAP_S = 1.0  # how long a killed executable may take to be reaped before the next check


@dataclass(frozen=True)
class Found:
    """One read of the directory: custom facts, its labels, and what was wrong."""

    custom: dict[str, Any] = field(default_factory=dict)
    labels: LabelLayer = field(default_factory=lambda: LabelLayer("facts directory"))
    problems: dict[str, str] = field(default_factory=dict)  # source -> problem


def parse(data: bytes) -> tuple[dict[str, Any] | None, int, str | None]:
    """(the object, its canonical size, None) or (None, 0, why not)."""
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        return None, 0, "not JSON: nested too deeply"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        return None, 0, f"not JSON: {_one_line(str(exc))}"
    if not isinstance(obj, dict):
        return None, 0, f"must be one JSON object, not {type(obj).__name__}"
    try:
        size = len(canonical_json(obj))
    except (ValueError, TypeError, RecursionError) as exc:  # a lone surrogate, say
        return None, 0, f"cannot be sent: {_one_line(str(exc))}"
    return obj, size, None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def read_file(path: str) -> tuple[bytes | None, str | None]:
    """At most MAX_SOURCE_BYTES of a regular file; a FIFO or device is refused without
    blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return None, f"cannot open: {exc.strerror}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file"
        if info.st_size > MAX_SOURCE_BYTES:
            return None, f"{info.st_size} bytes; the limit is {MAX_SOURCE_BYTES}"
        chunks, size = [], 0
        while size <= MAX_SOURCE_BYTES:
            chunk = os.read(fd, MAX_SOURCE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_SOURCE_BYTES:  # it grew while read
            return None, f"more than {MAX_SOURCE_BYTES} bytes"
        return b"".join(chunks), None
    except OSError as exc:
        return None, f"cannot read: {exc.strerror}"
    finally:
        os.close(fd)


class _Run:
    """One executable of a check (a plain class: no dataclass to build at start)."""

    __slots__ = ("fds", "name", "pid", "pidfd", "problem", "status", "stdout")

    def __init__(self, name: str, pid: int, fds: dict[int, bytearray], stdout: int) -> None:
        self.name, self.pid, self.stdout = name, pid, stdout
        self.fds = fds  # stdout, stderr -> what came so far
        self.pidfd: int | None = None
        self.status: int | None = None
        self.problem: str | None = None


def _spawn(path: str, env: dict[str, str]) -> tuple[int, int, int]:
    """Start `path` in a session of its own; (pid, stdout read end, stderr read end)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                   (os.POSIX_SPAWN_DUP2, err_w, 2)]
        # registered with the task containment, so that its reaping of orphans leaves
        # this child to us (we want its exit status)
        pid = contain.own_child(lambda: os.posix_spawn(path, [path], env,
                                                       file_actions=actions, setsid=True))
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w, null):
            os.close(fd)
    return pid, out_r, err_r


class Runner:
    """Runs the executables of one check together, bounded in time and output."""

    def __init__(self, stopping: threading.Event | None = None) -> None:
        self.stopping = stopping or threading.Event()
        self.unreaped: set[int] = set()  # killed, not yet collected (tried again next time)

    def run(self, paths: Sequence[tuple[str, str]], timeout: float) -> dict[str, bytes | str]:
        """name -> its stdout (it exited 0) or a problem (str)."""
        self._reap_leftovers()
        # with this marker, what an executable leaves running is never taken for a task's
        # (contain.Containment.members)
        env = {**os.environ, contain.MARKER: contain.OWN_CHILD}
        runs: list[_Run] = []
        out: dict[str, bytes | str] = {}
        for name, path in paths:
            try:
                pid, stdout, stderr = _spawn(path, env)
            except OSError as exc:
                out[name] = f"cannot run: {exc.strerror}"
                continue
            run = _Run(name, pid, {stdout: bytearray(), stderr: bytearray()}, stdout)
            try:
                run.pidfd = os.pidfd_open(pid)
            except (OSError, AttributeError):
                run.pidfd = None
            runs.append(run)
        try:
            self._wait(runs, time.monotonic() + timeout, timeout)
        finally:
            for run in runs:
                self._finish(run)
        for run in runs:
            if run.problem is not None:
                out[run.name] = run.problem
            elif run.status != 0:
                out[run.name] = self._failed(run)
            else:
                out[run.name] = bytes(run.fds[run.stdout])
        return out

    def _wait(self, runs: list[_Run], deadline: float, timeout: float) -> None:
        poller = select.poll()
        owner: dict[int, _Run] = {}
        for run in runs:
            for fd in run.fds:
                poller.register(fd, select.POLLIN)
                owner[fd] = run
            if run.pidfd is not None:
                poller.register(run.pidfd, select.POLLIN)
                owner[run.pidfd] = run
        while owner:
            left = deadline - time.monotonic()
            if left <= 0 or self.stopping.is_set():
                reason = "the agent is stopping" if self.stopping.is_set() else \
                    f"did not finish within {timeout:g} s"
                for run in {id(r): r for r in owner.values()}.values():
                    run.problem = run.problem or f"{reason}; killed"
                return
            for fd, _events in poller.poll(min(left, 0.25) * 1000):
                if fd not in owner:
                    continue
                run = owner[fd]
                if fd == run.pidfd:
                    # it exited: what it wrote is in the pipes; a child it left holding
                    # them open does not keep us waiting
                    self._drain(run)
                    for done in (*run.fds, fd):
                        if done in owner:
                            poller.unregister(done)
                            del owner[done]
                    continue
                data = os.read(fd, 65536)
                kept = run.fds[fd]
                if not data:
                    poller.unregister(fd)
                    del owner[fd]
                    continue
                if fd == run.stdout:
                    kept += data
                    if len(kept) > MAX_SOURCE_BYTES:
                        run.problem = f"printed more than {MAX_SOURCE_BYTES} bytes; killed"
                        for done in [f for f, r in owner.items() if r is run]:
                            poller.unregister(done)
                            del owner[done]
                else:
                    kept += data
                    del kept[:-STDERR_KEPT]

    @staticmethod
    def _drain(run: _Run) -> None:
        for fd, kept in run.fds.items():
            os.set_blocking(fd, False)
            while True:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not data:
                    break
                if fd == run.stdout:
                    kept += data
                    if len(kept) > MAX_SOURCE_BYTES:
                        run.problem = f"printed more than {MAX_SOURCE_BYTES} bytes; killed"
                        break
                else:
                    kept += data
                    del kept[:-STDERR_KEPT]

    def _finish(self, run: _Run) -> None:
        """Kill what is left of its process group, collect its status, close its fds."""
        _killpg(run.pid)
        for fd in [*run.fds, *([run.pidfd] if run.pidfd is not None else [])]:
            os.close(fd)
        run.status = self._collect(run.pid)
        if run.status is None:
            self.unreaped.add(run.pid)
            run.problem = run.problem or "could not be collected after it was killed"

    def _collect(self, pid: int, wait_s: float = _REAP_S) -> int | None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                contain.forget_child(pid)
                return -1
            if done:
                contain.forget_child(pid)
                _reap_group(pid)
                return status
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    def _reap_leftovers(self) -> None:
        for pid in list(self.unreaped):
            if self._collect(pid, 0) is not None:
                self.unreaped.discard(pid)

    @staticmethod
    def _failed(run: _Run) -> str:
        status = run.status if run.status is not None else -1
        if status < 0:
            what = "ended, its exit status unknown"
        elif os.WIFSIGNALED(status):
            what = f"was killed by signal {os.WTERMSIG(status)}"
        else:
            what = f"exited with status {os.waitstatus_to_exitcode(status)}"
        tail = bytes(run.fds[next(fd for fd in run.fds if fd != run.stdout)])
        said = _one_line(tail.decode("utf-8", "replace").strip().rsplit("\n", 1)[-1])
        return f"{what}{': ' + said if said else ''}"


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.EPERM):
            raise


def _reap_group(pgid: int) -> None:
    """Members of its process group reparented to the agent (a child subreaper)."""
    while True:
        try:
            done, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        if not done:
            return


def scan(directory: str) -> tuple[list[tuple[str, str, bool]], dict[str, str]]:
    """([(name, path, executable)] in name order, problems)."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return [], {}
    except OSError as exc:
        return [], {directory: f"cannot list: {exc.strerror}"}
    found: list[tuple[str, str, bool]] = []
    problems: dict[str, str] = {}
    for entry in entries:
        name = entry.name
        if name.startswith(".") or name.endswith("~"):
            continue
        if name.endswith(".json"):
            found.append((name, entry.path, False))
            continue
        try:
            runnable = entry.is_file() and os.access(entry.path, os.X_OK)
        except OSError:
            runnable = False
        if runnable:
            found.append((name, entry.path, True))
    if len(found) > MAX_ENTRIES:
        problems[directory] = f"{len(found)} entries; read the first {MAX_ENTRIES} by name"
        found = found[:MAX_ENTRIES]
    return found, problems


def read_dir(directory: str, timeout: float, runner: Runner) -> Found:
    entries, problems = scan(directory)
    raw: dict[str, bytes | str] = {}
    for name, path, executable in entries:
        if not executable:
            data, problem = read_file(path)
            raw[name] = data if data is not None else problem or "unreadable"
    ran = runner.run([(n, p) for n, p, x in entries if x], timeout)
    custom: dict[str, Any] = {}
    labels: list[tuple[str, str]] = []
    total = 0
    for name, _path, _x in entries:
        source = f"{os.path.join(directory, name)}"
        got = raw.get(name, ran.get(name, "not read"))
        if isinstance(got, str):
            problems[source] = got
            continue
        obj, size, problem = parse(got)
        if obj is None:
            problems[source] = problem or "unreadable"
            continue
        if total + size > MAX_CUSTOM_BYTES:
            problems[source] = f"left out: custom facts would exceed {MAX_CUSTOM_BYTES} bytes"
            continue
        total += size
        if "labels" in obj:
            layer = parse_table(obj.pop("labels"), f"{source}: labels")
            labels.extend(layer.labels)
            for text in layer.problems:
                problems[text] = text  # it names its source
        custom.update(obj)
    return Found(custom, LabelLayer("facts directory", tuple(labels)), problems)


class OperatorFacts:
    """What the operator sets rather than the agent discovers: `labels` (configured
    layers over those of the facts directory) and `custom`; problems are logged when
    they appear or change, and once when they clear."""

    def __init__(self, layers: Sequence[LabelLayer], directory: str | None, timeout: float,
                 stopping: threading.Event | None = None) -> None:
        self.layers, self.directory, self.timeout = tuple(layers), directory, timeout
        self.runner = Runner(stopping)
        self._logged: dict[str, str] = {}

    def read(self) -> dict[str, Any]:
        """{"labels": ..., "custom": ...}, each left out when empty."""
        found = read_dir(self.directory, self.timeout, self.runner) if self.directory \
            else Found()
        labels = merge([found.labels, *self.layers])
        problems = dict(found.problems)
        for text in labels.problems:
            problems[text] = text
        self._log(problems)
        out: dict[str, Any] = {}
        if labels.labels:
            out["labels"] = labels.labels
        if found.custom:
            out["custom"] = found.custom
        return out

    def _log(self, problems: dict[str, str]) -> None:
        for key, text in problems.items():
            if self._logged.get(key) != text:
                log.warning("%s", text if key == text else f"facts: {key}: {text}")
        for key in self._logged.keys() - problems.keys():
            if key != self._logged[key]:
                log.info("facts: %s: read again without problems", key)
        self._logged = problems
