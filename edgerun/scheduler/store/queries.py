"""The store's SQL: one file per back end (sql/sqlite.sql, sql/postgresql.sql), each
query under a `-- name: <query_name>` header, in that back end's own dialect and
placeholder style (sqlite3: `?` or `:name`; psycopg: `%s` or `%(name)s`).

Both files define the same names, except the back ends' own plumbing: names that
start with `pg_` exist only for PostgreSQL (advisory locks, NOTIFY, LISTEN), names
that start with `sqlite_` only for SQLite. A file that misses a name the other has is
a StoreError when the first store opens, naming what is missing where. Nothing is
read at import: the files are parsed once per process, on first use.

Values a query takes as one list (`IN` a variable number of values) are passed as a
Python list: PostgreSQL gets an array (`= ANY(%s::text[])`), SQLite its JSON text
(`IN (SELECT value FROM json_each(?))`). Many rows at once are passed as `Rows` where
the statement returns rows (`INSERT ... RETURNING`, keyed reads): PostgreSQL gets one
array per column (`unnest(%b::text[], ...)`: in binary, as the text format escapes
every element), SQLite the rows as one JSON text
(`json_each(?)`); a plain multi-row insert goes through `Database.run_many` (SQLite:
executemany of its one-row statement). Either way the query's text is fixed, so each
driver prepares it once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from edgerun.scheduler.errors import StoreError

KINDS = ("sqlite", "postgresql")
ONLY = {"sqlite": "sqlite_", "postgresql": "pg_"}
HEADER = "-- name:"
_lock = threading.Lock()
_loaded: dict[str, dict[str, str]] = {}

Args = Sequence[Any] | Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Rows:
    """Many rows of the same columns, for one multi-row statement."""

    rows: Sequence[Sequence[Any]]
    columns: int


def parse(text: str, origin: str = "?") -> dict[str, str]:
    """{name: SQL} of a file of named queries; full-line comments and a trailing `;`
    dropped (a `%` in a comment would confuse psycopg's placeholders)."""
    out: dict[str, str] = {}
    name: str | None = None
    body: list[str] = []

    def flush() -> None:
        if name is not None:
            sql = "\n".join(body).strip().rstrip(";").strip()
            if not sql:
                raise StoreError(f"{origin}: query {name!r} is empty")
            out[name] = sql

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(HEADER):
            flush()
            name, body = stripped[len(HEADER):].strip(), []
            if not name.isidentifier():
                raise StoreError(f"{origin}: bad query name {name!r}")
            if name in out:
                raise StoreError(f"{origin}: query {name!r} is defined twice")
        elif stripped.startswith("--") or name is None:
            continue
        else:
            body.append(line.rstrip())
    flush()
    return out


def _read(kind: str) -> dict[str, str]:
    path = f"sql/{kind}.sql"
    try:
        text = resources.files(__package__).joinpath(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise StoreError(f"the store's SQL for {kind} is missing ({path}): {exc}") from None
    return parse(text, path)


def shared(names: set[str]) -> set[str]:
    """The names both back ends must define."""
    return {n for n in names if not n.startswith(tuple(ONLY.values()))}


def load() -> dict[str, dict[str, str]]:
    """{kind: {name: SQL}} of both files, read and checked once per process."""
    with _lock:
        if _loaded:
            return _loaded
        files = {kind: _read(kind) for kind in KINDS}
        check(files)
        _loaded.update(files)
        return _loaded


def check(files: Mapping[str, Mapping[str, str]]) -> None:
    """A StoreError naming every query one back end has and the other lacks."""
    problems = []
    for kind, other in (("sqlite", "postgresql"), ("postgresql", "sqlite")):
        missing = sorted(shared(set(files[other])) - set(files[kind]))
        if missing:
            problems.append(f"sql/{kind}.sql lacks {', '.join(missing)}")
        foreign = sorted(n for n in files[kind] if n.startswith(ONLY[other]))
        if foreign:
            problems.append(f"sql/{kind}.sql defines {other}-only {', '.join(foreign)}")
    if problems:
        raise StoreError("the store's named queries differ between back ends: "
                         + "; ".join(problems))


def of(kind: str) -> dict[str, str]:
    """{name: SQL} of one back end."""
    return load()[kind]


def for_sqlite(args: Args) -> Args:
    """Lists and Rows as JSON text (read with json_each)."""
    if isinstance(args, Mapping):
        return {k: _sqlite_value(v) for k, v in args.items()}
    for value in args:  # the usual case: none (a loop: cheaper than any() on a hot path)
        kind = type(value)
        if kind is list or kind is Rows:
            return [_sqlite_value(a) for a in args]
    return args


def _sqlite_value(value: Any) -> Any:
    if type(value) is Rows:
        return json.dumps([list(r) for r in value.rows])
    if type(value) is list:
        return json.dumps(value)
    return value


def for_postgres(args: Args) -> Args:
    """Lists as arrays (psycopg's own adaptation), Rows as one array per column."""
    if isinstance(args, Mapping):
        return args
    for value in args:
        if type(value) is Rows:
            break
    else:
        return args
    out: list[Any] = []
    for value in args:
        if type(value) is Rows:
            columns = [list(c) for c in zip(*value.rows, strict=True)] if value.rows \
                else [[] for _ in range(value.columns)]
            out.extend(columns)
        else:
            out.append(value)
    return out
