"""Strict at the edge: request bodies and queries of the API are checked key by key.

The wire contract stays lenient (unknown fields are ignored so v1 can grow), but
a person's typo (`timout`, `?state=bogus`) must be an error naming the key, not a
silently ignored setting. Every failure is `Invalid`: HTTP 422 with `field`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from edgerun.control.errors import BadRequest
from edgerun.protocol import State

COMMON_TASK_KEYS = frozenset({"type", "id", "timeout", "expires_at"})
TASK_KEYS = {
    "shell": COMMON_TASK_KEYS | {"command", "env", "cwd", "stdin", "ok_codes"},
    "download": COMMON_TASK_KEYS | {"url", "dest", "sha256", "mode", "max_bytes"},
}
STATES = frozenset(str(s) for s in State)
MAX_LIMIT = 1000


class Invalid(BadRequest):
    """A request field is wrong; `field` names it (dotted path into the body)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def unknown_key(where: str, key: str, allowed: Iterable[str], prefix: str = "") -> Invalid:
    import difflib  # only when someone typed a key wrong

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
    if kind not in TASK_KEYS:
        raise Invalid(f"{field}.type", f"`{field}.type` must be shell or download, "
                                       f"not {kind!r}")
    check_keys(spec, TASK_KEYS[kind], f"a {kind} task", f"{field}.")
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
            raise unknown_key("the query", key, allowed)
        if key in out and key not in repeatable:
            raise Invalid(key, f"`{key}` may be given once")
        out.setdefault(key, []).append(value)
    return out


def one(q: Mapping[str, list[str]], key: str) -> str | None:
    values = q.get(key)
    return values[-1] if values else None


def limit(q: Mapping[str, list[str]], default: int) -> int:
    text = one(q, "limit")
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
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
                               f"not {text!r}")
    return text


def cursor_int(q: Mapping[str, list[str]]) -> int | None:
    text = one(q, "cursor")
    if text is None or text == "":
        return None
    if not text.isdigit():
        raise Invalid("cursor", "`cursor` is not one this API gave out")
    return int(text)


_BACKTICKED = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*)`")


def field_of(message: str, default: str) -> str:
    """The field a contract parser message names (`timeout` must be ...), for 422s."""
    found = _BACKTICKED.search(message)
    return found.group(1) if found else default
