"""Nothing a task starts outlives it: a cgroup v2 per task, else a subreaper and /proc.

The agent makes itself a child subreaper (prctl), so a process that leaves its
task's session or double-forks is reparented to the agent, not to init. Where
a cgroup v2 hierarchy is writable, every task gets a cgroup of its own, and the
command is born inside it (no window in which it could fork before being moved):

- threaded (the usual case): at start the agent's process moves once into
  `<agent's cgroup>/edgerun`, the root of a threaded subtree; each task's cgroup
  `edgerun/edgerun-<key>/t-<task id>` is a threaded cgroup in it. For the instant
  of the fork the spawning *thread* moves itself there (writing 0 to
  `cgroup.threads`) and back. A thread moving itself skips the kernel's
  cgroup_threadgroup_rwsem, whose write side waits for an RCU grace period
  whenever no migration happened lately (measured: 11 ms for a process moving
  after a pause, 0.04 ms for a thread moving itself), and no other thread of the
  agent is held up. Threaded cgroups have no `cgroup.kill`: a task is frozen
  (`cgroup.freeze`, so nothing in it forks any more) and each process killed.
- whole process (kernels or hierarchies without threaded cgroups): the task's
  cgroup is `<agent's cgroup>/edgerun-<key>/t-<task id>`; the whole agent process
  moves into it for the fork and back; a task is killed with `cgroup.kill`.

Without cgroups (or as a second net) every process of a task carries
`EDGERUN_TASK=<key>/<task id>` in its environment; the agent finds the task's
processes by walking /proc: the command's descendants, and the agent's own
orphaned children that carry the marker.

After a kill -9 of the agent the task's processes live on (in their cgroup, or
under init); the restarted agent, with the same node and state directory and so
the same key, finds them by cgroup and by marker and ends them before it
reports the task failed (`sweep`).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from ._lean import sha256_hex

log = logging.getLogger(__name__)

MARKER = "EDGERUN_TASK"
PR_SET_CHILD_SUBREAPER = 36
_T = TypeVar("_T")
# Process-wide, not per agent: a cgroup move is of the whole process, and one process
# may hold several agents (tests/agent_pool.py) whose reaps must spare each other's children.
_LOCK = threading.Lock()
_KNOWN: dict[int, str] = {}  # pids of commands a worker waits for -> marker
_SPAWNING = [0]  # forks under way whose pid is not in _KNOWN yet (reap() waits for them)
OWN_CHILD = "edgerun-agent"  # the marker of own_child()'s children: no task's
THREAD_ROOT = "edgerun"  # the threaded subtree's root, in the agent's own cgroup
_ROOT: list[str | None] = []  # this process's thread root, once tried (empty: not yet)


def make_key(node: str, state_dir: str | None) -> str:
    """Names this agent's cgroups and markers: the same after a restart, distinct per
    state directory (two agents for one node id on one host do not touch each other)."""
    place = os.path.abspath(state_dir) if state_dir else ""
    return f"{node}-{sha256_hex(place.encode())[:10]}"


def cgroup_base() -> str | None:
    """The agent's own cgroup v2 directory if it is writable, else None."""
    mount = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                head, _, tail = line.partition(" - ")
                if tail.split(" ", 1)[0] == "cgroup2":
                    mount = head.split(" ")[4]
                    break
        if mount is None:
            return None
        own = None
        with open("/proc/self/cgroup", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("0::"):
                    own = line[3:].strip()
        if own is None:
            return None
    except OSError:
        return None
    path = os.path.normpath(mount + "/" + own.lstrip("/"))
    if not os.path.exists(os.path.join(path, "cgroup.procs")) or not os.access(path, os.W_OK):
        return None
    return path


def set_subreaper() -> bool:
    """Make this process the reaper of every orphan below it (Linux >= 3.4)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


@dataclass
class Jail:
    """One task's processes: the command's pid and its cgroup, if any."""

    task_id: str
    pid: int = 0
    cgroup: str | None = None
    ended: bool = False


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _make_threaded(path: str) -> None:
    """Create `path` as a threaded cgroup (a new child in a threaded subtree starts as
    `domain invalid`; making a threaded cgroup threaded again is a no-op)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    _write(os.path.join(path, "cgroup.type"), b"threaded")


def _thread_root(base: str, key_dir: str) -> str | None:
    """Make `key_dir` (under `base`/edgerun) a threaded cgroup and move this process into
    that thread root, once per process (agents sharing a process share it); None where
    the hierarchy has no threaded cgroups or refuses them."""
    with _LOCK:
        if not _ROOT:
            root = base if os.path.basename(base) == THREAD_ROOT else \
                os.path.join(base, THREAD_ROOT)
            made = not os.path.isdir(root)
            try:
                os.makedirs(root, exist_ok=True)
                _make_threaded(key_dir)  # before the move: a refusal leaves nothing behind
                if root != base:
                    _write(os.path.join(root, "cgroup.procs"), str(os.getpid()).encode())
                _ROOT.append(root)
            except OSError as exc:
                log.info("no threaded cgroups in %s (%s); the agent moves as a whole for "
                         "each fork", base, exc.strerror)
                _ROOT.append(None)
                for path in (key_dir, root) if made else (key_dir,):
                    try:
                        os.rmdir(path)
                    except OSError:
                        pass
        found = _ROOT[0]
    if found is not None and os.path.dirname(key_dir) == found:
        _make_threaded(key_dir)
        return found
    return None


def _tgid(tid: int) -> int:
    """The process of a thread (threaded cgroups list threads); the tid when it is gone."""
    try:
        for line in _read(f"/proc/{tid}/status").splitlines():
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return tid


def _stat(pid: int) -> tuple[int, bytes] | None:
    """(parent pid, state letter) of a process, or None when it is gone."""
    try:
        rest = _read(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()
        return int(rest[1]), rest[0]
    except (OSError, IndexError, ValueError):
        return None


def _pids() -> Iterator[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)


def _marker_of(pid: int) -> str | None:
    try:
        env = _read(f"/proc/{pid}/environ")
    except OSError:
        return None
    needle = MARKER.encode() + b"="
    for item in env.split(b"\0"):
        if item.startswith(needle):
            return item[len(needle):].decode("utf-8", "replace")
    return None


def _dead(pid: int) -> bool:
    found = _stat(pid)
    return found is None or found[1] in (b"Z", b"X")


class Containment:
    """The agent's view of every process its tasks started (thread-safe)."""

    def __init__(self, key: str, *, cgroups: bool = True, subreaper: bool = True) -> None:
        self.key = key
        self.me = os.getpid()
        self._lock = _LOCK
        self._known = _KNOWN
        self._empty: list[str] = []  # cgroups of ended tasks, to remove
        self.subreaper = set_subreaper() if subreaper else False
        self.cgroup_dir: str | None = None
        self._home: str | None = None
        self.threaded = False  # the spawning thread, not the process, moves for a fork
        self._legacy: str | None = None  # where a whole-process agent kept its task cgroups
        base = cgroup_base() if cgroups else None
        if base is not None:
            self._setup(base, key)
        self._can_kill = bool(self.cgroup_dir) and not self.threaded and os.path.exists(
            os.path.join(self.cgroup_dir or "", "cgroup.kill"))

    def _setup(self, base: str, key: str) -> None:
        name = f"edgerun-{key}"
        top = os.path.dirname(base) if os.path.basename(base) == THREAD_ROOT else base
        threaded = os.path.join(top, THREAD_ROOT, name)
        try:
            root = _thread_root(base, threaded)
        except OSError as exc:
            log.info("cannot create the cgroup %s (%s)", threaded, exc.strerror)
            root = None
        if root is not None:
            self.cgroup_dir, self._home, self.threaded = threaded, root, True
            legacy = os.path.join(top, name)
            self._legacy = legacy if os.path.isdir(legacy) else None
            return
        path = os.path.join(base, name)
        try:
            os.makedirs(path, exist_ok=True)
            self.cgroup_dir, self._home = path, base
        except OSError as exc:
            log.info("cannot create the cgroup %s (%s); tasks are tracked through /proc",
                     path, exc.strerror)

    @property
    def mode(self) -> str:
        if self.cgroup_dir:
            return "cgroup v2 (threaded)" if self.threaded else "cgroup v2"
        return "subreaper + /proc" if self.subreaper else "/proc"

    def env(self, task_id: str) -> dict[str, str]:
        return {MARKER: f"{self.key}/{task_id}"}

    # --- spawning -----------------------------------------------------------------
    def spawn(self, task_id: str, start: Callable[[], _T], pid_of: Callable[[_T], int]) -> \
            tuple[_T, Jail]:
        """Run `start` (which forks the command) so that the child is born in the task's
        cgroup; returns what it returned and the task's Jail."""
        if self.threaded:
            return self._spawn_threaded(task_id, start, pid_of)
        jail = Jail(task_id)
        with self._lock:
            if self.cgroup_dir is not None and self._home is not None:
                path = os.path.join(self.cgroup_dir, f"t-{task_id}")
                try:
                    os.makedirs(path, exist_ok=True)
                    _write(os.path.join(path, "cgroup.procs"), str(self.me).encode())
                    jail.cgroup = path
                except OSError as exc:
                    log.warning("task %s: cannot use the cgroup %s (%s); tracking it "
                                "through /proc", task_id, path, exc.strerror)
            try:
                result = start()
            except BaseException:
                if jail.cgroup is not None:
                    self._go_home()
                    self._empty.append(jail.cgroup)  # removed by tidy()
                raise
            if jail.cgroup is not None:
                self._go_home()
            jail.pid = pid_of(result)
            self._known[jail.pid] = f"{self.key}/{task_id}"
        return result, jail

    def _spawn_threaded(self, task_id: str, start: Callable[[], _T],
                        pid_of: Callable[[_T], int]) -> tuple[_T, Jail]:
        """The calling thread alone moves into the task's cgroup for the fork: no lock
        shared with other workers, no wait for the kernel's threadgroup rwsem."""
        jail = Jail(task_id)
        if self.cgroup_dir is not None:
            path = os.path.join(self.cgroup_dir, f"t-{task_id}")
            try:
                _make_threaded(path)
                _write(os.path.join(path, "cgroup.threads"), b"0")
                jail.cgroup = path
            except OSError as exc:
                log.warning("task %s: cannot use the cgroup %s (%s); tracking it "
                            "through /proc", task_id, path, exc.strerror)
        with self._lock:
            _SPAWNING[0] += 1
        try:
            try:
                result = start()
            finally:
                if jail.cgroup is not None:
                    self._go_home()
        except BaseException:
            with self._lock:
                _SPAWNING[0] -= 1
                if jail.cgroup is not None:
                    self._empty.append(jail.cgroup)  # removed by tidy()
            raise
        jail.pid = pid_of(result)
        with self._lock:
            self._known[jail.pid] = f"{self.key}/{task_id}"
            _SPAWNING[0] -= 1
        return result, jail

    def _go_home(self) -> None:
        assert self._home is not None
        try:
            if self.threaded:
                _write(os.path.join(self._home, "cgroup.threads"), b"0")
            else:
                _write(os.path.join(self._home, "cgroup.procs"), str(self.me).encode())
        except OSError as exc:  # never kill a cgroup the agent may still be in
            log.error("cannot move the agent back to its cgroup (%s); per-task cgroups are "
                      "off from now on", exc.strerror)
            self.cgroup_dir = None
            self.threaded = False

    # --- finding and signalling a task's processes ------------------------------------
    def _table(self) -> dict[int, int]:
        """pid -> parent pid of every living process (one pass over /proc)."""
        table = {}
        for pid in _pids():
            found = _stat(pid)
            if found is not None and found[1] not in (b"Z", b"X"):
                table[pid] = found[0]
        return table

    def members(self, jail: Jail) -> set[int]:
        """Living processes of the task: its cgroup, the command's descendants and the
        agent's orphans that carry the task's marker (or no marker, when it is the only
        task running)."""
        found: set[int] = set()
        if jail.cgroup is not None:
            for pid in self._cgroup_pids(jail.cgroup):
                if pid != self.me:
                    found.add(pid)
        table = self._table()
        mark = f"{self.key}/{jail.task_id}"
        with self._lock:
            others = {t for t in self._known.values() if t not in (mark, OWN_CHILD)}
            known = set(self._known)
        roots = {jail.pid} if jail.pid in table else set()
        for pid, parent in table.items():
            if parent == self.me and pid not in known:
                marker = _marker_of(pid)
                if marker == mark or (marker is None and not others):
                    roots.add(pid)
        children: dict[int, list[int]] = {}
        for pid, parent in table.items():
            children.setdefault(parent, []).append(pid)
        stack = list(roots)
        while stack:
            pid = stack.pop()
            if pid in found and pid not in roots:
                continue
            found.add(pid)
            stack.extend(c for c in children.get(pid, ()) if c not in found)
        found.discard(self.me)
        return found

    def _cgroup_pids(self, path: str) -> set[int]:
        pids: set[int] = set()
        for here, _dirs, _files in os.walk(path):
            try:
                pids.update(int(p) for p in _read(os.path.join(here, "cgroup.procs")).split())
                continue
            except ValueError:
                continue
            except OSError as exc:  # a threaded cgroup lists threads only
                if exc.errno != errno.EOPNOTSUPP:
                    continue
            try:
                pids.update(_tgid(int(t)) for t in
                            _read(os.path.join(here, "cgroup.threads")).split())
            except (OSError, ValueError):
                pass
        return pids

    def _freeze(self, path: str) -> None:
        """Stop every process of a threaded task cgroup (none forks any more); SIGKILL
        still ends a frozen process. Never the cgroup a thread of the agent is in."""
        try:
            _write(os.path.join(path, "cgroup.freeze"), b"1")
        except OSError:
            pass

    def _populated(self, path: str) -> bool:
        try:
            return b"populated 1" in _read(os.path.join(path, "cgroup.events"))
        except OSError:
            return False

    def signal(self, jail: Jail, sig: int) -> int:
        """Send `sig` to every process of the task; returns how many were signalled."""
        _killpg(jail.pid, sig)
        if sig == signal.SIGKILL and jail.cgroup is not None and self._can_kill:
            try:
                _write(os.path.join(jail.cgroup, "cgroup.kill"), b"1")
            except OSError:
                pass
        pids = self.members(jail)
        for pid in pids:
            _kill(pid, sig)
        return len(pids)

    def end(self, jail: Jail) -> int:
        """The command is over: kill whatever of the task is left, reap it, drop the cgroup.

        Fast when nothing is left: with a cgroup, one read of `cgroup.events`."""
        if jail.ended:
            return 0
        jail.ended = True
        killed = 0
        # born in its cgroup, a task leaves it only by writing to cgroup files itself
        if jail.cgroup is None or self._populated(jail.cgroup):
            killed = self._kill_all(jail)
        with self._lock:
            self._known.pop(jail.pid, None)
        if killed:
            self.reap()
        if jail.cgroup is not None:  # removed by tidy(), off the path to the final update
            with self._lock:
                self._empty.append(jail.cgroup)
        return killed

    def tidy(self) -> None:
        """Remove the cgroups of ended tasks; one that the kernel still holds for a moment
        is tried again next time."""
        with self._lock:
            empty, self._empty = self._empty, []
        for path in empty:
            if not _rmdir_now(path):
                with self._lock:
                    self._empty.append(path)

    def _kill_all(self, jail: Jail) -> int:
        total = 0
        if jail.cgroup is not None and self.threaded:
            self._freeze(jail.cgroup)  # no cgroup.kill here: nothing may fork meanwhile
        for _ in range(100):  # a fork storm can refill between passes; cgroup.kill cannot
            count = self.signal(jail, signal.SIGKILL)
            total += count
            if not count and not (jail.cgroup and self._populated(jail.cgroup)):
                break
            time.sleep(0.01)
        return total

    def reap(self) -> None:
        """Collect exit statuses of orphans that died (zombies reparented to the agent)."""
        with self._lock:  # the whole pass: a command forked meanwhile is not an orphan
            if _SPAWNING[0]:
                return  # its pid is not known yet; the next reap collects the orphans
            known = set(self._known)
            for pid in _pids():
                found = _stat(pid)
                if found is not None and found[0] == self.me and pid not in known \
                        and found[1] in (b"Z", b"X"):
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass

    # --- after a restart -----------------------------------------------------------
    def _task_cgroups(self) -> list[tuple[str, str]]:
        """(task id, path) of every task cgroup, where tasks live now and where an older
        agent kept them."""
        found = []
        for key_dir in (self.cgroup_dir, self._legacy):
            if key_dir is None:
                continue
            try:
                names = os.listdir(key_dir)
            except OSError:
                continue
            found += [(name[2:], os.path.join(key_dir, name)) for name in names
                      if name.startswith("t-") and os.path.isdir(os.path.join(key_dir, name))]
        return found

    def sweep(self) -> dict[str, int]:
        """Kill what tasks of an earlier run of this agent left; returns task id -> count."""
        counts: dict[str, int] = {}
        victims: list[int] = []
        for task_id, path in self._task_cgroups():
            self._freeze(path)  # cgroup.kill where there is one, else one by one
            pids = self._cgroup_pids(path) - {self.me}
            counts[task_id] = counts.get(task_id, 0) + len(pids)
            victims.extend(pids)
            try:
                _write(os.path.join(path, "cgroup.kill"), b"1")
            except OSError:
                pass
        prefix = f"{self.key}/"
        for pid in _pids():
            if pid == self.me or pid in victims:
                continue
            marker = _marker_of(pid)
            if marker is not None and marker.startswith(prefix) and not _dead(pid):
                task_id = marker[len(prefix):]
                counts[task_id] = counts.get(task_id, 0) + 1
                victims.append(pid)
        for pid in victims:
            _kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not all(_dead(p) for p in victims):
            for pid in victims:  # a fork between the listing and the kill
                _kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        self.reap()
        for _, path in self._task_cgroups():
            _rmdir_soon(path)
        if self._legacy is not None:
            _rmdir_soon(self._legacy)
            self._legacy = None
        return {task: n for task, n in counts.items() if n}

    def close(self) -> None:
        """At a clean exit: nothing of any task may be left; drop this agent's cgroup."""
        self.sweep()
        if self.cgroup_dir is not None:
            _rmdir_soon(self.cgroup_dir)


def own_child(start: Callable[[], int]) -> int:
    """Start a child its caller waits for itself, not a task's command (a facts
    executable): reap() leaves it alone until forget_child(). `start` returns its pid."""
    with _LOCK:
        pid = start()
        _KNOWN[pid] = OWN_CHILD
    return pid


def forget_child(pid: int) -> None:
    with _LOCK:
        _KNOWN.pop(pid, None)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pid: int, sig: int) -> None:
    if pid > 0:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _rmdir_now(path: str) -> bool:
    """One attempt to remove an empty cgroup; False when the kernel still holds it."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        log.warning("cannot remove the cgroup %s: %s", path, exc.strerror)
    return True


def _rmdir_soon(path: str) -> None:
    """Remove a cgroup once its last process is gone (the kernel may lag a moment)."""
    for _ in range(200):
        try:
            for here, dirs, _files in os.walk(path, topdown=False):
                for name in dirs:
                    os.rmdir(os.path.join(here, name))
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("cannot remove the cgroup %s: %s", path, exc.strerror)
                return
        time.sleep(0.005)
    log.warning("the cgroup %s is still busy; left in place", path)
