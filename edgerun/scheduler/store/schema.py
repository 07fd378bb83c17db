"""The store's schema, versioned: migration N moves a store from version N - 1 to N.

Each migration is written once per back end, in its own dialect, as the named query
`migrate_N` of sql/sqlite.sql and sql/postgresql.sql (`;`-separated statements; SQLite's
`INTEGER PRIMARY KEY AUTOINCREMENT` and `REAL` are PostgreSQL's `BIGSERIAL PRIMARY KEY` and
`DOUBLE PRECISION`: seconds since 1970 in a 4-byte REAL would lose their minutes). To add
one: a `migrate_{N+1}` in both files, and SCHEMA_VERSION up by one (a test checks they
agree). The version is `PRAGMA user_version` on SQLite, a `meta` row on PostgreSQL.
"""

from __future__ import annotations

SCHEMA_VERSION = 8

MIGRATIONS: dict[int, str] = {n: f"migrate_{n}" for n in range(1, SCHEMA_VERSION + 1)}
"""{version: the named query that moves the schema to it}"""
