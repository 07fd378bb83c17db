-- The store's SQL for PostgreSQL (psycopg 3): every query it runs, by name (store/queries.py).
-- Placeholders: `%s` in order, or `%(name)s` from a mapping; a literal percent sign is
-- written doubled. A list argument arrives as an array (`= ANY(%s::text[])`); many rows at
-- once arrive as one array per column (`unnest(%b::text[], ...)`: `%b` sends them in
-- binary, as the text format escapes every element with a regular expression, which cost
-- more than the insert itself): the text of every query is fixed, so psycopg prepares it once. Rows another instance may change at the same time
-- are read `FOR UPDATE`. Parameters PostgreSQL cannot type from their place are cast.
-- sql/sqlite.sql defines the same names (a test checks it); `pg_` names are PostgreSQL's own
-- plumbing (advisory locks, NOTIFY, LISTEN), used by db.py, cluster.py and adopt.py.

-- ===== the schema: migrate_N moves it from version N-1 to N (PRAGMA user_version) =====

-- name: migrate_1
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (
    seq            BIGSERIAL PRIMARY KEY,
    node           TEXT NOT NULL,
    id             TEXT NOT NULL,
    type           TEXT,
    spec           TEXT,
    source         TEXT NOT NULL,
    state          TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    dispatched_at  TEXT,
    timeout        DOUBLE PRECISION,
    expires_at     TEXT,
    expires_ts     DOUBLE PRECISION,
    deadline       DOUBLE PRECISION,
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
    seq          BIGSERIAL PRIMARY KEY,
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

-- 2: API tokens (only a SHA-256 of each is kept) and the durable event log that
-- /v1/events resumes from (Last-Event-ID)
-- name: migrate_2
CREATE TABLE tokens (
    id            BIGSERIAL PRIMARY KEY,
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
    id       BIGSERIAL PRIMARY KEY,
    at       TEXT NOT NULL,
    channel  TEXT NOT NULL,
    node     TEXT,
    task_id  TEXT,
    body     TEXT NOT NULL
);

-- 3: fleet operations (scheduler/README.md): a queued task's `hold` (job: waiting for its
-- needs, rollout: waiting for its turn) and `not_before` (a retry's back-off); retry
-- attempts (attempt number, parent, first attempt, policy); rollouts
-- name: migrate_3
ALTER TABLE tasks ADD COLUMN hold TEXT;
ALTER TABLE tasks ADD COLUMN not_before DOUBLE PRECISION;
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
    released_at DOUBLE PRECISION
);

-- 4: event ids from one counter row, bumped as the last statement of the transaction that
-- logs the events (store/tx.py): ids in commit order across instances, no holes; a task's
-- previous state, set by the one UPDATE that changes it (`SET previous=state`)
-- name: migrate_4
INSERT INTO meta (key, value) SELECT 'event_seq', CAST(COALESCE(MAX(id), 0) AS TEXT)
    FROM events;
ALTER TABLE tasks ADD COLUMN previous TEXT

-- 5: idempotency keys of API POSTs (store/idempotency.py, issue 23): the first answer to a
-- token's key, kept 48 h so a retry gets it again on any instance
-- name: migrate_5
CREATE TABLE idempotency (
    owner        TEXT NOT NULL,
    key          TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    status       INTEGER,
    response     TEXT,
    created_at   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX idempotency_by_age ON idempotency (created_at)

-- 6: who created a job (the API token's name), for the console's job view (issue 24)
-- name: migrate_6
ALTER TABLE jobs ADD COLUMN created_by TEXT

-- 7: tasks by the time of their last change: the overview's counts of the last hour and
-- its latest failures read the rows of that hour, newest first, not every task (1,000,000
-- tasks: 0.5-1 s a request). Beside tasks_by_state, not in its place: SQLite reads a page
-- by state in rowid order from (state) alone, and scanned the table without it
-- name: migrate_7
CREATE INDEX tasks_by_updated ON tasks (updated_at)

-- 8: stream tickets in the store, so that a ticket given by one instance opens a stream on
-- any (a load balancer need not be sticky); only their SHA-256 is kept
-- name: migrate_8
CREATE TABLE stream_tickets (
    digest      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    token_id    BIGINT,
    expires_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX stream_tickets_by_expiry ON stream_tickets (expires_at)

-- ===== plumbing =====

-- name: pg_has_meta
SELECT to_regclass('meta') IS NOT NULL

-- name: pg_lock_migrations
SELECT pg_advisory_xact_lock(%s)

-- name: pg_notify
SELECT pg_notify(%s, %s)

-- a transaction whose loss in a crash harms nothing (nodes' last_seen): its COMMIT does not
-- wait for the disk
-- name: pg_async_commit
SET LOCAL synchronous_commit TO OFF

-- name: pg_listen
LISTEN edgerun_changes

-- name: pg_ping
SELECT 1

-- name: pg_try_lock
SELECT pg_try_advisory_lock(%s)

-- name: pg_unlock
SELECT pg_advisory_unlock(%s)

-- the database's clock (seconds since 1970), so that no two instances' clocks are compared
-- name: pg_clock
SELECT extract(epoch from clock_timestamp())

-- name: meta_value
SELECT value FROM meta WHERE key=%s

-- name: set_meta
INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value=excluded.value

-- name: meta_like
SELECT key, value FROM meta WHERE key LIKE %s

-- name: delete_meta
DELETE FROM meta WHERE key=%s

-- ===== the event log (store/tx.py, Store) =====

-- name: bump_event_seq
UPDATE meta SET value=CAST(CAST(value AS BIGINT)+%s AS TEXT) WHERE key='event_seq'
RETURNING value

-- many rows (Database.run_many: one array per column)
-- name: insert_events
INSERT INTO events (id, at, channel, node, task_id, body)
SELECT * FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[], %b::text[],
                     %b::text[])

-- name: delete_events_through
DELETE FROM events WHERE id <= %s

-- name: event_body
SELECT body FROM events WHERE id=%s

-- name: events_after
SELECT id, body FROM events WHERE id > %s AND id <= %s ORDER BY id LIMIT %s

-- ===== tasks: writes =====

-- args: 16 values common to every row, then the list of nodes
-- name: insert_tasks
INSERT INTO tasks (node, id, type, spec, source, state, created_at, updated_at, dispatched_at,
                   timeout, expires_at, expires_ts, deadline, job_id, step, retry, hold)
SELECT r.node, %s, %s, %s, %s, %s, %s, %s, %s, %s::double precision, %s,
       %s::double precision, %s::double precision, %s, %s::integer, %s, %s
FROM unnest(%b::text[]) WITH ORDINALITY AS r(node, n) ORDER BY r.n
ON CONFLICT DO NOTHING RETURNING *

-- name: lock_task_spec
SELECT spec FROM tasks WHERE node=%s AND id=%s FOR UPDATE

-- name: fill_task_spec
UPDATE tasks SET spec=%s, type=%s, timeout=%s, expires_at=%s WHERE node=%s AND id=%s

-- name: task_expires_at
SELECT expires_at FROM tasks WHERE node=%s AND id=%s

-- The guarded UPDATEs of a task's state (Store._transition): applied only from one of the
-- states listed (the last argument, a list); each returns the row with the state it left
-- (`previous`). An agent's updates are stepped in memory instead (store/advance.py).
-- args: state, updated_at, dispatched_at, deadline, expires_ts, node, id, sources
-- name: transition_dispatched
UPDATE tasks SET previous=state, state=%s, updated_at=%s, dispatched_at=%s, deadline=%s,
    expires_ts=%s
WHERE node=%s AND id=%s AND state = ANY(%s::text[])
RETURNING *

-- args: state, updated_at, error_code, error_message, node, id, sources
-- name: transition_verdict
UPDATE tasks SET previous=state, state=%s, updated_at=%s, deadline=NULL, expires_ts=NULL,
    error_code=%s, error_message=%s
WHERE node=%s AND id=%s AND state = ANY(%s::text[])
RETURNING *

-- The rows of many (node, id) keys, each found through the (node, id) index, locked in key
-- order (the caller sorts them; two instances never deadlock on each other). One probe of
-- the unique index per key, whatever the statistics say: LIMIT keeps the subquery a loop
-- over the keys. A semi-join here was planned as a hash over a scan of the whole table when
-- the table was small, and psycopg's prepared statement kept that plan as it grew (a
-- one-task POST read every task).
-- args: Rows(node, id)
-- name: tasks_by_keys
SELECT t.* FROM unnest(%b::text[], %b::text[]) AS k(node, id) CROSS JOIN LATERAL
(SELECT * FROM tasks WHERE tasks.node = k.node AND tasks.id = k.id LIMIT 1) AS t
ORDER BY t.node, t.id

-- name: lock_tasks_by_keys
SELECT t.* FROM unnest(%b::text[], %b::text[]) AS k(node, id) CROSS JOIN LATERAL
(SELECT * FROM tasks WHERE tasks.node = k.node AND tasks.id = k.id LIMIT 1 FOR UPDATE) AS t
ORDER BY t.node, t.id

-- one task row after the steps of a batch (store/advance.py: WRITTEN's columns, node, id)
-- name: write_task
UPDATE tasks SET previous=%s, state=%s, updated_at=%s, dispatched_at=%s, deadline=%s,
    expires_ts=%s, exit_code=%s, error_code=%s, error_message=%s, result=%s
WHERE node=%s AND id=%s

-- name: insert_update
INSERT INTO updates (node, task_id, state, at, received_at, body) VALUES (%s,%s,%s,%s,%s,%s)

-- many rows (Database.run_many: one array per column), in their order
-- name: insert_updates
INSERT INTO updates (node, task_id, state, at, received_at, body)
SELECT r.node, r.task_id, r.state, r.at, r.received_at, r.body
FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[])
    WITH ORDINALITY AS r(node, task_id, state, at, received_at, body, n) ORDER BY r.n

-- name: insert_placeholder_task
INSERT INTO tasks (node, id, source, state, created_at, updated_at)
VALUES (%s,%s,%s,%s,%s,%s)
ON CONFLICT DO NOTHING

-- name: delete_placeholder_task
DELETE FROM tasks WHERE node=%s AND id=%s AND state='__new__'

-- the first copy of each state is part of the record, applied or not
-- name: insert_late_update
INSERT INTO updates (node, task_id, state, at, received_at, body)
SELECT %s,%s,%s,%s,%s,%s WHERE EXISTS (SELECT 1 FROM tasks WHERE node=%s AND id=%s)
AND NOT EXISTS (SELECT 1 FROM updates WHERE node=%s AND task_id=%s AND state=%s)

-- name: insert_rejected_update
INSERT INTO updates (node, task_id, state, at, received_at, body) VALUES (%s,NULL,%s,%s,%s,%s)

-- name: extend_deadlines
UPDATE tasks SET deadline=%s WHERE node=%s AND state=%s AND deadline IS NOT NULL AND deadline < %s

-- ===== tasks: reads =====

-- name: get_task
SELECT * FROM tasks WHERE node=%s AND id=%s

-- name: find_tasks
SELECT * FROM tasks WHERE id=%s ORDER BY seq

-- args: task id: whether any node has it (one row of the index)
-- name: task_exists
SELECT 1 FROM tasks WHERE id=%s AND state != '__new__' LIMIT 1

-- the agent's order of a task's states, whatever order they arrived in (several
-- instances, redelivery); the same rank keeps arrival order
-- name: task_history
SELECT body, received_at FROM updates WHERE node=%s AND task_id=%s ORDER BY
CASE state WHEN 'queued' THEN 0 WHEN 'dispatched' THEN 1 WHEN 'accepted' THEN 2
WHEN 'running' THEN 3 ELSE 4 END, seq

-- Newest first, older than :before, filtered: one query per leading filter (node, job,
-- state, none), each led by its index; the other filters are optional (NULL: any).
-- name: task_page
SELECT * FROM tasks WHERE state != '__new__' AND seq < %(before)s
ORDER BY seq DESC LIMIT %(limit)s

-- name: task_page_by_node
SELECT * FROM tasks WHERE node = %(node)s AND state != '__new__' AND seq < %(before)s
AND (%(state)s::text IS NULL OR state = %(state)s) AND (%(job)s::text IS NULL OR job_id = %(job)s)
ORDER BY seq DESC LIMIT %(limit)s

-- name: task_page_by_job
SELECT * FROM tasks WHERE job_id = %(job)s AND state != '__new__' AND seq < %(before)s
AND (%(state)s::text IS NULL OR state = %(state)s)
ORDER BY seq DESC LIMIT %(limit)s

-- name: task_page_by_state
SELECT * FROM tasks WHERE state = %(state)s AND state != '__new__' AND seq < %(before)s
ORDER BY seq DESC LIMIT %(limit)s

-- name: due_tasks
SELECT * FROM tasks WHERE (deadline IS NOT NULL AND deadline <= %s)
OR (expires_ts IS NOT NULL AND expires_ts <= %s) ORDER BY seq

-- name: count_tasks_by_state
SELECT state, COUNT(*) AS n FROM tasks GROUP BY state

-- args: states (a list): the count of each, from the index, for the states not final
-- name: count_tasks_in_states
SELECT state, COUNT(*) AS n FROM tasks WHERE state = ANY(%s::text[]) GROUP BY state

-- args: changed since: nodes not online that went so since then, newest first
-- name: overview_recently_lost
SELECT node, changed_at FROM nodes WHERE state != 'online' AND state != '__new__'
AND changed_at >= %s ORDER BY changed_at DESC

-- name: stale_queued
SELECT * FROM tasks WHERE state=%s AND job_id IS NULL AND spec IS NOT NULL AND created_at < %s
ORDER BY seq

-- name: unaccepted
SELECT * FROM tasks WHERE node=%s AND state=%s AND spec IS NOT NULL ORDER BY seq

-- name: task_ids_with_prefix
SELECT DISTINCT id FROM tasks WHERE id >= %s AND id < %s AND state != '__new__'
ORDER BY id LIMIT %s

-- ===== retention =====

-- args: updated before, final states (a list), batch
-- name: prune_pick_tasks
SELECT seq FROM tasks WHERE updated_at < %s AND state = ANY(%s::text[])
ORDER BY seq LIMIT %s

-- the updates of those tasks, found by their index (updates_by_task)
-- name: prune_task_updates
DELETE FROM updates WHERE (node, task_id) IN
(SELECT node, id FROM tasks WHERE seq = ANY(%s::bigint[]))

-- name: prune_tasks
DELETE FROM tasks WHERE seq = ANY(%s::bigint[])

-- name: prune_orphan_updates
DELETE FROM updates WHERE seq IN (SELECT seq FROM updates
WHERE task_id IS NULL AND received_at < %s LIMIT %s)

-- name: prune_jobs
DELETE FROM jobs WHERE created_at < %s AND NOT EXISTS (SELECT 1 FROM tasks t
WHERE t.job_id=jobs.id)

-- ===== nodes =====

-- name: touch_nodes
UPDATE nodes SET last_seen=%s WHERE node = ANY(%s::text[])

-- name: insert_node_placeholder
INSERT INTO nodes (node, state, first_seen, last_seen, changed_at) VALUES (%s,%s,%s,%s,%s)
ON CONFLICT DO NOTHING

-- name: lock_node_state
SELECT state FROM nodes WHERE node=%s FOR UPDATE

-- name: update_node_status
UPDATE nodes SET state=%s, last_seen=%s, changed_at=CASE WHEN state=%s THEN changed_at ELSE %s END,
agent=COALESCE(%s, agent), facts=COALESCE(%s, facts), running=%s WHERE node=%s

-- a page of nodes in id order after :after ('' for the first: node ids are never empty),
-- by the primary key; :state NULL: any
-- name: node_page
SELECT * FROM nodes WHERE node > %(after)s AND (%(state)s::text IS NULL OR state = %(state)s)
ORDER BY node LIMIT %(limit)s

-- name: count_nodes
SELECT COUNT(*) FROM nodes WHERE (%(state)s::text IS NULL OR state = %(state)s)

-- name: get_node
SELECT * FROM nodes WHERE node=%s

-- args: low, high (a prefix's range on the primary key): ids and states, no facts
-- name: node_states_in_range
SELECT node, state FROM nodes WHERE node >= %s AND node < %s ORDER BY node

-- args: node ids (a list)
-- name: nodes_by_ids
SELECT * FROM nodes WHERE node = ANY(%s::text[]) ORDER BY node

-- args: node ids (a list): ids and states, no facts
-- name: node_states_by_ids
SELECT node, state FROM nodes WHERE node = ANY(%s::text[])

-- args: low, high, limit
-- name: node_ids_in_range
SELECT node FROM nodes WHERE node >= %s AND node < %s ORDER BY node LIMIT %s

-- name: list_nodes
SELECT * FROM nodes ORDER BY node

-- name: count_nodes_by_state
SELECT state, COUNT(*) AS n FROM nodes GROUP BY state

-- name: online_nodes
SELECT node FROM nodes WHERE state='online'

-- name: delete_node
DELETE FROM nodes WHERE node=%s

-- ===== jobs =====

-- name: insert_job
INSERT INTO jobs (id, created_at, nodes, steps, created_by) VALUES (%s,%s,%s,%s,%s)

-- name: get_job
SELECT * FROM jobs WHERE id=%s

-- name: job_tasks
SELECT * FROM tasks WHERE job_id=%s ORDER BY node, step

-- name: job_steps
SELECT * FROM tasks WHERE job_id=%s AND node=%s ORDER BY step

-- job steps that may go now: queued, and every earlier step of the node succeeded
-- name: queued_job_heads
SELECT * FROM tasks t WHERE t.job_id IS NOT NULL AND t.state='queued' AND NOT EXISTS
(SELECT 1 FROM tasks p WHERE p.job_id=t.job_id AND p.node=t.node AND p.step < t.step
 AND p.state != 'succeeded') ORDER BY seq

-- name: list_jobs
SELECT id, created_at, nodes, steps FROM jobs WHERE created_at < %s
ORDER BY created_at DESC, id DESC LIMIT %s

-- name: job_progress
SELECT step, state, COUNT(*) AS n FROM tasks WHERE job_id=%s GROUP BY step, state

-- name: job_target_nodes
SELECT DISTINCT node FROM tasks WHERE job_id=%s AND node > %s ORDER BY node LIMIT %s

-- name: job_target_rows
SELECT node, id, step, state, exit_code, error_code, updated_at FROM tasks
WHERE job_id=%s AND node = ANY(%s::text[]) ORDER BY node, step

-- ===== API tokens =====

-- name: insert_token
INSERT INTO tokens (name, role, hash, hint, created_at, created_by)
VALUES (%s,%s,%s,%s,%s,%s)
ON CONFLICT DO NOTHING

-- name: token_by_name
SELECT * FROM tokens WHERE name=%s

-- name: token_by_hash
SELECT * FROM tokens WHERE hash=%s AND revoked_at IS NULL

-- name: list_tokens
SELECT * FROM tokens ORDER BY id

-- name: count_tokens
SELECT COUNT(*) FROM tokens

-- name: revoke_token
UPDATE tokens SET revoked_at=%s WHERE name=%s AND revoked_at IS NULL

-- name: touch_token
UPDATE tokens SET last_used_at=%s WHERE id=%s

-- ===== stream tickets =====

-- args: digest, name, role, token id, expires at (seconds since 1970)
-- name: insert_ticket
INSERT INTO stream_tickets (digest, name, role, token_id, expires_at) VALUES (%s, %s, %s, %s, %s)

-- args: digest: the ticket, taken once (whoever deletes it has it)
-- name: take_ticket
DELETE FROM stream_tickets WHERE digest=%s RETURNING name, role, token_id, expires_at

-- args: now
-- name: prune_tickets
DELETE FROM stream_tickets WHERE expires_at < %s

-- name: count_tickets
SELECT COUNT(*) FROM stream_tickets

-- args: how many: the tickets that expire first
-- name: drop_oldest_tickets
DELETE FROM stream_tickets WHERE digest IN
(SELECT digest FROM stream_tickets ORDER BY expires_at LIMIT %s)

-- ===== fleet operations (store/fleetdb.py) =====
-- A queued task is free to go with no hold (or a lapsed claim `sending:...`: hold LIKE ?
-- and not_before <= now) once its back-off is over; outstanding: held by the node
-- (dispatched, accepted, running: a list) or claimed for sending and not lapsed.

-- name: fleet_outstanding
SELECT COUNT(*) FROM tasks WHERE node=%s AND (state = ANY(%s::text[])
OR (state='queued' AND hold LIKE %s AND not_before > %s))

-- name: fleet_has_queued
SELECT 1 FROM tasks WHERE node=%s AND state='queued' LIMIT 1

-- name: lock_node
SELECT node FROM nodes WHERE node=%s FOR UPDATE

-- args: sending-like, now, now, node, limit
-- name: fleet_ready_on_node
SELECT * FROM tasks WHERE state='queued' AND spec IS NOT NULL
AND (hold IS NULL OR (hold LIKE %s AND not_before <= %s)) AND (not_before IS NULL OR not_before <= %s)
AND node=%s ORDER BY seq LIMIT %s

-- name: fleet_claim
UPDATE tasks SET hold=%s, not_before=%s WHERE node=%s AND id=%s

-- args: sending-like, now, now, nodes (a list)
-- name: fleet_ready_on_nodes
SELECT * FROM tasks WHERE state='queued' AND spec IS NOT NULL
AND (hold IS NULL OR (hold LIKE %s AND not_before <= %s)) AND (not_before IS NULL OR not_before <= %s)
AND node = ANY(%s::text[]) ORDER BY seq

-- name: lock_nodes
SELECT node FROM nodes WHERE node = ANY(%s::text[]) ORDER BY node FOR UPDATE

-- args: nodes, outstanding states, sending-like, now
-- name: fleet_outstanding_by_node
SELECT node, COUNT(*) FROM tasks WHERE node = ANY(%s::text[])
AND (state = ANY(%s::text[]) OR (state='queued' AND hold LIKE %s AND not_before > %s))
GROUP BY node

-- name: fleet_claim_seqs
UPDATE tasks SET hold=%s, not_before=%s WHERE seq = ANY(%s::bigint[])

-- args: sending-like, now, now, outstanding states, sending-like, now, pace
-- name: fleet_nodes_with_ready
SELECT q.node FROM (SELECT DISTINCT node FROM tasks WHERE state='queued' AND spec IS NOT NULL
AND (hold IS NULL OR (hold LIKE %s AND not_before <= %s)) AND (not_before IS NULL OR not_before <= %s)
) q WHERE (SELECT COUNT(*) FROM tasks t WHERE t.node=q.node
AND (t.state = ANY(%s::text[])
OR (t.state='queued' AND t.hold LIKE %s AND t.not_before > %s))) < %s

-- name: fleet_next_not_before
SELECT MIN(not_before) FROM tasks WHERE state='queued' AND not_before IS NOT NULL

-- name: fleet_in_flight
SELECT * FROM tasks WHERE node=%s AND state = ANY(%s::text[]) ORDER BY seq

-- name: fleet_stranded
SELECT t.* FROM tasks t JOIN nodes n ON n.node=t.node WHERE n.state='offline'
AND n.changed_at <= %s AND (t.state IN ('accepted','running') OR
(t.state='dispatched' AND t.rollout_id IS NOT NULL)) ORDER BY t.seq

-- name: fleet_expired_queued
SELECT * FROM tasks WHERE state='queued' AND expires_at IS NOT NULL AND expires_at < %s
ORDER BY seq

-- name: fleet_attempts
SELECT * FROM tasks WHERE node=%s AND (id=%s OR root_id=%s) ORDER BY seq

-- name: fleet_rollout_states
SELECT node, id, state, hold, not_before, attempt, error_code, error_message, retry
FROM tasks WHERE rollout_id=%s ORDER BY seq

-- name: fleet_rollout_tasks
SELECT * FROM tasks WHERE rollout_id=%s ORDER BY seq

-- name: fleet_job_unsucceeded
SELECT COUNT(*) FROM tasks WHERE job_id=%s AND id = ANY(%s::text[])
AND state <> 'succeeded'

-- name: fleet_job_held
SELECT node FROM tasks WHERE job_id=%s AND id=%s AND state='queued' AND hold='job'

-- name: fleet_job_release
UPDATE tasks SET hold=NULL WHERE job_id=%s AND id=%s AND state='queued' AND hold='job'

-- name: fleet_job_queued
SELECT node, id, state, hold, not_before FROM tasks WHERE job_id=%s AND id=%s AND state='queued'

-- the fleet columns of one task: each set only when its :set_<column> is true
-- name: fleet_set_task
UPDATE tasks SET
    hold = CASE WHEN %(set_hold)s::boolean THEN %(hold)s ELSE hold END,
    not_before = CASE WHEN %(set_not_before)s::boolean THEN %(not_before)s ELSE not_before END,
    attempt = CASE WHEN %(set_attempt)s::boolean THEN %(attempt)s ELSE attempt END,
    parent_id = CASE WHEN %(set_parent_id)s::boolean THEN %(parent_id)s ELSE parent_id END,
    root_id = CASE WHEN %(set_root_id)s::boolean THEN %(root_id)s ELSE root_id END,
    retry = CASE WHEN %(set_retry)s::boolean THEN %(retry)s ELSE retry END,
    rollout_id = CASE WHEN %(set_rollout_id)s::boolean THEN %(rollout_id)s ELSE rollout_id END
WHERE node = %(node)s AND id = %(id)s

-- name: fleet_drop_claims
UPDATE tasks SET hold=NULL, not_before=NULL WHERE state='queued' AND hold LIKE %s

-- args: until, seqs (a list), hold
-- name: fleet_renew_claims
UPDATE tasks SET not_before=%s WHERE seq = ANY(%s::bigint[])
AND state='queued' AND hold=%s

-- name: fleet_release
UPDATE tasks SET hold=NULL WHERE node=%s AND id=%s AND state='queued' AND hold IN ('job', 'rollout')

-- ===== rollouts =====

-- name: lock_rollout
SELECT state, released_at FROM rollouts WHERE id=%s FOR UPDATE

-- args: rollout id, final states (a list)
-- name: rollout_active
SELECT COUNT(*) FROM tasks WHERE rollout_id=%s AND state <> ALL(%s::text[])
AND (hold IS NULL OR hold <> 'rollout')

-- name: rollout_release_task
UPDATE tasks SET hold=NULL WHERE node=%s AND id=%s AND state='queued' AND hold='rollout'

-- name: rollout_set_released
UPDATE rollouts SET released_at=%s WHERE id=%s

-- name: insert_rollout
INSERT INTO rollouts (id, task_id, created_at, updated_at, state, options, nodes)
VALUES (%s,%s,%s,%s,%s,%s,%s)

-- name: get_rollout
SELECT * FROM rollouts WHERE id=%s

-- name: list_rollouts
SELECT * FROM rollouts WHERE (%(state)s::text IS NULL OR state = %(state)s)
ORDER BY created_at DESC LIMIT %(limit)s

-- a column is changed when its value is not NULL; with :expect (a list), only in those states
-- name: set_rollout
UPDATE rollouts SET updated_at = %(now)s, state = COALESCE(%(state)s, state),
    reason = COALESCE(%(reason)s, reason), released_at = COALESCE(%(released_at)s, released_at)
WHERE id = %(id)s AND (%(expect)s::text[] IS NULL OR state = ANY(%(expect)s::text[]))

-- ===== idempotency keys (store/idempotency.py) =====

-- name: idem_reserve
INSERT INTO idempotency (owner, key, fingerprint, created_at) VALUES (%s,%s,%s,%s)
ON CONFLICT DO NOTHING

-- name: idem_lock
SELECT fingerprint, status, response, created_at FROM idempotency WHERE owner=%s AND key=%s FOR UPDATE

-- name: idem_insert
INSERT INTO idempotency (owner, key, fingerprint, created_at) VALUES (%s,%s,%s,%s)

-- name: idem_refresh
UPDATE idempotency SET created_at=%s WHERE owner=%s AND key=%s

-- name: idem_finish
UPDATE idempotency SET status=%s, response=%s WHERE owner=%s AND key=%s

-- name: idem_abandon
DELETE FROM idempotency WHERE owner=%s AND key=%s AND status IS NULL

-- name: idem_prune
DELETE FROM idempotency WHERE created_at < %s

-- ===== the console's overview and job view (api/overview.py) =====

-- name: overview_failed_since
SELECT COUNT(*) AS n FROM tasks WHERE updated_at >= %s AND state = ANY(%s::text[])

-- args: failed states (a list), how many: newest first (tasks_by_updated, backwards)
-- name: overview_latest_failures
SELECT node, id, type, state, exit_code, error_code, error_message, updated_at, job_id
FROM tasks WHERE state = ANY(%(states)s::text[])
ORDER BY updated_at DESC, seq DESC LIMIT %(limit)s

-- name: overview_outcomes
SELECT substr(updated_at, 1, 16) AS minute, state, COUNT(*) AS n FROM tasks
WHERE updated_at >= %s AND state = ANY(%s::text[]) GROUP BY minute, state

-- name: overview_node_events
SELECT at, body FROM events WHERE channel='nodes' AND at >= %s ORDER BY id DESC

-- name: job_state_counts
SELECT state, COUNT(*) AS n FROM tasks WHERE job_id=%s GROUP BY state

-- args: final states (a list), job id
-- name: job_times
SELECT MIN(dispatched_at) AS started, MAX(updated_at) AS ended,
SUM(CASE WHEN state = ANY(%s::text[]) THEN 0 ELSE 1 END) AS open
FROM tasks WHERE job_id=%s

-- name: job_row
SELECT id, created_at, nodes, steps FROM jobs WHERE id=%s

-- name: job_created_by
SELECT created_by FROM jobs WHERE id=%s

-- name: job_creator_from_audit
SELECT body FROM events WHERE channel='audit' AND body LIKE %s ESCAPE '!' ORDER BY id LIMIT 1

-- failures first, then the running, then the rest; by node and step within each;
-- :states (a list) filters when not NULL
-- name: job_tasks_page
SELECT node, id, step, state, exit_code, error_code, error_message, updated_at FROM tasks
WHERE job_id = %(job)s AND (%(states)s::text[] IS NULL OR state = ANY(%(states)s::text[]))
ORDER BY CASE WHEN state = ANY(%(bad)s::text[]) THEN 0
WHEN state = ANY(%(active)s::text[]) THEN 1 ELSE 2 END, node, step
LIMIT %(limit)s OFFSET %(offset)s
