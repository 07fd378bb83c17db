"""The SQLite schema, versioned: each entry of MIGRATIONS moves the file up one version."""

from __future__ import annotations

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE tasks (
        seq            INTEGER PRIMARY KEY AUTOINCREMENT,
        node           TEXT NOT NULL,
        id             TEXT NOT NULL,
        type           TEXT,
        spec           TEXT,
        source         TEXT NOT NULL,
        state          TEXT NOT NULL,
        created_at     TEXT NOT NULL,
        updated_at     TEXT NOT NULL,
        dispatched_at  TEXT,
        timeout        REAL,
        expires_at     TEXT,
        expires_ts     REAL,
        deadline       REAL,
        exit_code      INTEGER,
        error_code     TEXT,
        error_message  TEXT,
        result         TEXT,
        job_id         TEXT,
        step           INTEGER,
        UNIQUE (node, id)
    );
    CREATE INDEX tasks_by_id ON tasks (id);
    CREATE INDEX tasks_by_state ON tasks (state);
    CREATE INDEX tasks_by_job ON tasks (job_id, node, step);
    CREATE INDEX tasks_due ON tasks (deadline) WHERE deadline IS NOT NULL;
    CREATE INDEX tasks_expiring ON tasks (expires_ts) WHERE expires_ts IS NOT NULL;
    CREATE TABLE updates (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        node         TEXT NOT NULL,
        task_id      TEXT,
        state        TEXT NOT NULL,
        at           TEXT,
        received_at  TEXT NOT NULL,
        body         TEXT NOT NULL
    );
    CREATE INDEX updates_by_task ON updates (node, task_id);
    CREATE TABLE nodes (
        node        TEXT PRIMARY KEY,
        state       TEXT NOT NULL,
        first_seen  TEXT NOT NULL,
        last_seen   TEXT NOT NULL,
        changed_at  TEXT NOT NULL,
        agent       TEXT,
        facts       TEXT,
        running     TEXT
    );
    CREATE TABLE jobs (
        id          TEXT PRIMARY KEY,
        created_at  TEXT NOT NULL,
        nodes       TEXT NOT NULL,
        steps       TEXT NOT NULL
    );
    """,
    # 2: API tokens (only a SHA-256 of each is kept) and the durable event log that
    # /v1/events resumes from (Last-Event-ID); `events` is appended by Store.append_event
    2: """
    CREATE TABLE tokens (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        name          TEXT NOT NULL UNIQUE,
        role          TEXT NOT NULL,
        hash          TEXT NOT NULL UNIQUE,
        hint          TEXT NOT NULL,
        created_at    TEXT NOT NULL,
        created_by    TEXT,
        last_used_at  TEXT,
        revoked_at    TEXT
    );
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        at       TEXT NOT NULL,
        channel  TEXT NOT NULL,
        node     TEXT,
        task_id  TEXT,
        body     TEXT NOT NULL
    );
    """,
    # 3: fleet operations (scheduler/README.md): a queued task's `hold` (job: waiting for
    # its needs, rollout: waiting for its turn) and `not_before` (a retry's back-off);
    # retry attempts (attempt number, parent, first attempt, policy); rollouts
    3: """
    ALTER TABLE tasks ADD COLUMN hold TEXT;
    ALTER TABLE tasks ADD COLUMN not_before REAL;
    ALTER TABLE tasks ADD COLUMN attempt INTEGER;
    ALTER TABLE tasks ADD COLUMN parent_id TEXT;
    ALTER TABLE tasks ADD COLUMN root_id TEXT;
    ALTER TABLE tasks ADD COLUMN retry TEXT;
    ALTER TABLE tasks ADD COLUMN rollout_id TEXT;
    CREATE INDEX tasks_by_node_state ON tasks (node, state);
    CREATE INDEX tasks_by_rollout ON tasks (rollout_id);
    CREATE INDEX tasks_by_root ON tasks (node, root_id);
    UPDATE tasks SET hold='job' WHERE state='queued' AND job_id IS NOT NULL AND EXISTS
        (SELECT 1 FROM tasks p WHERE p.job_id=tasks.job_id AND p.node=tasks.node
         AND p.step < tasks.step AND p.state != 'succeeded');
    CREATE TABLE rollouts (
        id          TEXT PRIMARY KEY,
        task_id     TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        state       TEXT NOT NULL,
        reason      TEXT,
        options     TEXT NOT NULL,
        nodes       TEXT NOT NULL,
        released_at REAL
    );
    """,
    # 4: event ids from one counter row, bumped as the last statement of the transaction
    # that logs the events (store/tx.py): ids in commit order across instances, no holes;
    # a task's previous state, set by the one UPDATE that changes it (`SET previous=state`)
    # so a change is a single statement that also says where it came from
    4: """
    INSERT INTO meta (key, value) SELECT 'event_seq', CAST(COALESCE(MAX(id), 0) AS TEXT)
        FROM events;
    ALTER TABLE tasks ADD COLUMN previous TEXT
    """,
    # 5: idempotency keys of API POSTs (store/idempotency.py, issue 23): the first
    # answer to a token's key, kept 48 h so a retry gets it again on any instance
    5: """
    CREATE TABLE idempotency (
        owner        TEXT NOT NULL,
        key          TEXT NOT NULL,
        fingerprint  TEXT NOT NULL,
        status       INTEGER,
        response     TEXT,
        created_at   REAL NOT NULL,
        PRIMARY KEY (owner, key)
    );
    CREATE INDEX idempotency_by_age ON idempotency (created_at)
    """,
    # 6: who created a job (the API token's name), for the console's job view (issue 24)
    6: """
    ALTER TABLE jobs ADD COLUMN created_by TEXT
    """,
}

SCHEMA_VERSION = max(MIGRATIONS)
