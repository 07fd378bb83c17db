"""The messages of the wire contract as typed records (PROTOCOL.md, "Messages").

Each record knows how to become the JSON object it travels as (`to_dict`);
`parse.py` goes the other way and validates. Fields that are None are left out
of the wire form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Literal

from .names import DEFAULT_TIMEOUT_S, VERSION, ErrorCode, format_time
from .states import State

JSONObject = dict[str, Any]


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, separators `,` and `:`, no ASCII escaping, UTF-8 (PROTOCOL.md, "Signing")."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def signing_bytes(obj: JSONObject) -> bytes:
    """The bytes a task's or cancel's `sig` is computed over: the message without `sig`."""
    return canonical_json({k: v for k, v in obj.items() if k != "sig"})


def _compact(obj: JSONObject) -> JSONObject:
    return {k: v for k, v in obj.items() if v is not None}


@dataclass(frozen=True)
class ShellTask:
    id: str
    command: str | tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    stdin: str | None = None
    ok_codes: tuple[int, ...] = (0,)
    timeout: float = DEFAULT_TIMEOUT_S
    expires_at: datetime | None = None
    type: ClassVar[Literal["shell"]] = "shell"

    def to_dict(self) -> JSONObject:
        return _compact({
            "v": VERSION, "kind": "task", "id": self.id, "type": "shell",
            "command": self.command if isinstance(self.command, str) else list(self.command),
            "env": dict(self.env) or None, "cwd": self.cwd, "stdin": self.stdin,
            "ok_codes": list(self.ok_codes) if self.ok_codes != (0,) else None,
            "timeout": self.timeout,
            "expires_at": format_time(self.expires_at) if self.expires_at else None,
        })


@dataclass(frozen=True)
class DownloadTask:
    id: str
    url: str
    dest: str
    sha256: str | None = None
    mode: int | None = None
    max_bytes: int | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    expires_at: datetime | None = None
    type: ClassVar[Literal["download"]] = "download"

    def to_dict(self) -> JSONObject:
        return _compact({
            "v": VERSION, "kind": "task", "id": self.id, "type": "download",
            "url": self.url, "dest": self.dest, "sha256": self.sha256,
            "mode": f"{self.mode:04o}" if self.mode is not None else None,
            "max_bytes": self.max_bytes, "timeout": self.timeout,
            "expires_at": format_time(self.expires_at) if self.expires_at else None,
        })


Task = ShellTask | DownloadTask


@dataclass(frozen=True)
class Cancel:
    id: str
    if_queued: bool = False  # withdraw only a task that has not started (PROTOCOL.md)

    def to_dict(self) -> JSONObject:
        out: JSONObject = {"v": VERSION, "kind": "cancel", "id": self.id}
        if self.if_queued:
            out["if_queued"] = True
        return out


@dataclass(frozen=True)
class Error:
    code: str  # an ErrorCode; kept as str so a newer peer's codes still parse
    message: str

    def to_dict(self) -> JSONObject:
        return {"code": str(self.code), "message": self.message}


@dataclass(frozen=True)
class Update:
    id: str | None
    node: str
    state: State
    at: str
    exit_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    truncated: bool | None = None
    duration_s: float | None = None
    bytes: int | None = None
    sha256: str | None = None
    dest: str | None = None
    error: Error | None = None
    output_dropped: int | None = None  # shell: bytes of live output not sent
    of: str | None = None  # "cancel": a rejected cancel, which says nothing of the task

    def to_dict(self) -> JSONObject:
        out: JSONObject = {"v": VERSION, "kind": "update", "id": self.id, "node": self.node,
                           "state": str(self.state), "at": self.at}
        out.update(_compact({
            "exit_code": self.exit_code, "stdout": self.stdout, "stderr": self.stderr,
            "truncated": self.truncated, "duration_s": self.duration_s, "bytes": self.bytes,
            "sha256": self.sha256, "dest": self.dest,
            "error": self.error.to_dict() if self.error else None,
            "output_dropped": self.output_dropped, "of": self.of,
        }))
        return out


def rejected(node: str, task_id: str | None, code: ErrorCode, message: str,
             of: str | None = None) -> Update:
    """The update that answers a message the agent will never run (`of="cancel"` when the
    refused message was a cancel)."""
    return Update(id=task_id, node=node, state=State.REJECTED, at=format_time(),
                  error=Error(code, message), of=of)


@dataclass(frozen=True)
class Output:
    id: str
    node: str
    stream: Literal["stdout", "stderr"]
    seq: int
    data: str

    def to_dict(self) -> JSONObject:
        return {"v": VERSION, "kind": "output", "id": self.id, "node": self.node,
                "stream": self.stream, "seq": self.seq, "data": self.data}


@dataclass(frozen=True)
class Status:
    node: str
    state: Literal["online", "offline"]
    at: str | None = None
    agent: str | None = None
    facts: JSONObject | None = None
    running: tuple[str, ...] | None = None

    def to_dict(self) -> JSONObject:
        return _compact({
            "v": VERSION, "kind": "status", "node": self.node, "state": self.state,
            "at": self.at, "agent": self.agent, "facts": self.facts,
            "running": list(self.running) if self.running is not None else None,
        })


def last_will(node: str) -> Status:
    """The agent's MQTT Last Will: exactly the fields the contract names."""
    return Status(node=node, state="offline")


Message = ShellTask | DownloadTask | Cancel | Update | Output | Status


def encode(message: Message) -> bytes:
    """The wire bytes of a message: canonical JSON."""
    return canonical_json(message.to_dict())
