"""Idempotency keys of the API's POSTs (issue 23), kept in the store so that every
instance sharing it answers a retry the same way.

A request with `Idempotency-Key: K` first reserves K for its token (`begin`): a row
with the request's fingerprint and no answer yet. When its work is done the answer is
kept with it (`finish`); when the work fails the reservation goes (`abandon`), so a
retry runs it again. A later request with the same token and key gets:
- the kept answer, when its fingerprint (method, path, body) is the same;
- `KeyReused` when the fingerprint differs (HTTP 409 naming the key);
- `InProgress` while the first one still runs (the caller waits and asks again).
Rows are kept KEEP_S (48 h, over the 24 h promised) and pruned as requests come.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from edgerun.scheduler.store.db import Database

KEEP_S = 48 * 3600.0
STALE_S = 300.0  # a reservation with no answer this old: its instance died mid-request
PRUNE_EVERY_S = 600.0


@dataclass(frozen=True)
class Kept:
    """The answer the first request with this key got."""

    status: int
    body: str


class KeyReused(Exception):
    """The key was used with another request."""


class InProgress(Exception):
    """The first request with this key has not answered yet."""


def fingerprint(method: str, path: str, body: Any) -> str:
    text = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Idempotency:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._pruned = 0.0
        self._lock = threading.Lock()

    def begin(self, owner: str, key: str, print_: str) -> Kept | None:
        """None: the key is this request's now, do the work; else the kept answer."""
        now = time.time()
        self.prune(now)
        with self.db.write() as db:
            if db.run("idem_reserve", (owner, key, print_, now)).rowcount == 1:
                return None
            row = db.one("idem_lock", (owner, key))
            if row is None:  # pruned meanwhile
                db.run("idem_insert", (owner, key, print_, now))
                return None
            if row["fingerprint"] != print_:
                raise KeyReused(key)
            if row["status"] is not None:
                return Kept(int(row["status"]), str(row["response"]))
            if now - float(row["created_at"]) > STALE_S:
                db.run("idem_refresh", (now, owner, key))
                return None
            raise InProgress(key)

    def finish(self, owner: str, key: str, status: int, body: str) -> None:
        with self.db.write() as db:
            db.run("idem_finish", (status, body, owner, key))

    def abandon(self, owner: str, key: str) -> None:
        with self.db.write() as db:
            db.run("idem_abandon", (owner, key))

    def prune(self, now: float, force: bool = False) -> None:
        """Drop the keys older than KEEP_S (at most every PRUNE_EVERY_S, unless `force`)."""
        with self._lock:
            if now - self._pruned < PRUNE_EVERY_S and not force:
                return
            self._pruned = now
        with self.db.write() as db:
            db.run("idem_prune", (now - KEEP_S,))


__all__ = ["KEEP_S", "Idempotency", "InProgress", "Kept", "KeyReused", "fingerprint"]
