"""Stream tickets (issue 23): a browser's EventSource cannot send `Authorization`, and
a token in a URL ends up in logs and histories. `POST /v1/stream-tickets` (with the
token in the header) gives a ticket that opens one stream (`?ticket=`) within TTL_S,
once. Tickets live in this instance's memory: a client opens its stream on the
instance that gave the ticket (the console does, on its own origin); a stream
opened elsewhere gets 401 and asks again."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

from edgerun.control.errors import Unauthorized
from edgerun.protocol import JSONObject
from edgerun.scheduler.api.auth import Principal

TTL_S = 30.0
MAX_OPEN = 10_000  # tickets given and not used yet; the oldest go first
PREFIX = "ers_"


class Tickets:
    def __init__(self) -> None:
        self._open: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def issue(self, who: Principal) -> JSONObject:
        ticket = PREFIX + secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (_, until) in self._open.items() if until < now]:
                del self._open[key]
            while len(self._open) >= MAX_OPEN:
                del self._open[next(iter(self._open))]
            self._open[_digest(ticket)] = (who, now + TTL_S)
        return {"ticket": ticket, "expires_in": TTL_S,
                "use": "GET /v1/events?ticket=... or /v1/ws?ticket=..., once"}

    def redeem(self, ticket: str) -> Principal:
        with self._lock:
            found = self._open.pop(_digest(ticket), None)
        if found is None or found[1] < time.monotonic():
            raise Unauthorized("unknown, used or expired stream ticket: get a new one with "
                               "POST /v1/stream-tickets")
        return found[0]


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode("utf-8", "replace")).hexdigest()
