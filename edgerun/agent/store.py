"""The agent's memory of task ids: at-most-once execution across deliveries and restarts.

It keeps the latest update of the last `remember` task ids (10,000 by default),
as encoded bytes to stay small. Output is kept whole for the most recent
`KEEP_OUTPUT` ids only; older entries drop `stdout`/`stderr` (marked
`truncated`), which bounds memory and disk at about 300 bytes an id.

With a writable state directory it appends to `tasks.jsonl`, fsyncing the
first record of an id before the task may run, and compacts the file when it
has grown to twice the ids it must hold.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from typing import Any

from edgerun.protocol import FINAL_STATES, canonical_json

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
        self._fh: Any = None
        self._lines = 0
        if state_dir:
            self._open(state_dir)

    @property
    def persistent(self) -> bool:
        return self._fh is not None

    def _open(self, state_dir: str) -> None:
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            path = os.path.join(state_dir, FILE_NAME)
            self._load(path)
            self._path = path
            self._compact()
        except OSError as exc:
            log.warning("state directory %s is not usable (%s); task ids are kept in "
                        "memory only and forgotten on restart", state_dir, exc.strerror)
            self._path, self._fh = None, None

    def _load(self, path: str) -> None:
        try:
            fh = open(path, "rb")  # noqa: SIM115 - read line by line below
        except FileNotFoundError:
            return
        with fh:
            for line in fh:
                try:
                    update = json.loads(line)
                    task_id = update["id"]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line after a crash
                if isinstance(task_id, str):
                    self._put(task_id, canonical_json(_slim(update)))

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
        assert self._path is not None
        tmp = self._path + ".tmp"
        with open(tmp, "wb") as out:
            for data in self._entries.values():
                out.write(canonical_json(_slim(json.loads(data))) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)
        if self._fh is not None:
            self._fh.close()
        self._fh = open(self._path, "ab")  # noqa: SIM115 - kept open for appends
        self._lines = len(self._entries)

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
            if self._fh is not None:
                try:
                    self._fh.write(canonical_json(_slim(update)) + b"\n")
                    self._fh.flush()
                    if durable:
                        os.fsync(self._fh.fileno())
                    self._lines += 1
                    if self._lines > 2 * self.remember:
                        self._compact()
                except OSError as exc:
                    log.error("cannot write the task log %s: %s", self._path, exc.strerror)
        return data

    def unfinished(self) -> list[dict[str, Any]]:
        """Latest updates that are not final: tasks a previous run never finished."""
        with self._lock:
            updates = [json.loads(d) for d in self._entries.values()]
        return [u for u in updates if u.get("state") not in FINAL_STATES]

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
