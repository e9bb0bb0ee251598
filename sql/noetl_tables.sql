-- NoETL-compatible tables for a standalone or test database.
--
-- Applied only on request (`noetl-pgworker schema apply --with-noetl-tables`). Every statement
-- is "create if missing": on a database where NoETL already created its schema nothing here
-- changes anything. Names, types and values follow NoETL's own DDL (Python server 2.103.x-4.x).

CREATE SCHEMA IF NOT EXISTS noetl;

CREATE SEQUENCE IF NOT EXISTS noetl.snowflake_seq;

-- Snowflake ids: milliseconds since 2024-01-01 shifted left 23 bits, OR a 5-bit shard and an
-- 18-bit sequence. Created only when missing so that NoETL's own definition is never replaced.
DO $do$
BEGIN
    IF to_regprocedure('noetl.snowflake_id()') IS NULL THEN
        CREATE FUNCTION noetl.snowflake_id() RETURNS bigint
        LANGUAGE plpgsql VOLATILE AS $fn$
        DECLARE
            our_epoch bigint := 1704067200000;
            seq_id bigint;
            now_ms bigint;
            shard_id bigint := 1;
        BEGIN
            seq_id := nextval('noetl.snowflake_seq') % 262144;
            now_ms := floor(extract(epoch FROM clock_timestamp()) * 1000);
            RETURN ((now_ms - our_epoch) << 23) | (shard_id << 18) | seq_id;
        END
        $fn$;
    END IF;
END
$do$;

CREATE TABLE IF NOT EXISTS noetl.resource (
    name text PRIMARY KEY,
    meta jsonb
);

CREATE TABLE IF NOT EXISTS noetl.catalog (
    catalog_id bigint PRIMARY KEY DEFAULT noetl.snowflake_id(),
    path text NOT NULL,
    version integer NOT NULL DEFAULT 1,
    kind text NOT NULL REFERENCES noetl.resource (name),
    content text,
    layout jsonb,
    payload jsonb,
    meta jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (path, version)
);

CREATE TABLE IF NOT EXISTS noetl.command (
    command_id bigint NOT NULL,
    event_id bigint NOT NULL,
    execution_id bigint NOT NULL,
    catalog_id bigint NOT NULL,
    parent_execution_id bigint,
    parent_command_id bigint,
    step_name text NOT NULL,
    tool_kind text,
    status text NOT NULL DEFAULT 'PENDING',
    worker_id text,
    claimed_at timestamptz,
    started_at timestamptz,
    completed_at timestamptz,
    attempt integer NOT NULL DEFAULT 1,
    context jsonb,
    context_key text,
    loop_event_id text,
    iter_index integer,
    meta jsonb,
    result jsonb,
    error text,
    latest_event_id bigint,
    prev_event_id bigint,
    stage_id bigint,
    frame_id bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (execution_id, command_id)
) PARTITION BY HASH (execution_id);

CREATE TABLE IF NOT EXISTS noetl.command_p00 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 0);
CREATE TABLE IF NOT EXISTS noetl.command_p01 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 1);
CREATE TABLE IF NOT EXISTS noetl.command_p02 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 2);
CREATE TABLE IF NOT EXISTS noetl.command_p03 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 3);
CREATE TABLE IF NOT EXISTS noetl.command_p04 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 4);
CREATE TABLE IF NOT EXISTS noetl.command_p05 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 5);
CREATE TABLE IF NOT EXISTS noetl.command_p06 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 6);
CREATE TABLE IF NOT EXISTS noetl.command_p07 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 7);
CREATE TABLE IF NOT EXISTS noetl.command_p08 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 8);
CREATE TABLE IF NOT EXISTS noetl.command_p09 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 9);
CREATE TABLE IF NOT EXISTS noetl.command_p10 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 10);
CREATE TABLE IF NOT EXISTS noetl.command_p11 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 11);
CREATE TABLE IF NOT EXISTS noetl.command_p12 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 12);
CREATE TABLE IF NOT EXISTS noetl.command_p13 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 13);
CREATE TABLE IF NOT EXISTS noetl.command_p14 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 14);
CREATE TABLE IF NOT EXISTS noetl.command_p15 PARTITION OF noetl.command FOR VALUES WITH (MODULUS 16, REMAINDER 15);

CREATE INDEX IF NOT EXISTS idx_command_execution ON noetl.command (execution_id);
CREATE INDEX IF NOT EXISTS idx_command_execution_step ON noetl.command (execution_id, step_name);
CREATE INDEX IF NOT EXISTS idx_command_status_active ON noetl.command (status)
    WHERE status IN ('PENDING', 'CLAIMED');
CREATE INDEX IF NOT EXISTS idx_command_worker_claimed ON noetl.command (worker_id, updated_at)
    WHERE status = 'CLAIMED';
CREATE INDEX IF NOT EXISTS idx_command_command_id ON noetl.command (command_id);

CREATE TABLE IF NOT EXISTS noetl.event (
    execution_id bigint NOT NULL,
    catalog_id bigint NOT NULL REFERENCES noetl.catalog (catalog_id),
    event_id bigint NOT NULL,
    parent_event_id bigint,
    parent_execution_id bigint,
    created_at timestamp NOT NULL DEFAULT now(),
    event_type varchar,
    node_id varchar,
    node_name varchar,
    node_type varchar,
    status varchar,
    duration double precision,
    context jsonb,
    result jsonb,
    meta jsonb,
    error text,
    current_index integer,
    current_item text,
    worker_id varchar,
    distributed_state varchar,
    context_key varchar,
    context_value text,
    trace_component jsonb,
    stack_trace text,
    command_id bigint,
    stage_id bigint,
    frame_id bigint,
    prev_event_id bigint,
    PRIMARY KEY (execution_id, event_id),
    -- NULL, or an object with a string status and nothing but status, reference and context.
    -- (COALESCE: a CHECK that yields NULL passes, so every unknown must count as false.)
    CONSTRAINT event_result_shape CHECK (
        result IS NULL OR COALESCE(
            jsonb_typeof(result) = 'object'
            AND jsonb_typeof(result -> 'status') = 'string'
            AND (result - 'status' - 'reference' - 'context') = '{}'::jsonb
            AND (NOT (result ? 'reference') OR jsonb_typeof(result -> 'reference') = 'object')
            AND (NOT (result ? 'context') OR jsonb_typeof(result -> 'context') = 'object'),
            false
        )
    )
) PARTITION BY RANGE (execution_id);

-- NoETL adds range partitions as executions grow; the default partition makes every id fit.
CREATE TABLE IF NOT EXISTS noetl.event_default PARTITION OF noetl.event DEFAULT;

CREATE INDEX IF NOT EXISTS idx_event_execution_type ON noetl.event (execution_id, event_type);
CREATE INDEX IF NOT EXISTS idx_event_command_id ON noetl.event (command_id);

CREATE TABLE IF NOT EXISTS noetl.runtime (
    runtime_id bigint PRIMARY KEY,
    name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('worker_pool', 'server_api', 'broker')),
    uri text,
    status text NOT NULL,
    labels jsonb,
    capabilities jsonb,
    capacity integer,
    runtime jsonb,
    heartbeat timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX IF NOT EXISTS idx_runtime_kind_name ON noetl.runtime (kind, name);
