-- Least privilege: the group role noetl_pgworker holds exactly what a running worker needs.
-- Grant it to the worker's login role:  GRANT noetl_pgworker TO my_worker_login;
-- (Creating the schema objects — `schema apply` — stays with the schema owner.)
-- Writes are granted per column: a worker (or code a tool runs) can change a command's status
-- and outcome, never what a command runs (context, tool_kind, ...). The REVOKE first narrows
-- the broader grants of earlier releases when this file is applied again.

DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'noetl_pgworker') THEN
        CREATE ROLE noetl_pgworker NOLOGIN;
    END IF;
END
$do$;

REVOKE ALL ON noetl.command, noetl.event, noetl.runtime, noetl.pgworker_paused_kind,
    noetl.pgworker_cancel FROM noetl_pgworker;

GRANT USAGE ON SCHEMA noetl TO noetl_pgworker;
-- claim (SELECT … FOR UPDATE), status and outcome updates: the columns that claim_commands,
-- reclaim_commands, write_back and release_commands set, nothing else
GRANT SELECT ON noetl.command TO noetl_pgworker;
GRANT UPDATE (status, worker_id, claimed_at, started_at, completed_at, attempt, result, error,
              latest_event_id, updated_at)
    ON noetl.command TO noetl_pgworker;
-- lifecycle events (insert only); SELECT to skip commands of executions that already ended
GRANT SELECT ON noetl.event TO noetl_pgworker;
GRANT INSERT (execution_id, catalog_id, event_id, parent_execution_id, created_at, event_type,
              node_id, node_name, status, duration, result, meta, error, worker_id, command_id)
    ON noetl.event TO noetl_pgworker;
-- registration and heartbeat (an upsert on (kind, name)) and the offline mark at exit
GRANT SELECT ON noetl.runtime TO noetl_pgworker;
GRANT INSERT (runtime_id, name, kind, uri, status, labels, capabilities, capacity, runtime,
              heartbeat, created_at, updated_at)
    ON noetl.runtime TO noetl_pgworker;
GRANT UPDATE (status, heartbeat, labels, capabilities, capacity, runtime, updated_at)
    ON noetl.runtime TO noetl_pgworker;
-- `kind: workbook` steps: the workbook section of the registered playbook (nothing else of it)
GRANT SELECT (catalog_id, payload) ON noetl.catalog TO noetl_pgworker;
-- paused kinds (the claim skips them) and cancellation requests (the worker stops those it holds)
GRANT SELECT ON noetl.pgworker_paused_kind, noetl.pgworker_cancel TO noetl_pgworker;
-- removing the rows of its own kind of worker gone for good (only those: a definer's function)
GRANT EXECUTE ON FUNCTION noetl.pgworker_prune_runtime(double precision) TO noetl_pgworker;
-- ids for events and runtime rows
GRANT EXECUTE ON FUNCTION noetl.snowflake_id() TO noetl_pgworker;
GRANT USAGE ON SEQUENCE noetl.snowflake_seq TO noetl_pgworker;
-- live commands per kind (what an autoscaler such as KEDA reads with the worker's login)
GRANT SELECT ON noetl.pgworker_queue_by_kind TO noetl_pgworker;
