"""Parsing and validation: bytes in, a typed message or a ProtocolError out.

Every failure is a ProtocolError carrying a contract error code and a sentence
a person can act on; nothing here raises anything else for any input.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from typing import Any
from urllib.parse import urlsplit

from ..errors import EdgerunError
from .messages import (
    Cancel, DownloadTask, Error, JSONObject, Message, Output, ShellTask, Status, Task, Update,
)
from .names import (
    DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TIMEOUT_S, VERSION, ErrorCode, is_node_id, is_task_id,
    parse_time,
)
from .states import AGENT_STATES, State

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_MODE = re.compile(r"0?[0-7]{3,4}")
_PARSE_CEILING = 16 * 1024 * 1024  # past this an oversized message is not even parsed for its id
BAD = ErrorCode.BAD_MESSAGE


class ProtocolError(EdgerunError):
    """A message breaks the contract. `task_id` is its id where it could be read."""

    def __init__(self, code: ErrorCode, message: str, task_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.task_id = task_id


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def message_id(obj: JSONObject) -> str | None:
    """The message's `id` if it is a valid task id, else None."""
    value = obj.get("id")
    return value if is_task_id(value) else None


def decode(payload: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> JSONObject:
    """Bytes to a v1 JSON object, or ProtocolError (bad_message / too_large)."""
    size = len(payload)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(BAD, "message is not UTF-8 text") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        if size > max_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, _too_large(size, max_bytes)) from None
        raise ProtocolError(BAD, "message is nested too deeply to be read",
                            _shallow_id(text)) from None
    except ValueError as exc:
        if size > max_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, _too_large(size, max_bytes)) from None
        raise ProtocolError(BAD, f"message is not JSON: {str(exc)[:120]}") from None
    if size > max_bytes:
        task_id = message_id(obj) if isinstance(obj, dict) else None
        raise ProtocolError(ErrorCode.TOO_LARGE, _too_large(size, max_bytes), task_id)
    if not isinstance(obj, dict):
        raise ProtocolError(BAD, "message is not a JSON object")
    if obj.get("v") != VERSION or isinstance(obj.get("v"), bool):
        raise ProtocolError(BAD, f"unsupported protocol version {obj.get('v')!r:.40}; "
                                 f"this end speaks v{VERSION}", message_id(obj))
    if _SURROGATE.search(text) and not _encodable(obj):
        raise ProtocolError(BAD, "message holds a string that is not valid Unicode "
                                 "(a lone surrogate escape such as \\ud800)", message_id(obj))
    return obj


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _encodable(value: Any) -> bool:
    """Whether every string in `value` (keys too) can be encoded as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _shallow_id(text: str) -> str | None:
    """The top-level `id` of a JSON object too deep for the parser, read without parsing
    the nested values (the last one wins, as in json.loads); None when there is none."""
    depth, i, found, key = 0, 0, None, None
    length = len(text)
    while i < length:
        char = text[i]
        if char == '"':
            end = i + 1
            while end < length and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            if depth == 1:
                try:
                    word = json.loads(text[i:end + 1])
                except ValueError:
                    return None
                after = text[end + 1:end + 40].lstrip()
                if key is None and after.startswith(":"):
                    key = word
                else:
                    if key == "id":
                        found = word
                    key = None
            i = end + 1
            continue
        if char in "{[":
            depth += 1
            if depth == 2 and key is not None:
                key = None
        elif char in "}]":
            depth -= 1
        elif char == "," and depth == 1:
            key = None
        i += 1
    return found if is_task_id(found) else None


def _too_large(size: int, limit: int) -> str:
    return f"message is {size} bytes; the limit is {limit}"


def decode_bounded(payload: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> JSONObject:
    """Like decode, but does not even parse a payload far beyond the limit."""
    if len(payload) > max(max_bytes, _PARSE_CEILING):
        raise ProtocolError(ErrorCode.TOO_LARGE, _too_large(len(payload), max_bytes))
    return decode(payload, max_bytes)


class _Fields:
    """Typed access to one message's fields; every miss is a ProtocolError."""

    def __init__(self, obj: JSONObject, task_id: str | None) -> None:
        self.obj, self.task_id = obj, task_id

    def fail(self, text: str, code: ErrorCode = BAD) -> ProtocolError:
        return ProtocolError(code, text, self.task_id)

    def text(self, name: str, *, required: bool = False, nul_ok: bool = False) -> str | None:
        value = self.obj.get(name)
        if value is None:
            if required:
                raise self.fail(f"`{name}` is required")
            return None
        if not isinstance(value, str):
            raise self.fail(f"`{name}` must be a string")
        if not nul_ok and "\x00" in value:
            raise self.fail(f"`{name}` must not contain a NUL character")
        return value

    def number(self, name: str, default: float) -> float:
        value = self.obj.get(name)
        if value is None:
            return default
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise self.fail(f"`{name}` must be a number greater than 0")
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise self.fail(f"`{name}` must be a number greater than 0 and within "
                            f"floating point range") from None

    def positive_int(self, name: str) -> int | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(f"`{name}` must be a whole number greater than 0")
        return value

    def abs_path(self, name: str, *, required: bool = False,
                 file: bool = False) -> str | None:
        """An absolute, normalised path; with `file`, one that can name a file (not `/`)."""
        value = self.text(name, required=required)
        if value is None:
            return None
        if not value.startswith("/") or posixpath.normpath(value) != value \
                or (file and value == "/"):
            raise self.fail(f"`{name}` must be an absolute, normalised path"
                            f"{' to a file' if file else ''}, got {value!r:.200}")
        return value


def parse_command(obj: JSONObject) -> Task | Cancel:
    """A decoded object sent to an agent: a task or a cancel."""
    kind = obj.get("kind")
    task_id = message_id(obj)
    if task_id is None:
        raise ProtocolError(BAD, "`id` is missing or not a valid task id "
                                 "(1-128 of A-Z a-z 0-9 _ . : -)")
    if kind == "cancel":
        if_queued = obj.get("if_queued", False)
        if not isinstance(if_queued, bool):
            raise ProtocolError(BAD, "`if_queued` must be true or false", task_id)
        return Cancel(task_id, if_queued)
    if kind != "task":
        raise ProtocolError(BAD, f"`kind` must be task or cancel, got {kind!r:.40}", task_id)
    fields = _Fields(obj, task_id)
    expires = fields.text("expires_at")
    try:
        expires_at = parse_time(expires) if expires is not None else None
    except ValueError:
        raise fields.fail("`expires_at` must be an RFC 3339 time such as "
                          "2026-11-22T06:00:00.000Z") from None
    sig = obj.get("sig")
    if sig is not None and not isinstance(sig, str):
        raise fields.fail("`sig` must be a base64 string", ErrorCode.BAD_SIGNATURE)
    timeout = fields.number("timeout", DEFAULT_TIMEOUT_S)
    kind_of_task = obj.get("type")
    if kind_of_task == "shell":
        return _shell(fields, task_id, timeout, expires_at)
    if kind_of_task == "download":
        return _download(fields, task_id, timeout, expires_at)
    raise fields.fail(f"task type {kind_of_task!r:.40} is not supported; "
                      "this agent runs shell and download", ErrorCode.UNSUPPORTED_TYPE)


def _shell(f: _Fields, task_id: str, timeout: float, expires_at: Any) -> ShellTask:
    raw = f.obj.get("command")
    command: str | tuple[str, ...]
    if isinstance(raw, str):
        if not raw.strip() or "\x00" in raw:
            raise f.fail("`command` must be a non-empty string without NUL characters")
        command = raw
    elif isinstance(raw, list):
        if not raw or not all(isinstance(a, str) and "\x00" not in a for a in raw) or not raw[0]:
            raise f.fail("`command` as an array must hold strings without NUL, "
                         "the first one non-empty")
        command = tuple(raw)
    else:
        raise f.fail("`command` must be a string or an array of strings")
    env = f.obj.get("env")
    if env is None:
        env = {}
    elif not isinstance(env, dict) or not all(
            isinstance(k, str) and k and "=" not in k and "\x00" not in k
            and isinstance(v, str) and "\x00" not in v for k, v in env.items()):
        raise f.fail("`env` must map variable names (no `=`) to strings")
    codes = f.obj.get("ok_codes")
    if codes is None:
        ok_codes: tuple[int, ...] = (0,)
    elif isinstance(codes, list) and codes and all(
            isinstance(c, int) and not isinstance(c, bool) and -255 <= c <= 255 for c in codes):
        ok_codes = tuple(codes)
    else:
        raise f.fail("`ok_codes` must be a non-empty array of exit codes (-255 to 255)")
    return ShellTask(id=task_id, command=command, env=env, cwd=f.abs_path("cwd"),
                     stdin=f.text("stdin", nul_ok=True), ok_codes=ok_codes,
                     timeout=timeout, expires_at=expires_at)


def check_url(url: str) -> str | None:
    """Why `url` may not be downloaded (http and https only), or None if it may."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"URL is malformed: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"only http and https URLs may be downloaded, not {parts.scheme or 'none'!r:.20}"
    if not host or any(c.isspace() or ord(c) < 32 for c in url):
        return "URL has no host or contains white space"
    return None


def _download(f: _Fields, task_id: str, timeout: float, expires_at: Any) -> DownloadTask:
    url = f.text("url", required=True)
    assert url is not None
    problem = check_url(url)
    if problem:
        raise f.fail(f"`url`: {problem}")
    dest = f.abs_path("dest", required=True, file=True)
    assert dest is not None
    sha256 = f.text("sha256")
    if sha256 is not None and not _HEX64.fullmatch(sha256):
        raise f.fail("`sha256` must be 64 hexadecimal characters")
    mode_text = f.text("mode")
    if mode_text is not None and not _MODE.fullmatch(mode_text):
        raise f.fail("`mode` must be an octal string such as \"0755\"")
    return DownloadTask(id=task_id, url=url, dest=dest,
                        sha256=sha256.lower() if sha256 else None,
                        mode=int(mode_text, 8) if mode_text else None,
                        max_bytes=f.positive_int("max_bytes"),
                        timeout=timeout, expires_at=expires_at)


def parse_update(obj: JSONObject) -> Update:
    f = _Fields(obj, message_id(obj))
    state = obj.get("state")
    if state not in AGENT_STATES:
        raise f.fail(f"`state` {state!r:.40} is not an agent state")
    if obj.get("id") is not None and f.task_id is None:
        raise f.fail("`id` is not a valid task id")
    if f.task_id is None and state != State.REJECTED:
        raise f.fail("only a rejected update may have a null id")
    err = obj.get("error")
    error = None
    if err is not None:
        if not isinstance(err, dict) or not isinstance(err.get("code"), str) \
                or not isinstance(err.get("message"), str):
            raise f.fail("`error` must be an object with string `code` and `message`")
        error = Error(err["code"], err["message"])
    ints = {k: obj.get(k) for k in ("exit_code", "bytes", "output_dropped")}
    for key, value in ints.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise f.fail(f"`{key}` must be an integer")
    duration = obj.get("duration_s")
    if duration is not None and (isinstance(duration, bool)
                                 or not isinstance(duration, (int, float))):
        raise f.fail("`duration_s` must be a number")
    truncated = obj.get("truncated")
    if truncated is not None and not isinstance(truncated, bool):
        raise f.fail("`truncated` must be true or false")
    of = obj.get("of")
    if of is not None and not isinstance(of, str):
        raise f.fail("`of` must be a string")
    return Update(id=f.task_id, node=_node(f), state=State(state), at=_required_at(f),
                  exit_code=ints["exit_code"], stdout=f.text("stdout", nul_ok=True),
                  stderr=f.text("stderr", nul_ok=True), truncated=truncated,
                  duration_s=float(duration) if duration is not None else None,
                  bytes=ints["bytes"], sha256=f.text("sha256"), dest=f.text("dest"), error=error,
                  output_dropped=ints["output_dropped"], of=of)


def _node(f: _Fields) -> str:
    node = f.obj.get("node")
    if not is_node_id(node):
        raise f.fail("`node` is missing or not a valid node id")
    assert isinstance(node, str)
    return node


def _at(f: _Fields) -> str | None:
    at = f.text("at")
    if at is not None:
        try:
            parse_time(at)
        except ValueError:
            raise f.fail("`at` must be an RFC 3339 time") from None
    return at


def _required_at(f: _Fields) -> str:
    at = _at(f)
    if at is None:
        raise f.fail("`at` is required")
    return at


def parse_output(obj: JSONObject) -> Output:
    f = _Fields(obj, message_id(obj))
    if f.task_id is None:
        raise f.fail("`id` is missing or not a valid task id")
    stream, seq = obj.get("stream"), obj.get("seq")
    if stream not in ("stdout", "stderr"):
        raise f.fail("`stream` must be stdout or stderr")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise f.fail("`seq` must be a whole number from 0")
    data = f.text("data", required=True, nul_ok=True)
    assert data is not None
    return Output(id=f.task_id, node=_node(f), stream=stream, seq=seq, data=data)


def parse_status(obj: JSONObject) -> Status:
    f = _Fields(obj, None)
    state = obj.get("state")
    if state not in ("online", "offline"):
        raise f.fail("`state` must be online or offline")
    facts, running = obj.get("facts"), obj.get("running")
    if facts is not None and not isinstance(facts, dict):
        raise f.fail("`facts` must be an object")
    if running is not None and not (isinstance(running, list) and all(map(is_task_id, running))):
        raise f.fail("`running` must be an array of task ids")
    return Status(node=_node(f), state=state, at=_at(f), agent=f.text("agent"),
                  facts=facts, running=tuple(running) if running is not None else None)


def parse_message(payload: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Any message of the contract, by its `kind`."""
    obj = decode_bounded(payload, max_bytes)
    kind = obj.get("kind")
    if kind in ("task", "cancel"):
        return parse_command(obj)
    if kind == "update":
        return parse_update(obj)
    if kind == "output":
        return parse_output(obj)
    if kind == "status":
        return parse_status(obj)
    raise ProtocolError(BAD, f"unknown `kind` {kind!r:.40}", message_id(obj))
