"""Two SQL back ends behind one small interface: stdlib sqlite3 and PostgreSQL (psycopg 3).

The store's SQL is written once per back end, in that back end's own dialect, as
named queries in sql/sqlite.sql and sql/postgresql.sql (queries.py reads them, once
per process, on first use). `Database.run(name, args)` runs one by name; `one` and
`all` fetch its rows; `pipeline` sends several at once. Nothing is rewritten: each
file says what its back end runs (`?` or `%s`, `INSERT OR IGNORE` or
`ON CONFLICT DO NOTHING`, `FOR UPDATE` row locks on PostgreSQL only, where several
`serve` instances share the rows; SQLite's writers are serialised anyway).
The schema version is `PRAGMA user_version` on SQLite, a `meta` row on PostgreSQL.

psycopg is imported only for a postgresql:// URL, so the small mode never pays
for it (about 23 MiB of RSS and 115 ms here).
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from edgerun.scheduler.errors import StoreError
from edgerun.scheduler.store import queries
from edgerun.scheduler.store.queries import Args, for_postgres, for_sqlite
from edgerun.settings import redact

PG_SCHEMES = ("postgresql://", "postgres://")
PROBE_AFTER_IDLE_S = 5.0
MIGRATION_LOCK = 0x6564_6765_7275_6E00  # "edgerun\0": serialises migrations across instances


def is_postgres(target: str) -> bool:
    return target.startswith(PG_SCHEMES)


class Row(Protocol):
    def __getitem__(self, key: str | int) -> Any: ...
    def keys(self) -> Sequence[str]: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class PgRow:
    """A PostgreSQL row read like sqlite3.Row: by column name or by position."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: dict[str, int], values: Sequence[Any]) -> None:
        self._names, self._values = names, values

    def __getitem__(self, key: str | int) -> Any:
        return self._values[key if isinstance(key, int) else self._names[key]]

    def keys(self) -> list[str]:
        return list(self._names)


class Database(ABC):
    """One connection guarded by a lock; `write()` is a transaction, `read()` is not."""

    kind = "?"
    EXPLAIN = "EXPLAIN "

    def __init__(self, target: str) -> None:
        self.target = target
        self.name = redact(target)
        self.origin = uuid.uuid4().hex[:12]  # tells this process's notifications apart
        self._lock = threading.RLock()
        self._in_tx = False  # a read inside the open transaction must not reconnect
        self.queries = queries.of(self.kind)  # {name: SQL} of this back end

    # --- named queries --------------------------------------------------------------------
    def sql(self, name: str) -> str:
        """The text of a named query of this back end."""
        try:
            return self.queries[name]
        except KeyError:
            raise StoreError(f"the store has no query named {name!r} for {self.kind}"
                             ) from None

    def run(self, name: str, args: Args = ()) -> Cursor:
        """Run the named query with `args` (a sequence for `?`/`%s`, a mapping for
        `:name`/`%(name)s`; lists and `Rows` as queries.py says)."""
        return self._run(self.sql(name), args)

    def one(self, name: str, args: Args = ()) -> Any:
        """The first row of the named query (None when there is none)."""
        return self.run(name, args).fetchone()

    def all(self, name: str, args: Args = ()) -> list[Any]:
        return self.run(name, args).fetchall()

    def run_many(self, name: str, rows: Sequence[Sequence[Any]]) -> None:
        """The named insert for many rows at once, nothing returned: SQLite runs its
        one-row statement over them (executemany: one prepared statement in a C loop);
        PostgreSQL runs its statement once with one array per column (`unnest`)."""
        if rows:
            self._run_many(self.sql(name), rows)

    def explain(self, name: str, args: Args = ()) -> list[str]:
        """The back end's plan of the named query, one line a step (for tests and tuning)."""
        return [str(r[-1]) for r in self._run(self.EXPLAIN + self.sql(name), args)]

    # --- what each back end provides --------------------------------------------------
    @abstractmethod
    def _run(self, sql: str, args: Args) -> Cursor:
        ...

    @abstractmethod
    def _run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        ...

    def execute(self, sql: str, args: Args = ()) -> Cursor:
        """One statement as is, in this back end's own dialect: for tests and one-off
        tools (the store runs named queries)."""
        return self._run(sql, args)

    def pipeline(self, statements: Sequence[tuple[str, Args]]) -> list[list[Any]]:
        """Each named query's rows (for `RETURNING`), in order. PostgreSQL sends them all
        before it reads any answer (psycopg's pipeline mode): one round trip for the lot
        instead of one each. They run in order, each seeing the ones before."""
        return [self.run(name, args).fetchall() for name, args in statements]

    @abstractmethod
    def _begin(self) -> None:
        ...

    @abstractmethod
    def _end(self, commit: bool) -> None:
        ...

    @abstractmethod
    def schema_version(self) -> int:
        ...

    @abstractmethod
    def set_schema_version(self, version: int) -> None:
        ...

    def notify(self, payload: str) -> None:  # noqa: B027 - a no-op unless a back end needs it
        """Tell the other instances, when this transaction commits (PostgreSQL only)."""

    @abstractmethod
    def close(self) -> None:
        ...

    @property
    @abstractmethod
    def errors(self) -> tuple[type[BaseException], ...]:
        ...

    def _healthy(self) -> None:  # noqa: B027 - a no-op unless a back end needs it
        """Reconnect if the connection broke since the last use."""

    # --- shared -------------------------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[Database]:
        """A transaction; inside one this thread has open already (the lock is ours), that
        one: it commits with the outermost."""
        with self._lock:
            if self._in_tx:
                yield self
                return
            try:
                self._healthy()
                self._begin()
                self._in_tx = True
                try:
                    yield self
                except BaseException:
                    self._in_tx = False
                    self._end(False)
                    raise
                self._in_tx = False
                self._end(True)
            except self.errors as exc:
                raise StoreError(f"task store {self.name}: {_first_line(exc)}") from None

    @contextmanager
    def read(self) -> Iterator[Database]:
        with self._lock:
            try:
                if not self._in_tx:
                    self._healthy()
                yield self
            except self.errors as exc:
                raise StoreError(f"task store {self.name}: {_first_line(exc)}") from None

    def migrate(self, migrations: dict[int, str], latest: int) -> None:
        """Move the schema up to `latest`: `migrations[n]` names the query (of this back
        end's file) whose `;`-separated statements move it from n - 1 to n."""
        with self.write():
            self._lock_migrations()
            version = self.schema_version()
            if version > latest:
                raise StoreError(f"the task store {self.name} has schema version {version}; "
                                 f"this edgerun knows up to {latest}: upgrade edgerun")
            for target in range(version + 1, latest + 1):
                for statement in self.sql(migrations[target]).split(";"):
                    if statement.strip():
                        self._run(statement, ())
                self.set_schema_version(target)

    def _lock_migrations(self) -> None:  # noqa: B027 - a no-op unless a back end needs it
        pass


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


class SqliteDatabase(Database):
    kind = "sqlite"
    EXPLAIN = "EXPLAIN QUERY PLAN "

    def __init__(self, path: str) -> None:
        super().__init__(path)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                       timeout=10.0)
            self._db.row_factory = sqlite3.Row
            # a row someone edited into bytes that are not UTF-8 is read escaped (\xff),
            # never as an error that fails every page it is on (issue 23)
            self._db.text_factory = _text
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the task store {path}: {exc}") from None

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def _run(self, sql: str, args: Args) -> Cursor:
        return self._db.execute(sql, for_sqlite(args))

    def _run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)


    def _begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def _end(self, commit: bool) -> None:
        self._db.execute("COMMIT" if commit else "ROLLBACK")

    def schema_version(self) -> int:
        return int(self.one("sqlite_schema_version")[0])

    def set_schema_version(self, version: int) -> None:
        self._db.execute(f"PRAGMA user_version={int(version)}")

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise StoreError(f"a postgresql:// store needs psycopg 3 "
                         f"(pip install 'edgerun[postgres]'): {exc}") from None
    return psycopg


def pg_connect(url: str, *, autocommit: bool = True) -> Any:
    """A psycopg connection whose rows read like sqlite3.Row; errors are StoreErrors."""
    psycopg = _psycopg()
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=10,
                               row_factory=_pg_rows, application_name="edgerun-scheduler")
    except psycopg.Error as exc:
        raise StoreError(f"cannot open the task store {redact(url)}: "
                         f"{_first_line(exc)}") from None
    return conn


def _pg_rows(cursor: Any) -> Callable[[Sequence[Any]], PgRow]:
    names = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: PgRow(names, values)


class PostgresDatabase(Database):
    kind = "postgresql"
    CHANNEL = "edgerun_changes"
    EXPLAIN = "EXPLAIN "

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._psycopg = _psycopg()
        self._conn = pg_connect(url)
        self._used = time.monotonic()

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        return (self._psycopg.Error,)

    def _healthy(self) -> None:
        """A connection that broke, or idled long enough for the server to have gone
        away meanwhile (a restart), is checked and replaced before it is used, so the
        first statement after a PostgreSQL restart does not fail."""
        now = time.monotonic()
        idle, self._used = now - self._used, now
        stale = self._conn.closed or self._conn.broken
        if not stale and idle > PROBE_AFTER_IDLE_S:
            try:
                self.run("pg_ping")
            except self._psycopg.Error:
                stale = True  # e.g. "terminating connection due to administrator command"
        if stale:
            self._replace()

    def _replace(self) -> None:
        old, self._conn = self._conn, pg_connect(self.target)
        try:
            old.close()
        except self._psycopg.Error:
            pass

    def _begin(self) -> None:
        try:
            self._conn.execute("BEGIN")
        except self._psycopg.OperationalError:
            self._replace()  # the session is gone; nothing ran yet: safe to start again
            self._conn.execute("BEGIN")

    def _run(self, sql: str, args: Args) -> Cursor:
        cursor: Cursor = self._conn.execute(sql, for_postgres(args))
        return cursor

    def _run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.execute(sql, [list(column) for column in zip(*rows, strict=True)])

    def pipeline(self, statements: Sequence[tuple[str, Args]]) -> list[list[Any]]:
        if len(statements) < 2 or not self._psycopg.Pipeline.is_supported():
            cursors = [self._conn.execute(self.sql(name), for_postgres(args))
                       for name, args in statements]
        else:
            with self._conn.pipeline():
                cursors = [self._conn.execute(self.sql(name), for_postgres(args))
                           for name, args in statements]
        # a statement with no rows to give (an INSERT without RETURNING): none
        return [cursor.fetchall() if cursor.description is not None else []
                for cursor in cursors]

    def _end(self, commit: bool) -> None:
        if self._conn.broken or self._conn.closed:
            if commit:
                raise StoreError(f"task store {self.name}: the connection broke before COMMIT")
            return
        if commit and self._conn.info.transaction_status == \
                self._psycopg.pq.TransactionStatus.INERROR:
            # a statement failed and someone caught its error: COMMIT would only roll back,
            # silently; say so, so nothing is acked as if it were recorded
            self._conn.execute("ROLLBACK")
            raise StoreError(f"task store {self.name}: a statement of the transaction failed; "
                             f"it was rolled back")
        self._conn.execute("COMMIT" if commit else "ROLLBACK")

    def _lock_migrations(self) -> None:
        self.run("pg_lock_migrations", (MIGRATION_LOCK,))

    def schema_version(self) -> int:
        if not self.one("pg_has_meta")[0]:
            return 0
        row = self.one("meta_value", ("schema_version",))
        return int(row[0]) if row is not None else 0

    def set_schema_version(self, version: int) -> None:
        self.run("set_meta", ("schema_version", str(version)))

    def notify(self, payload: str) -> None:
        self.run("pg_notify", (self.CHANNEL, payload))

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.close()
            except self._psycopg.Error:
                pass


def open_database(target: str) -> Database:
    """`postgresql://...` (or `postgres://`): PostgreSQL; anything else: a SQLite file."""
    if is_postgres(target):
        return PostgresDatabase(target)
    return SqliteDatabase(target)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
