-- Every statement the worker runs, one per "-- name:" block, bound with named parameters.
-- Statements that write noetl.command always name execution_id, so that one hash partition
-- is touched per row.

-- name: claim_commands
-- Claim up to `limit` PENDING commands of the given tool kinds in one transaction.
-- The row lock (SKIP LOCKED) keeps other pgworkers away; the advisory lock on the command id is
-- the one NoETL's server takes in its HTTP claim, so that the two never both win a row.
-- Commands whose execution already has a terminal event are marked CANCELLED, not run.
-- Candidates: the oldest PENDING rows of each of this worker's kinds, and of no kind (NULL, so
-- that they are failed as malformed), merged oldest first. Each kind is read in order from
-- pgworker_command_kind_claim_idx (tool_kind, created_at, command_id), so a backlog of kinds
-- this worker does not run is never read. `tool_kind >= k AND tool_kind <= k` is an equality
-- the planner cannot fold away: ordering by tool_kind first then only that index provides,
-- whatever the statistics say. Up to `limit` rows of each kind are locked; the rest are
-- released when the transaction ends.
WITH candidate AS MATERIALIZED (
    SELECT p.execution_id, p.command_id, p.attempt
    FROM (
        SELECT c.execution_id, c.command_id, c.created_at, c.attempt
        FROM (SELECT DISTINCT kind
                FROM unnest(%(tool_kinds)s::text[]) AS kind
               WHERE kind <> 'wasm'
                 -- paused for every worker (`noetl-pgworker pause KIND`)
                 AND NOT EXISTS (SELECT 1 FROM noetl.pgworker_paused_kind AS p
                                  WHERE p.tool_kind = kind)) AS k
        CROSS JOIN LATERAL (
            SELECT c.execution_id, c.command_id, c.created_at, c.attempt
            FROM noetl.command AS c
            WHERE c.status = 'PENDING'
              AND c.tool_kind >= k.kind AND c.tool_kind <= k.kind
              AND c.step_name <> '__orchestrate__'
            ORDER BY c.tool_kind, c.created_at, c.command_id
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ) AS c
        UNION ALL
        SELECT n.execution_id, n.command_id, n.created_at, n.attempt
        FROM (
            -- No kind, or not a kind at all ('', ' python ', 'Python'): every worker claims
            -- these, to fail them as malformed (pgworker_command_badkind_idx holds only them).
            SELECT c.execution_id, c.command_id, c.created_at, c.attempt
            FROM noetl.command AS c
            WHERE c.status = 'PENDING'
              AND (c.tool_kind IS NULL OR c.tool_kind !~ '^[a-z][a-z0-9_]*$')
              AND c.step_name <> '__orchestrate__'
            ORDER BY c.created_at, c.command_id
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ) AS n
    ) AS p
    ORDER BY p.created_at, p.command_id
    LIMIT %(limit)s
),
ended AS MATERIALIZED (
    -- Once per execution of the batch, not per command (a batch is mostly a few executions'
    -- commands): has it ended? One index probe per terminal event type.
    SELECT x.execution_id,
           (SELECT e.event_type
              FROM noetl.event AS e
             WHERE e.execution_id = x.execution_id
               AND e.event_type IN ('playbook.completed', 'playbook.failed',
                                    'workflow.completed', 'workflow.failed',
                                    'execution.cancelled')
             LIMIT 1) AS ended_by
    FROM (SELECT DISTINCT execution_id FROM candidate) AS x
),
locked AS MATERIALIZED (
    SELECT k.execution_id, k.command_id, k.attempt, d.ended_by
    FROM candidate AS k
    JOIN ended AS d ON d.execution_id = k.execution_id
    -- A command taken back from a dead (or paused) worker and put back to PENDING may still be
    -- locked by that worker's claim session: it is claimed anyway (row lock and status decide).
    WHERE pg_try_advisory_xact_lock(k.command_id) OR k.attempt > 1
),
to_claim AS MATERIALIZED (
    -- A session-level lock too (granted at once: this session holds the transaction-level
    -- one), held by the claim session until the outcome is written, so that NoETL's HTTP claim
    -- cannot take the row in the moment after this transaction commits. Not when
    -- `session_locks` is false (a transaction-pooling proxy: there is no session to hold it).
    SELECT l.execution_id, l.command_id, noetl.snowflake_id() AS claim_event_id
    FROM locked AS l
    WHERE CASE WHEN l.ended_by IS NULL
               THEN (NOT %(session_locks)s::boolean OR pg_try_advisory_lock(l.command_id)
                     OR l.attempt > 1)
               ELSE false END
),
cancelled AS (
    UPDATE noetl.command AS c
    SET status = 'CANCELLED',
        error = 'not run: execution ' || c.execution_id || ' already ended (' || l.ended_by || ')',
        completed_at = now(),
        updated_at = now()
    FROM locked AS l
    WHERE l.ended_by IS NOT NULL
      AND c.execution_id = l.execution_id
      AND c.command_id = l.command_id
    RETURNING c.command_id
),
claimed AS (
    UPDATE noetl.command AS c
    SET status = 'CLAIMED',
        worker_id = %(worker_id)s,
        claimed_at = now(),
        latest_event_id = t.claim_event_id,
        updated_at = now()
    FROM to_claim AS t
    WHERE c.execution_id = t.execution_id
      AND c.command_id = t.command_id
    -- context and meta as text: the worker parses each row alone, so that one row it cannot
    -- parse (nested thousands deep, say) fails alone instead of failing the whole claim.
    RETURNING c.command_id, c.event_id, c.execution_id, c.catalog_id, c.parent_execution_id,
              c.parent_command_id, c.step_name, c.tool_kind, c.attempt, c.context::text AS context,
              c.meta::text AS meta, c.meta -> 'command_id' AS meta_command_id, c.loop_event_id,
              c.iter_index, c.created_at, c.claimed_at, t.claim_event_id
),
claim_events AS (
    INSERT INTO noetl.event (
        execution_id, catalog_id, event_id, parent_execution_id, created_at, event_type,
        node_id, node_name, status, result, meta, worker_id, command_id
    )
    SELECT m.execution_id, m.catalog_id, m.claim_event_id, m.parent_execution_id, now(),
           'command.claimed', m.step_name, m.step_name, 'RUNNING',
           jsonb_build_object('status', 'RUNNING',
                              'context', jsonb_build_object('command_id', m.command_id)),
           jsonb_build_object('command_id', COALESCE(m.meta_command_id, to_jsonb(m.command_id)),
                              'worker_id', %(worker_id)s::text,
                              'actionable', false,
                              'informative', true),
           %(worker_id)s, m.command_id
    FROM claimed AS m
)
-- Always at least one row: the count of cancelled rows, joined to the claimed ones (a row with
-- a NULL command_id means "nothing claimed").
SELECT x.cancelled_count, m.*
FROM (SELECT count(*) AS cancelled_count FROM cancelled) AS x
LEFT JOIN claimed AS m ON true
ORDER BY m.created_at, m.command_id;

-- name: reclaim_commands
-- Take back commands whose worker died: claimed or running for longer than the lease, by a
-- worker whose noetl.runtime row is missing, not ready, or has a heartbeat older than
-- stale_after seconds. Never touches a command whose worker is alive. The worker also takes
-- back claims in its own name that it does not hold (`known` lists those it holds): left by a
-- previous life under the same worker id, or by a claim whose reply was lost in an outage.
-- A command that was already run max_attempts times ends FAILED instead ("poison").
WITH candidate AS MATERIALIZED (
    SELECT c.execution_id, c.command_id, c.worker_id AS old_worker, c.attempt,
           CASE
               WHEN c.worker_id = %(worker_id)s THEN 'orphaned'
               WHEN r.name IS NULL THEN 'worker not registered'
               WHEN r.status <> 'ready' THEN 'worker ' || r.status
               ELSE 'heartbeat stale'
           END AS reason
    FROM noetl.command AS c
    LEFT JOIN noetl.runtime AS r ON r.kind = 'worker_pool' AND r.name = c.worker_id
    WHERE c.status IN ('CLAIMED', 'RUNNING')
      AND (c.tool_kind = ANY(%(tool_kinds)s::text[]) OR c.tool_kind IS NULL)
      AND c.tool_kind IS DISTINCT FROM 'wasm'
      AND c.step_name <> '__orchestrate__'
      AND (
          (c.worker_id = %(worker_id)s AND NOT (c.command_id = ANY(%(known)s::bigint[])))
          OR (
              c.worker_id IS DISTINCT FROM %(worker_id)s
              -- A row put in flight without claimed_at (by hand, or another tool) ages from
              -- its last update instead of never.
              AND COALESCE(c.claimed_at, c.updated_at) < now() - make_interval(secs => %(lease)s)
              AND (r.name IS NULL
                   OR r.status <> 'ready'
                   OR r.heartbeat < now() - make_interval(secs => %(stale_after)s))
          )
      )
    ORDER BY COALESCE(c.claimed_at, c.updated_at)
    LIMIT %(limit)s
    FOR UPDATE OF c SKIP LOCKED
),
locked AS MATERIALIZED (
    -- Taken back: locked at session level like a fresh claim (see claim_commands).
    SELECT k.*, noetl.snowflake_id() AS event_id, k.attempt >= %(max_attempts)s AS poisoned,
           CASE WHEN k.attempt < %(max_attempts)s
                THEN (NOT %(session_locks)s::boolean OR pg_try_advisory_lock(k.command_id))
                ELSE false END AS session_locked
    FROM candidate AS k
    -- A dead (or paused, or cut off) worker's claim session may still hold its session lock
    -- on the command: waiting for it would leave the command stuck for as long as that
    -- connection lives. Its claim is stale by the heartbeat, so it is taken back anyway; NoETL's
    -- HTTP claim is kept off by that same lock. A claim in this worker's own name is taken
    -- only under the lock.
    WHERE pg_try_advisory_xact_lock(k.command_id) OR k.reason <> 'orphaned'
),
poisoned AS (
    UPDATE noetl.command AS c
    SET status = 'FAILED',
        error = 'abandoned by ' || l.attempt || ' worker(s) (last: ' || COALESCE(l.old_worker, '?')
                || ', ' || l.reason || '); not retried after ' || %(max_attempts)s || ' attempts',
        result = jsonb_build_object(
            'status', 'FAILED',
            'context', jsonb_build_object(
                'error', 'abandoned by ' || l.attempt || ' worker(s)',
                'error_type', 'abandoned',
                'command_id', COALESCE(c.meta -> 'command_id', to_jsonb(c.command_id)),
                'worker_id', %(worker_id)s::text)),
        worker_id = %(worker_id)s,
        completed_at = now(),
        latest_event_id = l.event_id,
        updated_at = now()
    FROM locked AS l
    WHERE l.poisoned AND c.execution_id = l.execution_id AND c.command_id = l.command_id
    RETURNING c.execution_id, c.catalog_id, c.parent_execution_id, c.step_name, c.command_id,
              c.meta, c.error, c.result, l.event_id
),
poison_events AS (
    INSERT INTO noetl.event (
        execution_id, catalog_id, event_id, parent_execution_id, created_at, event_type,
        node_id, node_name, status, result, meta, error, worker_id, command_id
    )
    SELECT p.execution_id, p.catalog_id, p.event_id, p.parent_execution_id, now(),
           'command.failed', p.step_name, p.step_name, 'FAILED', p.result,
           jsonb_build_object('command_id', COALESCE(p.meta -> 'command_id', to_jsonb(p.command_id)),
                              'worker_id', %(worker_id)s::text, 'actionable', false,
                              'informative', true, 'error_type', 'abandoned'),
           p.error, %(worker_id)s, p.command_id
    FROM poisoned AS p
),
reclaimed AS (
    UPDATE noetl.command AS c
    SET status = 'CLAIMED',
        worker_id = %(worker_id)s,
        claimed_at = now(),
        attempt = c.attempt + 1,
        latest_event_id = l.event_id,
        updated_at = now()
    FROM locked AS l
    WHERE NOT l.poisoned AND c.execution_id = l.execution_id AND c.command_id = l.command_id
    RETURNING c.command_id, c.event_id, c.execution_id, c.catalog_id, c.parent_execution_id,
              c.parent_command_id, c.step_name, c.tool_kind, c.attempt, c.context::text AS context,
              c.meta::text AS meta, c.meta -> 'command_id' AS meta_command_id, c.loop_event_id,
              c.iter_index, c.created_at, c.claimed_at, l.event_id AS claim_event_id,
              l.old_worker, l.reason
),
reclaim_events AS (
    INSERT INTO noetl.event (
        execution_id, catalog_id, event_id, parent_execution_id, created_at, event_type,
        node_id, node_name, status, result, meta, worker_id, command_id
    )
    SELECT m.execution_id, m.catalog_id, m.claim_event_id, m.parent_execution_id, now(),
           'command.claimed', m.step_name, m.step_name, 'RUNNING',
           jsonb_build_object('status', 'RUNNING',
                              'context', jsonb_build_object('command_id', m.command_id)),
           jsonb_build_object('command_id', COALESCE(m.meta_command_id, to_jsonb(m.command_id)),
                              'worker_id', %(worker_id)s::text,
                              'actionable', false,
                              'informative', true,
                              'reclaimed', true,
                              'reclaimed_from_worker', m.old_worker,
                              'reason', m.reason,
                              'attempt', m.attempt),
           %(worker_id)s, m.command_id
    FROM reclaimed AS m
)
-- Always at least one row: the poisoned commands (count and references, for server mode to
-- report them), joined to the reclaimed ones.
SELECT x.poisoned_count, x.poisoned, m.*
FROM (
    SELECT count(*) AS poisoned_count,
           jsonb_agg(jsonb_build_object(
               'execution_id', p.execution_id, 'command_id', p.command_id,
               'catalog_id', p.catalog_id, 'step_name', p.step_name,
               'parent_execution_id', p.parent_execution_id,
               'meta', jsonb_build_object('command_id', p.meta -> 'command_id'),
               'error', p.error)) AS poisoned
    FROM poisoned AS p
) AS x
LEFT JOIN reclaimed AS m ON true
ORDER BY m.created_at, m.command_id;

-- name: write_back
-- Apply one batch of outcomes: row status and the lifecycle events, in one statement.
-- Fenced: only rows this worker still holds and that are not terminal change, and events are
-- written only for those rows. Returns the rows that changed; a missing row means the claim
-- was lost (taken over, or already terminal) and nothing was written for it.
-- The id arrays repeat what `items` holds: they let the planner prune partitions and use the
-- command_id index instead of scanning every partition for this worker's rows.
WITH item AS (
    SELECT *
    FROM jsonb_to_recordset(%(items)s::jsonb) AS i(
        execution_id bigint, command_id bigint, status text, started_at timestamptz,
        result jsonb, error text
    )
),
ev AS MATERIALIZED (
    SELECT e.*, noetl.snowflake_id() AS event_id
    FROM jsonb_to_recordset(%(events)s::jsonb) AS e(
        execution_id bigint, command_id bigint, catalog_id bigint, parent_execution_id bigint,
        event_type text, node_name text, status text, duration double precision,
        result jsonb, meta jsonb, error text
    )
),
last_event AS (
    SELECT ev.execution_id, ev.command_id, max(ev.event_id) AS event_id
    FROM ev
    GROUP BY ev.execution_id, ev.command_id
),
upd AS (
    -- PENDING: a command the worker's stop interrupted goes back to the queue, unclaimed.
    UPDATE noetl.command AS c
    SET status = i.status,
        worker_id = CASE WHEN i.status = 'PENDING' THEN NULL ELSE c.worker_id END,
        claimed_at = CASE WHEN i.status = 'PENDING' THEN NULL ELSE c.claimed_at END,
        started_at = CASE WHEN i.status = 'PENDING' THEN NULL
                          ELSE COALESCE(c.started_at, i.started_at) END,
        completed_at = CASE WHEN i.status IN ('COMPLETED', 'FAILED', 'CANCELLED')
                            THEN now() ELSE c.completed_at END,
        result = COALESCE(i.result, c.result),
        error = COALESCE(i.error, c.error),
        latest_event_id = COALESCE(le.event_id, c.latest_event_id),
        updated_at = now()
    FROM item AS i
    LEFT JOIN last_event AS le
           ON le.execution_id = i.execution_id AND le.command_id = i.command_id
    WHERE c.execution_id = i.execution_id
      AND c.command_id = i.command_id
      AND c.execution_id = ANY(%(execution_ids)s::bigint[])
      AND c.command_id = ANY(%(command_ids)s::bigint[])
      AND c.worker_id = %(worker_id)s
      AND c.status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')
    RETURNING c.execution_id, c.command_id
),
ins AS (
    INSERT INTO noetl.event (
        execution_id, catalog_id, event_id, parent_execution_id, created_at, event_type,
        node_id, node_name, status, duration, result, meta, error, worker_id, command_id
    )
    SELECT ev.execution_id, ev.catalog_id, ev.event_id, ev.parent_execution_id, now(),
           ev.event_type, ev.node_name, ev.node_name, ev.status, ev.duration, ev.result,
           ev.meta, ev.error, %(worker_id)s, ev.command_id
    FROM ev
    JOIN upd ON upd.execution_id = ev.execution_id AND upd.command_id = ev.command_id
    RETURNING 1
)
SELECT upd.execution_id, upd.command_id, (SELECT count(*) FROM ins) AS events_written,
       -- the doorbell, once, when a command went back to the queue
       (SELECT count(*) FROM (SELECT pg_notify('noetl_pgworker_command', '')
                                FROM item AS i
                               WHERE i.status = 'PENDING'
                               LIMIT 1) AS n) AS notified
FROM upd;

-- name: release_commands
-- Graceful shutdown: commands this worker claimed but never started go back to PENDING, and
-- the doorbell rings so that another worker picks them up at once.
WITH released AS (
    UPDATE noetl.command AS c
    SET status = 'PENDING',
        worker_id = NULL,
        claimed_at = NULL,
        updated_at = now()
    FROM jsonb_to_recordset(%(items)s::jsonb) AS i(execution_id bigint, command_id bigint)
    WHERE c.execution_id = i.execution_id
      AND c.command_id = i.command_id
      AND c.execution_id = ANY(%(execution_ids)s::bigint[])
      AND c.command_id = ANY(%(command_ids)s::bigint[])
      AND c.worker_id = %(worker_id)s
      AND c.status = 'CLAIMED'
    RETURNING c.command_id
)
SELECT count(*) AS released, pg_notify('noetl_pgworker_command', '') AS notified
FROM released;

-- name: runtime_heartbeat
-- Register this worker (or refresh its heartbeat): kind worker_pool, name = worker id.
INSERT INTO noetl.runtime (
    runtime_id, name, kind, uri, status, labels, capabilities, capacity, runtime,
    heartbeat, created_at, updated_at
)
VALUES (
    noetl.snowflake_id(), %(name)s, 'worker_pool', NULL, 'ready', %(labels)s::jsonb,
    %(capabilities)s::jsonb, %(capacity)s, %(runtime)s::jsonb, now(), now(), now()
)
ON CONFLICT (kind, name) DO UPDATE
SET status = 'ready',
    heartbeat = now(),
    updated_at = now(),
    labels = EXCLUDED.labels,
    capabilities = EXCLUDED.capabilities,
    capacity = EXCLUDED.capacity,
    runtime = EXCLUDED.runtime;

-- name: runtime_offline
-- A clean stop: offline, with the final figures.
UPDATE noetl.runtime
SET status = 'offline', runtime = %(runtime)s::jsonb, updated_at = now()
WHERE kind = 'worker_pool' AND name = %(name)s;

-- name: status_counts
-- Every command counted by status and kind: reads the whole table, history included, so only
-- `status --exact` runs it.
SELECT status, COALESCE(tool_kind, '(none)') AS tool_kind, count(*) AS commands
FROM noetl.command
GROUP BY status, COALESCE(tool_kind, '(none)')
ORDER BY status, tool_kind;

-- name: queue_depth
-- Live commands (PENDING, CLAIMED, RUNNING) by status and kind, exact, read from the worker's
-- partial indexes only: history never enters them. Two parts, because no one index covers
-- all three statuses (one filter on the three would scan every partition).
SELECT 'PENDING' AS status, COALESCE(c.tool_kind, '(none)') AS tool_kind, count(*) AS commands
FROM noetl.command AS c
WHERE c.status = 'PENDING'
GROUP BY COALESCE(c.tool_kind, '(none)')
UNION ALL
SELECT c.status, COALESCE(c.tool_kind, '(none)') AS tool_kind, count(*) AS commands
FROM noetl.command AS c
WHERE c.status IN ('CLAIMED', 'RUNNING')
GROUP BY c.status, COALESCE(c.tool_kind, '(none)');

-- name: scaler_commands
-- What KEDA's PostgreSQL scaler runs (deploy/kubernetes/scaledobject.yaml holds this text with
-- the Deployment's NOETL_PGWORKER_TOOL_KINDS written in, a test checks): the live commands
-- (PENDING, CLAIMED, RUNNING) of those kinds, from the worker's view. One line, as in the YAML.
SELECT COALESCE(sum(pending + in_flight), 0)::integer FROM noetl.pgworker_queue_by_kind WHERE tool_kind = ANY(string_to_array(%(tool_kinds)s, ','))

-- name: status_history_estimate
-- Terminal commands (history) by status, ESTIMATED without reading the table: the rows of
-- every partition as of its last VACUUM/ANALYZE (pg_class.reltuples), less `live` (the live
-- rows, counted exactly by queue_depth), split by the terminal statuses' frequencies in the
-- partitions' statistics (pg_stats, weighted by rows). Where this role can see no statistics,
-- one unsplit 'TERMINAL' figure.
WITH leaf AS (
    SELECT n.nspname, r.relname, greatest(r.reltuples, 0) AS reltuples
    FROM pg_partition_tree('noetl.command'::regclass) AS t
    JOIN pg_class AS r ON r.oid = t.relid
    JOIN pg_namespace AS n ON n.oid = r.relnamespace
    WHERE t.isleaf
),
weight AS (
    SELECT f.status, sum(l.reltuples * f.freq) AS w
    FROM leaf AS l
    JOIN pg_stats AS s
      ON s.schemaname = l.nspname AND s.tablename = l.relname AND s.attname = 'status'
     AND NOT s.inherited
    CROSS JOIN LATERAL unnest(s.most_common_vals::text::text[], s.most_common_freqs)
        AS f(status, freq)
    WHERE f.status NOT IN ('PENDING', 'CLAIMED', 'RUNNING')
    GROUP BY f.status
),
total AS (
    SELECT greatest((SELECT sum(l.reltuples) FROM leaf AS l) - %(live)s::bigint, 0) AS n,
           (SELECT sum(w.w) FROM weight AS w) AS w
)
SELECT x.status, x.commands
FROM (
    SELECT w.status, round(t.n * w.w / t.w)::bigint AS commands
    FROM weight AS w, total AS t
    WHERE t.w > 0
    UNION ALL
    SELECT 'TERMINAL', round(t.n)::bigint
    FROM total AS t
    WHERE COALESCE(t.w, 0) = 0
) AS x
WHERE x.commands > 0
ORDER BY x.status;

-- name: status_oldest_pending
SELECT EXTRACT(epoch FROM now() - min(created_at))::double precision AS age_seconds
FROM noetl.command
WHERE status = 'PENDING';

-- name: status_stuck
-- Claims older than the lease (their worker may be dead, or the command long-running).
SELECT count(*) AS stuck
FROM noetl.command
WHERE status IN ('CLAIMED', 'RUNNING')
  AND COALESCE(claimed_at, updated_at) < now() - make_interval(secs => %(lease)s);

-- name: status_workers
SELECT name, status, capacity,
       EXTRACT(epoch FROM now() - heartbeat)::double precision AS heartbeat_age_seconds,
       COALESCE((runtime ->> 'in_flight')::int, 0) AS in_flight,
       COALESCE((runtime ->> 'completed')::bigint, 0) AS completed,
       COALESCE((runtime ->> 'failed')::bigint, 0) AS failed,
       -- server mode: event batches the NoETL server accepted and then failed
       COALESCE((runtime ->> 'server_batches_failed')::bigint, 0) AS server_batches_failed
FROM noetl.runtime
WHERE kind = 'worker_pool'
ORDER BY name;

-- name: ensure_resource
INSERT INTO noetl.resource (name) VALUES (%(kind)s) ON CONFLICT (name) DO NOTHING;

-- name: find_catalog
SELECT catalog_id FROM noetl.catalog WHERE path = %(path)s ORDER BY version DESC LIMIT 1;

-- name: insert_catalog
INSERT INTO noetl.catalog (catalog_id, path, version, kind, content)
VALUES (noetl.snowflake_id(), %(path)s, 1, %(kind)s, %(content)s)
RETURNING catalog_id;

-- name: enqueue_commands
-- Write commands the way NoETL's server does: a command.issued event and a PENDING row each,
-- spread over `executions` new executions (or one given execution), in one statement.
WITH ex AS MATERIALIZED (
    SELECT s AS slot, COALESCE(%(execution_id)s::bigint, noetl.snowflake_id()) AS execution_id
    FROM generate_series(0, %(executions)s - 1) AS s
),
cmd AS MATERIALIZED (
    SELECT n, ex.execution_id, noetl.snowflake_id() AS command_id,
           noetl.snowflake_id() AS event_id
    FROM generate_series(0, %(count)s - 1) AS n
    JOIN ex ON ex.slot = n %% %(executions)s
    ORDER BY n
),
meta AS (
    SELECT cmd.*,
           jsonb_build_object(
               'step', %(step)s::text, 'attempt', 1, 'tool_kind', %(tool_kind)s::text,
               'actionable', true, 'catalog_id', %(catalog_id)s::bigint::text,
               'command_id', cmd.command_id, 'execution_id', cmd.execution_id::text,
               'max_attempts', %(max_attempts)s::int
           ) AS meta
    FROM cmd
),
issued AS (
    INSERT INTO noetl.event (
        execution_id, catalog_id, event_id, created_at, event_type, node_id, node_name,
        status, meta, command_id
    )
    SELECT meta.execution_id, %(catalog_id)s, meta.event_id, now(), 'command.issued',
           %(step)s, %(step)s, 'PENDING', meta.meta, meta.command_id
    FROM meta
)
INSERT INTO noetl.command (
    command_id, event_id, execution_id, catalog_id, step_name, tool_kind, status, attempt,
    context, meta, latest_event_id, created_at, updated_at
)
SELECT meta.command_id, meta.event_id, meta.execution_id, %(catalog_id)s, %(step)s,
       %(tool_kind)s, 'PENDING', 1, %(context)s::jsonb, meta.meta, meta.event_id, now(), now()
FROM meta
ORDER BY meta.n
RETURNING execution_id, command_id;

-- name: verify_objects
-- What the worker needs; each row names an object and whether it is present.
SELECT v.object, v.present
FROM (VALUES
    ('schema noetl', to_regnamespace('noetl') IS NOT NULL),
    ('table noetl.command', to_regclass('noetl.command') IS NOT NULL),
    ('table noetl.event', to_regclass('noetl.event') IS NOT NULL),
    ('table noetl.runtime', to_regclass('noetl.runtime') IS NOT NULL),
    ('function noetl.snowflake_id()', to_regprocedure('noetl.snowflake_id()') IS NOT NULL),
    ('unique index on noetl.runtime (kind, name)', EXISTS (
        SELECT 1 FROM pg_index AS i
        WHERE i.indrelid = to_regclass('noetl.runtime') AND i.indisunique
          AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
                 FROM pg_attribute AS a
                WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey))
              = ARRAY['kind', 'name'])),
    ('trigger pgworker_command_notify on noetl.command', EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgrelid = to_regclass('noetl.command') AND tgname = 'pgworker_command_notify')),
    ('index noetl.pgworker_command_claim_idx', to_regclass('noetl.pgworker_command_claim_idx') IS NOT NULL),
    ('index noetl.pgworker_command_kind_claim_idx', to_regclass('noetl.pgworker_command_kind_claim_idx') IS NOT NULL),
    ('index noetl.pgworker_command_inflight_idx', to_regclass('noetl.pgworker_command_inflight_idx') IS NOT NULL),
    ('index noetl.pgworker_command_badkind_idx', to_regclass('noetl.pgworker_command_badkind_idx') IS NOT NULL),
    ('view noetl.pgworker_queue_by_kind', to_regclass('noetl.pgworker_queue_by_kind') IS NOT NULL),
    ('index noetl.pgworker_command_failed_idx', to_regclass('noetl.pgworker_command_failed_idx') IS NOT NULL),
    ('table noetl.pgworker_paused_kind', to_regclass('noetl.pgworker_paused_kind') IS NOT NULL),
    ('table noetl.pgworker_cancel', to_regclass('noetl.pgworker_cancel') IS NOT NULL),
    ('function noetl.pgworker_prune_runtime(double precision)',
     to_regprocedure('noetl.pgworker_prune_runtime(double precision)') IS NOT NULL)
) AS v(object, present);

-- name: verify_columns
SELECT 'column noetl.' || v.tbl || '.' || v.col AS object,
       EXISTS (
           SELECT 1 FROM information_schema.columns AS c
           WHERE c.table_schema = 'noetl' AND c.table_name = v.tbl AND c.column_name = v.col
       ) AS present
FROM (VALUES
    ('command', 'command_id'), ('command', 'event_id'), ('command', 'execution_id'),
    ('command', 'catalog_id'), ('command', 'parent_execution_id'),
    ('command', 'parent_command_id'), ('command', 'step_name'), ('command', 'tool_kind'),
    ('command', 'status'), ('command', 'worker_id'), ('command', 'claimed_at'),
    ('command', 'started_at'), ('command', 'completed_at'), ('command', 'attempt'),
    ('command', 'context'), ('command', 'loop_event_id'), ('command', 'iter_index'),
    ('command', 'meta'), ('command', 'result'), ('command', 'error'),
    ('command', 'latest_event_id'), ('command', 'created_at'), ('command', 'updated_at'),
    ('event', 'execution_id'), ('event', 'catalog_id'), ('event', 'event_id'),
    ('event', 'parent_execution_id'), ('event', 'created_at'), ('event', 'event_type'),
    ('event', 'node_id'), ('event', 'node_name'), ('event', 'status'), ('event', 'duration'),
    ('event', 'result'), ('event', 'meta'), ('event', 'error'), ('event', 'worker_id'),
    ('event', 'command_id'),
    ('runtime', 'runtime_id'), ('runtime', 'name'), ('runtime', 'kind'),
    ('runtime', 'status'), ('runtime', 'labels'), ('runtime', 'capabilities'),
    ('runtime', 'capacity'), ('runtime', 'runtime'), ('runtime', 'heartbeat')
) AS v(tbl, col);

-- name: apply_privileges
-- What `schema apply` needs of the login that runs it, one row per need: whether it has it.
-- Readable by any login (a managed database's worker login owns nothing).
SELECT v.need, v.has
FROM (VALUES
    ('CREATE on database ' || quote_ident(current_database()) || ' (to create schema noetl)',
     NOT %(with_noetl_tables)s::boolean OR to_regnamespace('noetl') IS NOT NULL
     OR has_database_privilege(current_database(), 'CREATE')),
    ('CREATE on schema noetl (the doorbell function)',
     to_regnamespace('noetl') IS NULL OR has_schema_privilege('noetl', 'CREATE')),
    ('ownership of noetl.command (owner: '
     || COALESCE((SELECT r.rolname FROM pg_class AS c JOIN pg_roles AS r ON r.oid = c.relowner
                   WHERE c.oid = to_regclass('noetl.command')), '?')
     || '; its trigger and indexes)',
     to_regclass('noetl.command') IS NULL
     OR pg_has_role((SELECT relowner FROM pg_class WHERE oid = to_regclass('noetl.command')),
                    'USAGE')),
    ('CREATEROLE (to create the role noetl_pgworker)',
     NOT %(with_role)s::boolean
     OR EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'noetl_pgworker')
     OR (SELECT r.rolcreaterole OR r.rolsuper FROM pg_roles AS r
          WHERE r.rolname = current_user))
) AS v(need, has);

-- name: held_commands
-- Server mode's fence: which of these commands this worker still holds (not terminal).
SELECT c.execution_id, c.command_id
FROM noetl.command AS c
JOIN jsonb_to_recordset(%(items)s::jsonb) AS i(execution_id bigint, command_id bigint)
  ON c.execution_id = i.execution_id AND c.command_id = i.command_id
WHERE c.execution_id = ANY(%(execution_ids)s::bigint[])
  AND c.command_id = ANY(%(command_ids)s::bigint[])
  AND c.worker_id = %(worker_id)s
  AND c.status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED');

-- name: lock_worker_id
-- One process per worker id: a session-level advisory lock on (class, hashtext(worker id)),
-- held by the claim session for the worker's life. `holder` names the session holding it
-- (its application_name carries the holding process's incarnation token), `holder_pid` is its
-- server process, when this login may see it.
SELECT pg_try_advisory_lock(%(cls)s::int, hashtext(%(worker_id)s::text)) AS locked,
       h.application_name AS holder, h.pid AS holder_pid
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT a.application_name, a.pid
      FROM pg_locks AS l
      JOIN pg_stat_activity AS a ON a.pid = l.pid
     WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
       AND l.classid::bigint = (%(cls)s::int)::bigint & 4294967295
       AND l.objid::bigint = hashtext(%(worker_id)s::text)::bigint & 4294967295
       AND l.pid <> pg_backend_pid()
     LIMIT 1
) AS h ON true;

-- name: worker_id_heartbeat
-- The worker id's runtime row: whether its last holder went offline, and how old its last
-- heartbeat is (seconds); no row when the id never ran here.
SELECT status, extract(epoch FROM clock_timestamp() - heartbeat)::float8 AS age,
       heartbeat
FROM noetl.runtime
WHERE kind = 'worker_pool' AND name = %(worker_id)s;

-- name: terminate_incarnation
-- End the server sessions of one incarnation of a worker (their application_name carries its
-- token, `marker`), and the session `pid`; never this session. Needs membership in the
-- sessions' role (or pg_signal_backend). Returns how many were signalled.
SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid)) AS ended
FROM pg_stat_activity AS a
WHERE a.pid <> pg_backend_pid()
  AND (a.pid = %(pid)s OR strpos(a.application_name, %(marker)s) > 0);

-- name: incarnation_sessions
-- How many server sessions of that incarnation (or the session `pid`) are still there.
SELECT count(*) AS left
FROM pg_stat_activity AS a
WHERE a.pid <> pg_backend_pid()
  AND (a.pid = %(pid)s OR strpos(a.application_name, %(marker)s) > 0);

-- name: session_unlock
-- Give back the session-level locks of commands whose outcome is written.
SELECT count(*) FILTER (WHERE pg_advisory_unlock(id)) AS unlocked
FROM unnest(%(ids)s::bigint[]) AS id;

-- name: session_relock
-- After the claim session reconnected: lock again the commands still held.
SELECT count(*) FILTER (WHERE pg_try_advisory_lock(id)) AS locked
FROM unnest(%(ids)s::bigint[]) AS id;

-- name: session_held_locks
-- The command ids (one-bigint advisory keys) this session holds at session level.
SELECT (l.classid::bigint << 32) | l.objid::bigint AS command_id
FROM pg_locks AS l
WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.pid = pg_backend_pid()
  AND l.mode = 'ExclusiveLock' AND l.granted;

-- name: catalog_workbook
-- The workbook section of a registered playbook (NoETL keeps the parsed playbook in payload);
-- no row: no such catalog entry; parsed false: the entry has no parsed playbook.
SELECT payload -> 'workbook' AS workbook, payload IS NOT NULL AS parsed
FROM noetl.catalog
WHERE catalog_id = %(catalog_id)s;

-- name: control_command
-- One command as `noetl-pgworker show` prints it (NULL: no such command).
SELECT c.command_id, c.execution_id, c.step_name, c.tool_kind, c.status, c.attempt, c.worker_id,
       c.created_at, c.claimed_at, c.started_at, c.completed_at, c.error
FROM noetl.command AS c
WHERE c.command_id = %(command_id)s;

-- name: control_execution_commands
-- The commands of one execution, oldest first (at most `limit`).
SELECT c.command_id, c.execution_id, c.step_name, c.tool_kind, c.status, c.attempt, c.worker_id,
       c.created_at, c.claimed_at, c.started_at, c.completed_at, c.error
FROM noetl.command AS c
WHERE c.execution_id = %(execution_id)s
ORDER BY c.created_at, c.command_id
LIMIT %(limit)s;

-- name: control_command_events
-- One command's trail, in the order written; each event's attempt where the worker noted it.
SELECT e.event_id, e.created_at, e.event_type, e.status, e.worker_id, e.error,
       e.meta ->> 'attempt' AS attempt
FROM noetl.event AS e
WHERE e.execution_id = %(execution_id)s AND e.command_id = %(command_id)s
ORDER BY e.event_id;

-- name: control_execution_events
-- The events of one execution that belong to no command (playbook.*, execution.*), and how
-- many events it has in all.
SELECT e.event_id, e.created_at, e.event_type, e.status, e.worker_id, e.error,
       NULL::text AS attempt
FROM noetl.event AS e
WHERE e.execution_id = %(execution_id)s AND e.command_id IS NULL
ORDER BY e.event_id
LIMIT %(limit)s;

-- name: control_retry
-- FAILED -> PENDING (attempt + 1; the trail of earlier attempts stays in noetl.event), and the
-- doorbell rings. Refused (nothing changes) unless the command is FAILED and its execution has
-- not ended (NoETL's server has then already acted on the failure).
WITH target AS MATERIALIZED (
    SELECT c.execution_id, c.command_id, c.status, c.attempt,
           (SELECT e.event_type
              FROM noetl.event AS e
             WHERE e.execution_id = c.execution_id
               AND e.event_type IN ('playbook.completed', 'playbook.failed',
                                    'workflow.completed', 'workflow.failed',
                                    'execution.cancelled')
             LIMIT 1) AS ended_by
    FROM noetl.command AS c
    WHERE c.command_id = %(command_id)s
    FOR UPDATE OF c
),
retried AS (
    UPDATE noetl.command AS c
    SET status = 'PENDING',
        worker_id = NULL,
        claimed_at = NULL,
        started_at = NULL,
        completed_at = NULL,
        error = NULL,
        result = NULL,
        attempt = c.attempt + 1,
        updated_at = now()
    FROM target AS t
    WHERE c.execution_id = t.execution_id
      AND c.command_id = t.command_id
      AND t.status = 'FAILED'
      AND t.ended_by IS NULL
    RETURNING c.attempt
)
SELECT t.status, t.ended_by, r.attempt AS new_attempt,
       (SELECT count(*) FROM (SELECT pg_notify('noetl_pgworker_command', '')
                                FROM retried) AS n) AS notified
FROM target AS t
LEFT JOIN retried AS r ON true;

-- name: control_cancel
-- Cancel one command: PENDING -> CANCELLED at once (with a command.cancelled event); CLAIMED
-- or RUNNING -> a request to the worker that holds it (NOTIFY 'cancel'), which stops the
-- command and writes it CANCELLED. Returns the status found (no row: no such command).
WITH target AS MATERIALIZED (
    SELECT c.execution_id, c.command_id, c.catalog_id, c.parent_execution_id, c.step_name,
           c.status, c.worker_id, c.meta
    FROM noetl.command AS c
    WHERE c.command_id = %(command_id)s
    FOR UPDATE OF c
),
pending AS (
    UPDATE noetl.command AS c
    SET status = 'CANCELLED',
        error = 'cancelled by ' || %(by)s::text,
        completed_at = now(),
        updated_at = now()
    FROM target AS t
    WHERE c.execution_id = t.execution_id AND c.command_id = t.command_id
      AND t.status = 'PENDING'
    RETURNING c.command_id
),
pending_event AS (
    INSERT INTO noetl.event (
        execution_id, catalog_id, event_id, parent_execution_id, created_at, event_type,
        node_id, node_name, status, result, meta, error, command_id
    )
    SELECT t.execution_id, t.catalog_id, noetl.snowflake_id(), t.parent_execution_id, now(),
           'command.cancelled', t.step_name, t.step_name, 'CANCELLED',
           jsonb_build_object('status', 'CANCELLED',
                              'context', jsonb_build_object('command_id', t.command_id)),
           jsonb_build_object('command_id', COALESCE(t.meta -> 'command_id',
                                                     to_jsonb(t.command_id)),
                              'cancelled_by', %(by)s::text, 'actionable', false,
                              'informative', true),
           'cancelled by ' || %(by)s::text, t.command_id
    FROM target AS t
    JOIN pending AS p ON p.command_id = t.command_id
),
requested AS (
    INSERT INTO noetl.pgworker_cancel (command_id, execution_id, requested_by)
    SELECT t.command_id, t.execution_id, %(by)s
    FROM target AS t
    WHERE t.status IN ('CLAIMED', 'RUNNING')
    ON CONFLICT (command_id) DO UPDATE SET requested_at = now()
    RETURNING command_id
)
SELECT t.status, t.worker_id, t.execution_id,
       (SELECT count(*) FROM pending) AS cancelled,
       (SELECT count(*) FROM (SELECT pg_notify('noetl_pgworker_command', 'cancel')
                                FROM requested) AS n) AS requested
FROM target AS t;

-- name: control_live_commands
-- The commands of one execution that have not ended (for cancelling an execution).
SELECT c.command_id
FROM noetl.command AS c
WHERE c.execution_id = %(execution_id)s
  AND c.status IN ('PENDING', 'CLAIMED', 'RUNNING')
ORDER BY c.created_at, c.command_id;

-- name: control_status_of
SELECT c.status, c.worker_id
FROM noetl.command AS c
WHERE c.command_id = %(command_id)s;

-- name: control_pause
INSERT INTO noetl.pgworker_paused_kind (tool_kind, paused_by)
VALUES (%(tool_kind)s, %(by)s)
ON CONFLICT (tool_kind) DO NOTHING
RETURNING tool_kind;

-- name: control_resume
-- Resume a kind, and ring the doorbell so that its PENDING commands are claimed at once.
WITH gone AS (
    DELETE FROM noetl.pgworker_paused_kind
    WHERE tool_kind = %(tool_kind)s
    RETURNING tool_kind
)
SELECT g.tool_kind, pg_notify('noetl_pgworker_command', '') AS notified
FROM gone AS g;

-- name: control_paused_kinds
SELECT p.tool_kind, p.paused_at, p.paused_by,
       (SELECT count(*) FROM noetl.command AS c
         WHERE c.status = 'PENDING' AND c.tool_kind = p.tool_kind) AS pending
FROM noetl.pgworker_paused_kind AS p
ORDER BY p.tool_kind;

-- name: cancel_requests
-- Which of the commands this worker holds are to be cancelled.
SELECT r.command_id, r.requested_by
FROM noetl.pgworker_cancel AS r
WHERE r.command_id = ANY(%(command_ids)s::bigint[]);

-- name: status_recent_failures
-- FAILED and CANCELLED commands that ended in the last `hours`, exactly, by status and kind:
-- read from pgworker_command_failed_idx (only such rows), whatever the history's size.
SELECT c.status, COALESCE(c.tool_kind, '(none)') AS tool_kind, count(*) AS commands
FROM noetl.command AS c
WHERE c.status IN ('FAILED', 'CANCELLED')
  AND c.completed_at > now() - make_interval(secs => %(seconds)s)
GROUP BY c.status, COALESCE(c.tool_kind, '(none)')
ORDER BY c.status, tool_kind;

-- name: prune_runtime
SELECT noetl.pgworker_prune_runtime(%(older_than)s) AS pruned;

-- name: queue_depth_leader
-- Does this worker export the queue depth? One worker of the fleet does: the first by name of
-- the noetl-pgworker workers whose heartbeat is fresh. Also every kind those workers run, so
-- that each (kind, status) series is there at 0.
WITH alive AS (
    SELECT r.name, r.capabilities
    FROM noetl.runtime AS r
    WHERE r.kind = 'worker_pool' AND r.status = 'ready'
      AND r.labels ->> 'worker' = 'noetl-pgworker'
      AND r.heartbeat > now() - make_interval(secs => %(stale_after)s)
)
SELECT COALESCE((SELECT min(a.name) FROM alive AS a) = %(name)s, false) AS leads,
       ARRAY(SELECT DISTINCT k.kind
               FROM alive AS a,
                    jsonb_array_elements_text(
                        CASE WHEN jsonb_typeof(a.capabilities -> 'tool_kinds') = 'array'
                             THEN a.capabilities -> 'tool_kinds' ELSE '[]'::jsonb END
                    ) AS k(kind)
              ORDER BY k.kind) AS kinds;
