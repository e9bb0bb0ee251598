-- noetl-pgworker's own additive objects.
--
-- Safe to apply to a live NoETL database and to re-apply: nothing of NoETL's is altered or
-- dropped, and a second run changes nothing. NoETL itself has no trigger on noetl.command;
-- these are the worker's doorbell and its claim-order index.

-- One NOTIFY per inserting transaction: a statement-level trigger with a constant payload.
-- PostgreSQL folds identical notifications of one transaction into one, so a transaction that
-- inserts 10,000 rows in 50 statements still rings once.
CREATE OR REPLACE FUNCTION noetl.pgworker_notify_command() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('noetl_pgworker_command', '');
    RETURN NULL;
END
$fn$;

DO $do$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgrelid = 'noetl.command'::regclass
          AND tgname = 'pgworker_command_notify'
          AND NOT tgisinternal
    ) THEN
        CREATE TRIGGER pgworker_command_notify
            AFTER INSERT ON noetl.command
            FOR EACH STATEMENT
            EXECUTE FUNCTION noetl.pgworker_notify_command();
    END IF;
END
$do$;

-- The claim reads PENDING rows oldest first; history (terminal rows) never enters this index,
-- so the claim does not slow down as the table grows.
CREATE INDEX IF NOT EXISTS pgworker_command_claim_idx
    ON noetl.command (created_at, command_id)
    WHERE status = 'PENDING';

-- The claim reads each of its tool kinds' PENDING rows oldest first from this one, so that a
-- backlog of kinds a worker does not run costs it nothing; `queue_depth` counts PENDING rows by
-- kind from it alone (index-only).
CREATE INDEX IF NOT EXISTS pgworker_command_kind_claim_idx
    ON noetl.command (tool_kind, created_at, command_id)
    WHERE status = 'PENDING';

-- PENDING rows whose tool_kind is missing or not a kind ('', ' python ', 'Python'): every worker
-- claims them, to fail them as malformed instead of leaving them PENDING forever.
CREATE INDEX IF NOT EXISTS pgworker_command_badkind_idx
    ON noetl.command (created_at, command_id)
    WHERE status = 'PENDING' AND (tool_kind IS NULL OR tool_kind !~ '^[a-z][a-z0-9_]*$');

-- Recovery looks for claims older than the lease; this keeps that look cheap however large
-- the table's history grows.
CREATE INDEX IF NOT EXISTS pgworker_command_inflight_idx
    ON noetl.command (claimed_at)
    WHERE status IN ('CLAIMED', 'RUNNING');

-- Commands waiting (PENDING) and in flight (CLAIMED, RUNNING) per tool kind, exact, for
-- autoscalers (KEDA's PostgreSQL scaler: deploy/kubernetes/scaledobject.yaml) and dashboards.
-- It reads the partial indexes above only, so it costs the same however large history grows;
-- two parts, because no one index covers all three statuses. A kind with nothing live has no
-- row; rows without a kind have tool_kind NULL.
CREATE OR REPLACE VIEW noetl.pgworker_queue_by_kind AS
SELECT q.tool_kind, sum(q.pending)::bigint AS pending, sum(q.in_flight)::bigint AS in_flight
FROM (
    SELECT c.tool_kind, count(*) AS pending, 0 AS in_flight
    FROM noetl.command AS c
    WHERE c.status = 'PENDING'
    GROUP BY c.tool_kind
    UNION ALL
    SELECT c.tool_kind, 0 AS pending, count(*) AS in_flight
    FROM noetl.command AS c
    WHERE c.status IN ('CLAIMED', 'RUNNING')
    GROUP BY c.tool_kind
) AS q
GROUP BY q.tool_kind;

-- `status` shows the failures of the last hours exactly: FAILED and CANCELLED rows by the time
-- they ended. Only those rows enter this index (history mostly COMPLETED stays out), and a
-- range of recent ones is read from its end, however long the history.
CREATE INDEX IF NOT EXISTS pgworker_command_failed_idx
    ON noetl.command (completed_at)
    WHERE status IN ('FAILED', 'CANCELLED');

-- Tool kinds paused for every worker at once (`noetl-pgworker pause KIND`): the claim skips
-- them while a row is here; `resume` deletes it and rings the doorbell.
CREATE TABLE IF NOT EXISTS noetl.pgworker_paused_kind (
    tool_kind text PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now(),
    paused_by text
);

-- Cancellation of commands a worker holds (`noetl-pgworker cancel`): the worker that holds the
-- command stops it and writes it CANCELLED. Told by a NOTIFY 'cancel' on the doorbell's
-- channel, or found at its next look (every poll interval while it runs commands).
CREATE TABLE IF NOT EXISTS noetl.pgworker_cancel (
    command_id bigint PRIMARY KEY,
    execution_id bigint NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    requested_by text
);

-- Rows of noetl-pgworker workers (labels {"worker": "noetl-pgworker"}) whose heartbeat is
-- older than the bound (at least an hour): workers renamed or gone for good. Run by each
-- worker at its start; a definer's function, so that the worker's role needs no DELETE on
-- noetl.runtime (NoETL's other runtime rows stay out of its reach).
CREATE OR REPLACE FUNCTION noetl.pgworker_prune_runtime(older_than_seconds double precision)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH gone AS (
        DELETE FROM noetl.runtime
        WHERE kind = 'worker_pool'
          AND labels ->> 'worker' = 'noetl-pgworker'
          AND heartbeat < now() - make_interval(secs => greatest(older_than_seconds, 3600))
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$fn$;
REVOKE ALL ON FUNCTION noetl.pgworker_prune_runtime(double precision) FROM PUBLIC;
