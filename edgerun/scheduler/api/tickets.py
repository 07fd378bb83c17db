"""Stream tickets (issue 23): a browser's EventSource cannot send `Authorization`, and
a token in a URL ends up in logs and histories. `POST /v1/stream-tickets` (with the
token in the header) gives a ticket that opens one stream (`?ticket=`) within TTL_S,
once. Tickets are kept in the store (their SHA-256 only), so that a ticket given by one
instance opens a stream on any of them: a load balancer in front of several need not
be sticky. Redeeming deletes the row: of two instances redeeming one ticket at once,
one gets it."""

from __future__ import annotations

import hashlib
import secrets
import time

from edgerun.control.errors import Unauthorized
from edgerun.protocol import JSONObject
from edgerun.scheduler.api.auth import Principal
from edgerun.scheduler.store.tasks import Store

TTL_S = 30.0
MAX_OPEN = 10_000  # tickets given and not used yet; the oldest go first
PREFIX = "ers_"


class Tickets:
    def __init__(self, store: Store) -> None:
        self.store = store

    def issue(self, who: Principal) -> JSONObject:
        ticket = PREFIX + secrets.token_urlsafe(24)
        self.store.add_ticket(_digest(ticket), who.name, who.role, who.token_id,
                              now=time.time(), ttl=TTL_S, keep=MAX_OPEN)
        return {"ticket": ticket, "expires_in": TTL_S,
                "use": "GET /v1/events?ticket=... or /v1/ws?ticket=..., once"}

    def redeem(self, ticket: str) -> Principal:
        found = self.store.take_ticket(_digest(ticket))
        if found is None or found[3] < time.time():
            raise Unauthorized("unknown, used or expired stream ticket: get a new one with "
                               "POST /v1/stream-tickets")
        name, role, token_id, _ = found
        return Principal(name, role, token_id)


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode("utf-8", "replace")).hexdigest()
