"""API tokens: bearer tokens with a role, of which the store keeps only a SHA-256.

A token is `ert_` + 32 random bytes (256 bits, base64url). A slow password
hash (argon2, bcrypt) protects low-entropy secrets people choose; against a
random 256-bit token it adds nothing, and it would cost tens of milliseconds
and up to 64 MiB per request and rule out looking a token up by its hash.
SHA-256 lets every request find its token with one indexed read.

Roles, each including the ones before: `viewer` (read), `operator` (dispatch,
cancel), `admin` (tokens).

On first start (no token in the store) the service creates an admin token and
writes it, mode 0600, to `admin_token_file()`: the local CLI reads it from there
when it talks to a loopback address, so local use needs no extra step.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from contextlib import AbstractContextManager
from typing import Any, Protocol

from edgerun.control.errors import BadRequest, Conflict, Forbidden, Unauthorized
from edgerun.control.tokens import ROLES, TOKEN_PREFIX, admin_token_file, read_token_file, state_dir
from edgerun.errors import ConfigError
from edgerun.protocol import JSONObject

BOOTSTRAP_NAME = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is asking: the token's name and role."""

    name: str
    role: str
    token_id: int | None = None

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def require(self, role: str, what: str) -> None:
        if not self.may(role):
            raise Forbidden(f"token {self.name!r} has role {self.role}; {what} needs "
                            f"{role} or above")


class TokenStore(Protocol):
    def add_token(self, name: str, role: str, digest: str, hint: str,
                  created_by: str | None) -> JSONObject | None: ...

    def token_by_hash(self, digest: str) -> JSONObject | None: ...

    def count_tokens(self) -> int: ...

    def transaction(self) -> AbstractContextManager[Any]: ...


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(store: TokenStore, name: str, role: str,
                 created_by: str | None) -> tuple[str, JSONObject]:
    """(the token, its record); the token itself is never stored or shown again."""
    if role not in ROLES:
        raise BadRequest(f"`role` must be one of {', '.join(ROLES)}, not {role!r}")
    if not name or len(name) > 64 or not name.isprintable():
        raise BadRequest("`name` must be 1 to 64 printable characters")
    token = new_token()
    record = store.add_token(name, role, digest(token), token[:8] + "…", created_by)
    if record is None:
        raise Conflict(f"a token named {name!r} exists already; choose another name")
    return token, record


def authenticate(store: TokenStore, header: str | None, query_token: str | None = None
                 ) -> tuple[Principal, JSONObject]:
    """The principal of `Authorization: Bearer …` (or `access_token=` for EventSource and
    WebSocket clients, which cannot set headers), or Unauthorized."""
    token = None
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("the Authorization header must be `Bearer <token>`")
        token = value.strip()
    elif query_token:
        token = query_token
    if not token:
        raise Unauthorized("no token: send `Authorization: Bearer <token>` (see `edgerun "
                           "token create`)")
    record = store.token_by_hash(digest(token))
    if record is None:
        raise Unauthorized("unknown or revoked token")
    return Principal(record["name"], record["role"], record["id"]), record


def store_token_file(db: str) -> Path:
    """Where the first admin token of the store `db` is kept: beside a SQLite file, or
    under the state directory for a database URL."""
    if "://" in db:
        return state_dir() / f"admin-token-{hashlib.sha256(db.encode()).hexdigest()[:16]}"
    return Path(db + ".admin-token")


def publish_local(source: Path, port: int) -> Path | None:
    """Copy the store's admin token to this port's file, so the local CLI finds it even
    when the port changed since the first start; None when there is none to copy."""
    token = read_token_file(source)
    if token is None:
        return None
    target = admin_token_file(port)
    try:
        write_secret(target, token)
    except OSError:
        return None
    return target


def write_secret(path: Path, text: str) -> None:
    """Write `text` to `path` readable by this user only (0600, directory 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (text + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def bootstrap(store: TokenStore, path: Path) -> str | None:
    """First start: create the admin token and write it to `path`; None if tokens exist.

    Race-free across instances started at once on one database: the insert and the
    file are one transaction. Only the instance whose insert wins (the others' wait on
    the unique name until it commits, then find it there) writes the file, before its
    COMMIT, so a token is never stored that nobody can read, and a loser never
    overwrites the winner's file. A failed write rolls the insert back."""
    token = new_token()
    with store.transaction():
        if store.count_tokens() > 0:
            return None
        if store.add_token(BOOTSTRAP_NAME, "admin", digest(token), token[:8] + "…",
                           "serve") is None:
            return None  # another instance made it at the same moment
        try:
            write_secret(path, token)
        except OSError as exc:
            raise ConfigError(f"cannot write the first admin token to {path}: "
                              f"{exc.strerror or exc}; give --admin-token-file") from None
    return token


__all__ = ["Principal", "authenticate", "bootstrap", "create_token", "publish_local",
           "store_token_file"]
