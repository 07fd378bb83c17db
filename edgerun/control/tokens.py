"""What `edgerun serve` and its local clients agree on about API tokens: the roles, the
token's shape, and where serve leaves its admin token for the local CLI."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

ROLES = ("viewer", "operator", "admin")
TOKEN_PREFIX = "ert_"  # noqa: S105 - a marker, not a secret


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgerun"


def admin_token_file(port: int) -> Path:
    """Where `serve` on this port puts a copy of its admin token, and the local CLI looks."""
    return state_dir() / f"admin-token-{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token_file(path: str | Path) -> str | None:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def find_token(host: str, port: int) -> str | None:
    """The local serve's admin token, only for a loopback API (never sent elsewhere)."""
    if not is_loopback(host):
        return None
    return read_token_file(admin_token_file(port))
