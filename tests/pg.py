"""PostgreSQL for tests: one fresh database per test run on the local server, dropped at the end.

The server is the one this machine runs on 127.0.0.1:5432 (trust auth, user postgres;
EDGERUN_TEST_PG overrides the admin URL). `pg_database` creates `edgerun_test_<random>`
once per session and drops it (WITH (FORCE): a killed `serve` may still hold a session)
at the end. `pg_url` gives each test a schema of its own inside it, so every test starts
from an empty store at the cost of a CREATE SCHEMA rather than a CREATE DATABASE.

Import the fixtures into a test module: `from .pg import pg_database, pg_url  # noqa: F401`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

ADMIN_URL = os.environ.get("EDGERUN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _url(database: str, schema: str | None = None) -> str:
    base = ADMIN_URL.rpartition("/")[0]
    url = f"{base}/{database}"
    return url + (f"?options=-csearch_path%3D{schema}" if schema else "")


def admin(sql: str, database: str = "postgres") -> None:
    import psycopg
    with psycopg.connect(_url(database), autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)  # type: ignore[arg-type]  # test-made names only


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The name of a database created for this test run."""
    pytest.importorskip("psycopg")
    name = f"edgerun_test_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """A postgresql:// URL whose search_path is an empty schema of this test's own."""
    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE SCHEMA "{schema}"', pg_database)
    return _url(pg_database, schema)


def fresh_database(pg_database: str) -> str:
    """A URL of the whole test database with a new empty schema, for processes (serve)."""
    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE SCHEMA "{schema}"', pg_database)
    return _url(pg_database, schema)
