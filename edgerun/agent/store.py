"""The agent's memory of task ids: at-most-once execution across deliveries and restarts.

It keeps the latest update of the last `remember` task ids (10,000 by default),
as encoded bytes to stay small. Output is kept whole for the most recent
`KEEP_OUTPUT` ids only; older entries drop `stdout`/`stderr` (marked
`truncated`), which bounds memory and disk at about 300 bytes an id.

With a writable state directory it appends to `tasks.jsonl`, fsyncing the
first record of an id before the task may run, and compacts the file when it
has grown to twice the ids it must hold.

The file is not trusted: a record that does not parse, is nested too deeply,
holds strings that cannot be encoded, or is not a task update with a valid id
and state is skipped (counted in one warning); a task log that is not a
regular file (symlink, FIFO, directory) is moved aside, never followed or read.
If the state directory vanishes or the file is replaced while the agent runs,
the next record notices it and writes the whole memory out again.

Delivery is at least once: a final update lives only in the MQTT client's
memory until the broker acknowledges it, and a kill -9 then loses it. So the
log also holds `{"delivered": [ids]}` lines: ids whose latest (final) update
the broker acknowledged. They are written lazily, batched into the next record
or `flush_marks()`, never fsynced (a lost mark only costs a harmless re-send).
At start-up `undelivered()` names the final updates without a mark, to be
published again; it keeps at most the newest `RESEND` of them.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections import OrderedDict, deque
from typing import Any

from edgerun.protocol import AGENT_STATES, FINAL_STATES, canonical_json, is_task_id

log = logging.getLogger(__name__)

KEEP_OUTPUT = 100
FILE_NAME = "tasks.jsonl"
RESEND = 1_000  # at most this many unacknowledged final updates are re-sent at start-up
MARK = "delivered"
MARKS_PER_LINE = 500
_FINAL = frozenset(FINAL_STATES)


def _slim(update: dict[str, Any]) -> dict[str, Any]:
    if "stdout" not in update and "stderr" not in update:
        return update
    slim = {k: v for k, v in update.items() if k not in ("stdout", "stderr")}
    slim["truncated"] = True
    return slim


class TaskLog:
    def __init__(self, state_dir: str | None, remember: int = 10_000) -> None:
        self.remember = max(1, remember)
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._with_output: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._path: str | None = None
        self._dir = ""
        self._fh: Any = None
        self._lines = 0
        self._failing = False
        # ids whose latest update is final and not known to be acknowledged by the broker
        self._undelivered: set[str] = set()
        # (id, wire bytes) the broker acknowledged, not yet marked; appended by the MQTT
        # network thread without a lock (deque.append is atomic)
        self._acked: deque[tuple[str, bytes]] = deque()
        if state_dir:
            self._open(state_dir)

    @property
    def persistent(self) -> bool:
        return self._fh is not None

    def _open(self, state_dir: str) -> None:
        self._dir = state_dir
        path = os.path.join(state_dir, FILE_NAME)
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            self._load(path)
        except OSError as exc:
            log.warning("cannot read the task log %s (%s); starting without it", path,
                        exc.strerror)
        try:
            self._path = path
            self._compact()
        except OSError as exc:
            log.warning("state directory %s is not usable (%s); task ids are kept in "
                        "memory only until it is", state_dir, exc.strerror)
            self._fh = None

    def _load(self, path: str) -> None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(info.st_mode):
            _move_aside(path, "it is not a regular file")
            return
        # O_NOFOLLOW and O_NONBLOCK: it may have become a symlink or a FIFO since lstat
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                _move_aside(path, "it is not a regular file")
                return
            skipped = 0
            for line in fh:
                if line.startswith(b'{"' + MARK.encode() + b'":'):
                    ids = _marks(line)
                    if ids is None:
                        skipped += 1
                    else:
                        self._undelivered.difference_update(ids)
                    continue
                entry = _trusted(line)
                if entry is None:
                    skipped += 1
                else:
                    self._put(*entry)
        if skipped:
            log.warning("task log %s: skipped %d records that could not be trusted (torn, "
                        "corrupted or not task updates)", path, skipped)

    def _put(self, task_id: str, data: bytes, final: bool) -> None:
        self._entries[task_id] = data
        self._entries.move_to_end(task_id)
        self._with_output.pop(task_id, None)
        if final:
            self._undelivered.add(task_id)
        else:
            self._undelivered.discard(task_id)
        if b'"stdout":' in data or b'"stderr":' in data:
            self._with_output[task_id] = None
            while len(self._with_output) > KEEP_OUTPUT:
                old_id, _ = self._with_output.popitem(last=False)
                self._entries[old_id] = canonical_json(_slim(json.loads(self._entries[old_id])))
        while len(self._entries) > self.remember:
            old_id, _ = self._entries.popitem(last=False)
            self._with_output.pop(old_id, None)
            self._undelivered.discard(old_id)

    def _compact(self) -> None:
        """Write every entry to a fresh file and switch appends to it."""
        assert self._path is not None
        tmp = self._path + ".tmp"
        try:
            os.unlink(tmp)  # whatever is there, a symlink included, is not followed
        except FileNotFoundError:
            pass
        self._take_marks()  # into the memory that is written out
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        delivered: list[str] = []
        with os.fdopen(fd, "wb") as out:
            for task_id, data in self._entries.items():
                update = json.loads(data)
                out.write(canonical_json(_slim(update)) + b"\n")
                if update.get("state") in _FINAL and task_id not in self._undelivered:
                    delivered.append(task_id)
            marks = _mark_lines(delivered)
            out.write(marks)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        self._fh = os.fdopen(fd, "ab")
        self._lines = len(self._entries) + marks.count(b"\n")

    def _still_there(self) -> bool:
        """Whether the open file is still the one at the path (not removed or replaced)."""
        assert self._path is not None and self._fh is not None
        try:
            here, ours = os.stat(self._path, follow_symlinks=False), os.fstat(self._fh.fileno())
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)

    def _rebuild(self) -> bool:
        """Recreate the state directory and write the whole memory out again."""
        assert self._path is not None
        try:
            os.makedirs(self._dir, mode=0o700, exist_ok=True)
            self._compact()
        except OSError as exc:
            if not self._failing:
                log.error("the task log %s is gone and cannot be written again (%s); task "
                          "ids are kept in memory and written out once it can be", self._path,
                          exc.strerror)
            self._failing = True
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            return False
        log.warning("the task log %s was removed or replaced while the agent ran; it was "
                    "written again with the %d ids in memory", self._path, len(self._entries))
        self._failing = False
        return True

    def get(self, task_id: str) -> bytes | None:
        """The latest update recorded for `task_id`, as wire bytes."""
        with self._lock:
            return self._entries.get(task_id)

    def record(self, update: dict[str, Any], *, data: bytes | None = None) -> bytes:
        """Remember `update` as the latest for its id; returns its wire bytes (`data`,
        when the caller has encoded it already)."""
        if data is None:
            data = canonical_json(update)
        task_id = update.get("id")
        if not isinstance(task_id, str):
            return data
        slim = _slim(update)
        line = data if slim is update else canonical_json(slim)
        with self._lock:
            self._put(task_id, data, update.get("state") in _FINAL)
            self._write(line + b"\n")
        return data

    def sync(self) -> None:
        """Make what was recorded so far durable: fdatasync, the data and the size it needs,
        not the mtime. Apart from record(), so that the caller can hand a task on between
        writing its first record and making it durable."""
        with self._lock:
            if self._fh is None:
                return  # in memory only, or failing: _write said so
            try:
                os.fdatasync(self._fh.fileno())
            except OSError as exc:
                log.error("cannot write the task log %s: %s", self._path, exc.strerror)
                self._fh.close()
                self._fh = None  # the next record tries to write the whole file again

    def delivered(self, task_id: str, data: bytes) -> None:
        """The broker acknowledged `data`, an update of `task_id`. Cheap and lock-free
        (the MQTT network thread calls it); marked in the log lazily."""
        self._acked.append((task_id, data))

    def flush_marks(self) -> None:
        """Write the marks of acknowledged final updates that are still only in memory."""
        if self._acked:
            with self._lock:
                self._write(b"")

    def undelivered(self, limit: int = RESEND) -> list[bytes]:
        """The final updates the broker never acknowledged, oldest first, at most the newest
        `limit`; older ones are given up (forgotten as undelivered)."""
        with self._lock:
            self._take_marks()
            kept: list[str] = []
            for task_id in reversed(self._entries):
                if len(kept) >= limit or len(kept) == len(self._undelivered):
                    break
                if task_id in self._undelivered:
                    kept.append(task_id)
            self._undelivered.intersection_update(kept)
            return [self._entries[task_id] for task_id in reversed(kept)]

    def _take_marks(self) -> bytes:
        """Apply the acknowledgements noted so far; their mark lines (caller holds the lock)."""
        ids: list[str] = []
        while self._acked:
            task_id, data = self._acked.popleft()
            # only the latest update counts: an acknowledged `running` marks nothing
            if task_id in self._undelivered and self._entries.get(task_id) == data:
                self._undelivered.discard(task_id)
                ids.append(task_id)
        return _mark_lines(ids)

    def _write(self, line: bytes) -> None:
        """Append the pending marks and `line` (caller holds the lock)."""
        if self._path is None:
            self._take_marks()
            return
        if self._fh is None or not self._still_there():
            self._rebuild()  # the rebuilt file holds the memory, marks and `line` included
            return
        marks = self._take_marks()
        try:
            self._fh.write(marks + line)
            self._fh.flush()
            self._lines += marks.count(b"\n") + bool(line)
            if self._lines > 2 * self.remember:
                self._compact()
        except OSError as exc:
            log.error("cannot write the task log %s: %s", self._path, exc.strerror)
            self._fh.close()
            self._fh = None  # the next record tries to write the whole file again

    def unfinished(self) -> list[dict[str, Any]]:
        """Latest updates that are not final: tasks a previous run never finished."""
        with self._lock:
            updates = [json.loads(d) for d in self._entries.values()]
        return [u for u in updates if u.get("state") not in FINAL_STATES]

    def close(self) -> None:
        with self._lock:
            if self._acked and self._fh is not None:
                self._write(b"")
            self._path = None
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _trusted(line: bytes) -> tuple[str, bytes, bool] | None:
    """(task id, stored bytes, final) of one task-log line, or None when it cannot be
    trusted."""
    try:
        update = json.loads(line)
        if not isinstance(update, dict):
            return None
        task_id, state = update.get("id"), update.get("state")
        if not isinstance(task_id, str) or not is_task_id(task_id) \
                or not isinstance(state, str) or state not in AGENT_STATES:
            return None
        return task_id, canonical_json(_slim(update)), state in _FINAL
    except (ValueError, RecursionError, TypeError):  # UnicodeError is a ValueError
        return None


def _marks(line: bytes) -> list[str] | None:
    """The task ids of one `{"delivered": [ids]}` line, or None when it cannot be trusted."""
    try:
        ids = json.loads(line).get(MARK)
    except (ValueError, RecursionError, TypeError, AttributeError):
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) and is_task_id(i) for i in ids):
        return None
    return ids


def _mark_lines(ids: list[str]) -> bytes:
    return b"".join(canonical_json({MARK: ids[i:i + MARKS_PER_LINE]}) + b"\n"
                    for i in range(0, len(ids), MARKS_PER_LINE))


def _move_aside(path: str, why: str) -> None:
    aside = f"{path}.bad-{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        os.rename(path, aside)
    except OSError as exc:
        log.warning("task log %s: %s, and it cannot be moved aside (%s)", path, why,
                    exc.strerror)
        raise
    log.warning("task log %s: %s; moved aside to %s, starting with an empty log", path, why,
                aside)
