"""Strict at the edge: request bodies and queries of the API are checked key by key.

The wire contract stays lenient (unknown fields are ignored so v1 can grow), but
a person's typo (`timout`, `?state=bogus`) must be an error naming the key, not a
silently ignored setting. Every failure is `Invalid`: HTTP 422 with `field`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from edgerun.control.errors import BadRequest
from edgerun.protocol import State, is_task_id

COMMON_TASK_KEYS = frozenset({"type", "id", "timeout", "expires_at"})
TASK_KEYS = {
    "shell": COMMON_TASK_KEYS | {"command", "env", "cwd", "stdin", "ok_codes"},
    "download": COMMON_TASK_KEYS | {"url", "dest", "sha256", "mode", "max_bytes"},
}
STATES = frozenset(str(s) for s in State)
MAX_LIMIT = 1000
MAX_DEPTH = 32  # nesting of a request body: the deepest real one (a job graph) uses 5
MAX_INT = 2**63 - 1  # what a database column holds
MAX_ID = 256  # a path id longer than this names nothing (the contract's ids are <= 128)
NUL_OK = ("stdin",)  # a task's stdin may carry any text; no other string may hold NUL


class Invalid(BadRequest):
    """A request field is wrong; `field` names it (dotted path into the body)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class BadJson(BadRequest):
    """The body (or a WebSocket message) is not a JSON object this API reads: HTTP 400."""


def _reject_constant(name: str) -> Any:
    raise BadJson(f"{name} is not a JSON number; send a finite number")


def _finite(text: str) -> float | int:
    """A JSON number with a fraction or exponent; a whole one (2.0, 1e3) reads as the
    integer it is, as JSON Schema counts it (an `integer` field takes 2.0)."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BadJson(f"the number {text:.40} is out of range")
    if value.is_integer() and abs(value) <= MAX_INT:
        return int(value)
    return value


def parse_json(raw: bytes | str) -> dict[str, Any]:
    """A request body or WebSocket message as a JSON object whose every string is text an
    agent, a database and a browser can take (strings()); else BadJson or Invalid."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        body = json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except RecursionError:
        raise BadJson(f"the JSON is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError):  # ValueError: also ints of > 4300 digits
        raise BadJson("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadJson("the request body must be a JSON object")
    strings(body)
    return body


def bad_text(value: str, nul_ok: bool = False) -> str | None:
    """Why `value` cannot be stored or sent (a lone surrogate, NUL), or None."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "holds a lone surrogate (\\ud800-\\udfff), which is not text"
    if not nul_ok and "\x00" in value:
        return "holds a NUL character"
    return None


def strings(body: Any) -> None:
    """Walk a parsed body without recursion: depth at most MAX_DEPTH, every key and
    string text (bad_text), every integer within MAX_INT; Invalid names the field."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, field, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadJson(f"the JSON is nested too deeply (at most {MAX_DEPTH} levels)")
        if isinstance(value, str):
            why = bad_text(value, field.rsplit(".", 1)[-1] in NUL_OK)
            if why:
                raise Invalid(field or "body", f"`{field or 'body'}` {why}")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            if abs(value) > MAX_INT:
                raise Invalid(field or "body", f"`{field or 'body'}` is out of range")
        elif isinstance(value, dict):
            for key, item in value.items():
                why = bad_text(key)
                if why:
                    raise Invalid(field or "body", f"a key in `{field or 'body'}` {why}")
                stack.append((item, f"{field}.{key}" if field else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{field}.{i}" if field else str(i), depth + 1)
                         for i, item in enumerate(value))


def path_value(name: str, value: str) -> None:
    """A path parameter (an id) that names nothing may not reach the store."""
    if len(value) > MAX_ID or bad_text(value):
        raise Invalid(name, f"`{name}` is not an id this API gave out")


def dumps(body: Any) -> str:
    """JSON text that is valid UTF-8 whatever the store holds: a lone surrogate an older
    version stored comes out escaped (\\ud800), never as an error."""
    text = json.dumps(body, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(body)
    return text


def unknown_key(where: str, key: str, allowed: Iterable[str], prefix: str = "") -> Invalid:
    import difflib  # only when someone typed a key wrong

    key = key[:64]  # never echo a long key
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f"; did you mean `{close[0]}`?" if close else \
        f" (known: {', '.join(sorted(allowed))})"
    return Invalid(prefix + key, f"unknown key `{key}` in {where}{hint}")


def check_keys(obj: Mapping[str, Any], allowed: Iterable[str], where: str,
               prefix: str = "") -> None:
    allowed = frozenset(allowed)
    for key in obj:
        if key not in allowed:
            raise unknown_key(where, key, allowed, prefix)


def task_spec(spec: Any, field: str = "task") -> dict[str, Any]:
    """A task as a request gives it: a known type and only that type's keys. The values
    are then checked by the contract's own parser (Service.build_task)."""
    if not isinstance(spec, dict):
        raise Invalid(field, f"`{field}` must be an object with `type` shell or download")
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in TASK_KEYS:
        raise Invalid(f"{field}.type", f"`{field}.type` must be shell or download, "
                                       f"not {kind!r:.60}")
    check_keys(spec, TASK_KEYS[kind], f"a {kind} task", f"{field}.")
    given = spec.get("id")
    if given is not None and given != "" and not (isinstance(given, str) and is_task_id(given)):
        raise Invalid(f"{field}.id", f"`{field}.id` must be 1-128 of A-Z a-z 0-9 _ . : - "
                                     f"(or left out: the service makes one)")
    return spec


def targets(body: Mapping[str, Any]) -> list[str]:
    value = body.get("targets", [])
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise Invalid("targets", "`targets` must be a list of node ids or globs")
    return value


def flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise Invalid(key, f"`{key}` must be true or false")
    return value


def dispatch_body(body: Mapping[str, Any]) -> tuple[list[str], bool, dict[str, Any]]:
    check_keys(body, ("targets", "online", "task", "where", "retry"), "a dispatch request")
    if "task" not in body:
        raise Invalid("task", "`task` is missing: the task to run")
    return targets(body), flag(body, "online"), task_spec(body["task"])


def job_body(body: Mapping[str, Any]) -> tuple[str | None, list[str], bool,
                                                  list[dict[str, Any]]]:
    check_keys(body, ("id", "targets", "online", "steps", "where"), "a job")
    job_id = body.get("id")
    if job_id is not None and not isinstance(job_id, str):
        raise Invalid("id", "`id` must be a string")
    steps = body.get("steps")
    if not isinstance(steps, list) or not steps:
        raise Invalid("steps", "`steps` must be a non-empty list of tasks")
    # a graph step's own keys (jobs.py: name, needs, targets, where, online) beside its task
    graph = ("name", "needs", "targets", "where", "online")
    checked = [{**task_spec({k: v for k, v in step.items() if k not in graph}, f"steps.{i}"),
                **{k: step[k] for k in graph if k in step}} if isinstance(step, dict)
               else task_spec(step, f"steps.{i}") for i, step in enumerate(steps)]
    return job_id, targets(body), flag(body, "online"), checked


def query(params: Iterable[tuple[str, str]], allowed: Iterable[str],
          repeatable: Iterable[str] = ()) -> dict[str, list[str]]:
    """The query as {key: [values]}; an unknown key, or a repeated one that may appear
    once, is Invalid."""
    allowed, repeatable = frozenset(allowed), frozenset(repeatable)
    out: dict[str, list[str]] = {}
    for key, value in params:
        if key not in allowed:
            key = key[:64]
            raise unknown_key("the query", key, allowed)
        if key in out and key not in repeatable:
            raise Invalid(key, f"`{key}` may be given once")
        if "\x00" in value or "\ufffd" in value or len(value) > 4096:
            raise Invalid(key, f"`{key}` must be text of at most 4096 characters, "
                               f"without NUL or bytes that are not UTF-8")
        out.setdefault(key, []).append(value)
    return out


def one(q: Mapping[str, list[str]], key: str) -> str | None:
    values = q.get(key)
    return values[-1] if values else None


def limit(q: Mapping[str, list[str]], default: int) -> int:
    text = one(q, "limit")
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 4) \
            or not 1 <= int(text) <= MAX_LIMIT:
        raise Invalid("limit", f"`limit` must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def boolean(q: Mapping[str, list[str]], key: str) -> bool:
    text = one(q, key)
    if text is None:
        return False
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no", ""):
        return False
    raise Invalid(key, f"`{key}` must be true or false")


def state(q: Mapping[str, list[str]]) -> str | None:
    text = one(q, "state")
    if text is not None and text not in STATES:
        raise Invalid("state", f"`state` must be one of {', '.join(sorted(STATES))}, "
                               f"not {text!r:.60}")
    return text


def cursor_int(q: Mapping[str, list[str]]) -> int | None:
    text = one(q, "cursor")
    if text is None or text == "":
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise Invalid("cursor", "`cursor` is not one this API gave out")
    return int(text)


_BACKTICKED = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*)`")


def field_of(message: str, default: str) -> str:
    """The field a contract parser message names (`timeout` must be ...), for 422s."""
    found = _BACKTICKED.search(message)
    return found.group(1) if found else default
