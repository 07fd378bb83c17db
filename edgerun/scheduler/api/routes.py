"""The route table's records: each operation the API serves, with what the OpenAPI
document says of it (openapi.py builds the document from the table alone).

The statuses an operation can answer follow from what it is, as server.py's
`endpoint` serves it: a token is checked (401, 403), a query or path is checked at
the edge (422), a path names something that may not exist (404), a body is read
(400 bad JSON, 408 too slow, 409 its Idempotency-Key was used for another request,
413 too large, 422 a bad field); `errors` adds what the work itself may answer.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

JSONSchema = dict[str, Any]
PATH_PARAM = re.compile(r"\{([A-Za-z_]+)\}")


@dataclass(frozen=True)
class Param:
    """A query parameter: its name, JSON schema (of one value) and meaning."""

    name: str
    schema: JSONSchema = field(default_factory=lambda: {"type": "string"})
    description: str = ""
    many: bool = False  # may be repeated (?node=a&node=b)
    max_items: int | None = None  # with `many`: how many times at most


@dataclass(frozen=True)
class Op:
    """One operation: method and path are the table's keys."""

    summary: str
    role: str | None  # None: public, no token
    status: int = 200
    query: tuple[Param, ...] = ()
    body: JSONSchema | None = None  # the request body's schema; None: no body
    errors: tuple[int, ...] = ()  # what the work may answer besides the edges' statuses
    carries: str = "the answer"  # what a success carries
    content: str = "application/json"
    path_params: dict[str, str] = field(default_factory=dict)  # name: description

    def statuses(self, path: str) -> list[int]:
        out = {self.status, *self.errors}
        if self.role is not None:
            out |= {401, 403}
        if self.query or PATH_PARAM.search(path):
            out.add(422)
        if PATH_PARAM.search(path):
            out.add(404)
        if self.body is not None:
            out |= {400, 408, 409, 413, 422}
        return sorted(out)


Handler = Callable[[Any], Awaitable[Any]]


def described(handler: Handler, op: Op) -> Handler:
    """`handler` with its Op (for routes not made by server.py's `endpoint`)."""
    handler.op = op  # type: ignore[attr-defined]
    return handler


def op_of(handler: Any) -> Op | None:
    op = getattr(handler, "op", None)
    return op if isinstance(op, Op) else None


__all__ = ["Handler", "JSONSchema", "Op", "Param", "described", "op_of"]
