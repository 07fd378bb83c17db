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
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from typing import Any

from edgerun.protocol import AGENT_STATES, FINAL_STATES, canonical_json, is_task_id

log = logging.getLogger(__name__)

KEEP_OUTPUT = 100
FILE_NAME = "tasks.jsonl"


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
                entry = _trusted(line)
                if entry is None:
                    skipped += 1
                else:
                    self._put(*entry)
        if skipped:
            log.warning("task log %s: skipped %d records that could not be trusted (torn, "
                        "corrupted or not task updates)", path, skipped)

    def _put(self, task_id: str, data: bytes) -> None:
        self._entries[task_id] = data
        self._entries.move_to_end(task_id)
        self._with_output.pop(task_id, None)
        if b'"stdout":' in data or b'"stderr":' in data:
            self._with_output[task_id] = None
            while len(self._with_output) > KEEP_OUTPUT:
                old_id, _ = self._with_output.popitem(last=False)
                self._entries[old_id] = canonical_json(_slim(json.loads(self._entries[old_id])))
        while len(self._entries) > self.remember:
            old_id, _ = self._entries.popitem(last=False)
            self._with_output.pop(old_id, None)

    def _compact(self) -> None:
        """Write every entry to a fresh file and switch appends to it."""
        assert self._path is not None
        tmp = self._path + ".tmp"
        try:
            os.unlink(tmp)  # whatever is there, a symlink included, is not followed
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            for data in self._entries.values():
                out.write(canonical_json(_slim(json.loads(data))) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        self._fh = os.fdopen(fd, "ab")
        self._lines = len(self._entries)

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

    def record(self, update: dict[str, Any], *, durable: bool = False) -> bytes:
        """Remember `update` as the latest for its id; returns its wire bytes."""
        data = canonical_json(update)
        task_id = update.get("id")
        if not isinstance(task_id, str):
            return data
        with self._lock:
            self._put(task_id, data)
            if self._path is None:
                return data
            if self._fh is None or not self._still_there():
                self._rebuild()  # the rebuilt file holds this update already
                return data
            try:
                self._fh.write(canonical_json(_slim(update)) + b"\n")
                self._fh.flush()
                if durable:  # fdatasync: the data and the size it needs, not the mtime
                    os.fdatasync(self._fh.fileno())
                self._lines += 1
                if self._lines > 2 * self.remember:
                    self._compact()
            except OSError as exc:
                log.error("cannot write the task log %s: %s", self._path, exc.strerror)
                self._fh.close()
                self._fh = None  # the next record tries to write the whole file again
        return data

    def unfinished(self) -> list[dict[str, Any]]:
        """Latest updates that are not final: tasks a previous run never finished."""
        with self._lock:
            updates = [json.loads(d) for d in self._entries.values()]
        return [u for u in updates if u.get("state") not in FINAL_STATES]

    def close(self) -> None:
        with self._lock:
            self._path = None
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _trusted(line: bytes) -> tuple[str, bytes] | None:
    """(task id, stored bytes) of one task-log line, or None when it cannot be trusted."""
    try:
        update = json.loads(line)
        if not isinstance(update, dict):
            return None
        task_id, state = update.get("id"), update.get("state")
        if not isinstance(task_id, str) or not is_task_id(task_id) \
                or not isinstance(state, str) or state not in AGENT_STATES:
            return None
        return task_id, canonical_json(_slim(update))
    except (ValueError, RecursionError, TypeError):  # UnicodeError is a ValueError
        return None


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
