"""API tokens in the store (only their SHA-256 is kept)."""

from __future__ import annotations

from edgerun.protocol import JSONObject, format_time
from edgerun.scheduler.store.db import Row
from edgerun.scheduler.store.parts import StoreParts


class TokenStore(StoreParts):
    def add_token(self, name: str, role: str, digest: str, hint: str,
                  created_by: str | None) -> JSONObject | None:
        """None when a token of that name exists already."""
        with self.transaction() as db:
            cur = db.run("insert_token", (name, role, digest, hint, format_time(), created_by))
            if cur.rowcount == 0:
                return None
            row = db.one("token_by_name", (name,))
            return _token_dict(row)

    def token_by_hash(self, digest: str) -> JSONObject | None:
        """The live (not revoked) token with this hash."""
        with self.read() as db:
            row = db.one("token_by_hash", (digest,))
            return _token_dict(row) if row is not None else None

    def tokens(self) -> list[JSONObject]:
        with self.read() as db:
            return [_token_dict(r) for r in db.all("list_tokens")]

    def count_tokens(self) -> int:
        with self.read() as db:
            return int(db.one("count_tokens")[0])

    def revoke_token(self, name: str) -> JSONObject | None:
        """None when no live token has that name."""
        with self.transaction() as db:
            cur = db.run("revoke_token", (format_time(), name))
            if cur.rowcount == 0:
                return None
            row = db.one("token_by_name", (name,))
            return _token_dict(row)

    def touch_token(self, token_id: int) -> None:
        with self.transaction() as db:
            db.run("touch_token", (format_time(), token_id))

    def add_ticket(self, digest: str, name: str, role: str, token_id: int | None, *,
                   now: float, ttl: float, keep: int) -> None:
        """A stream ticket (its SHA-256), good for `ttl` seconds from `now` (seconds since
        1970). The lapsed go first; past `keep` unused ones, those that expire first."""
        with self.transaction() as db:
            db.run("prune_tickets", (now,))
            over = int(db.one("count_tickets")[0]) - keep + 1
            if over > 0:
                db.run("drop_oldest_tickets", (over,))
            db.run("insert_ticket", (digest, name, role, token_id, now + ttl))

    def take_ticket(self, digest: str) -> tuple[str, str, int | None, float] | None:
        """(name, role, token id, expires at) of the ticket, which is gone once taken: of
        two instances redeeming it at once, one gets it."""
        with self.transaction() as db:
            row = db.one("take_ticket", (digest,))
        if row is None:
            return None
        token_id = row["token_id"]
        return (str(row["name"]), str(row["role"]),
                int(token_id) if token_id is not None else None, float(row["expires_at"]))


def _token_dict(row: Row) -> JSONObject:
    """A token as `edgerun token list` shows it: never its hash."""
    return {"id": row["id"], "name": row["name"], "role": row["role"], "hint": row["hint"],
            "created_at": row["created_at"], "created_by": row["created_by"],
            "last_used_at": row["last_used_at"], "revoked_at": row["revoked_at"]}
