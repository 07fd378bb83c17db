"""Names, codes and times of the wire contract (PROTOCOL.md, "Names")."""

from __future__ import annotations

import enum
import re
from datetime import datetime, UTC

VERSION = 1
DEFAULT_PREFIX = "edgerun"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
DEFAULT_TIMEOUT_S = 3600.0
MAX_ID_LEN = 128

_NODE_RE = re.compile(r"[A-Za-z0-9_:\-]{1,128}")
_TASK_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_NOT_NODE_CHAR = re.compile(r"[^a-z0-9_:\-]")
_PREFIX_RE = re.compile(r"[^/+#\x00]{1,64}")


class ErrorCode(enum.StrEnum):
    """The `error.code` values of a non-successful update."""

    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_TYPE = "unsupported_type"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    TOO_LARGE = "too_large"
    BUSY = "busy"
    SPAWN_FAILED = "spawn_failed"
    EXIT_STATUS = "exit_status"
    DOWNLOAD_FAILED = "download_failed"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    TIMEOUT = "timeout"
    CANCELED = "canceled"
    INTERNAL = "internal"


def is_node_id(value: object) -> bool:
    return isinstance(value, str) and _NODE_RE.fullmatch(value) is not None


def is_task_id(value: object) -> bool:
    return isinstance(value, str) and _TASK_RE.fullmatch(value) is not None


def is_prefix(value: object) -> bool:
    """A prefix is one MQTT topic level: no `/`, `+`, `#`."""
    return isinstance(value, str) and _PREFIX_RE.fullmatch(value) is not None


def normalise_node_id(raw: str) -> str:
    """Turn a derived name (MAC, DMI UUID, host name) into a node id.

    Lower-cased and stripped of every character the contract does not allow;
    returns "" when nothing is left, so the caller can try the next source.
    """
    return _NOT_NODE_CHAR.sub("", raw.lower())[:MAX_ID_LEN]


def format_time(moment: datetime | None = None) -> str:
    """RFC 3339 UTC with milliseconds: `2026-11-22T06:00:00.123Z`."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return f"{moment.year:04d}-" + moment.strftime("%m-%dT%H:%M:%S.") + \
        f"{moment.microsecond // 1000:03d}Z"


def parse_time(value: str) -> datetime:
    """Parse an RFC 3339 time with a zone; raises ValueError otherwise."""
    if not isinstance(value, str) or not 10 <= len(value) <= 40 or "T" not in value.upper():
        raise ValueError(f"not an RFC 3339 time: {value!r:.60}")
    parsed = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"time has no zone: {value!r:.60}")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError(f"time is outside the years 1 to 9999 in UTC: {value!r:.60}") from None
