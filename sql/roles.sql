-- Least privilege: the group role noetl_pgworker holds exactly what a running worker needs.
-- Grant it to the worker's login role:  GRANT noetl_pgworker TO my_worker_login;
-- (Creating the schema objects — `schema apply` — stays with the schema owner.)

DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'noetl_pgworker') THEN
        CREATE ROLE noetl_pgworker NOLOGIN;
    END IF;
END
$do$;

GRANT USAGE ON SCHEMA noetl TO noetl_pgworker;
-- claim (SELECT … FOR UPDATE), status and outcome updates
GRANT SELECT, UPDATE ON noetl.command TO noetl_pgworker;
-- lifecycle events; SELECT to skip commands of executions that already ended
GRANT SELECT, INSERT ON noetl.event TO noetl_pgworker;
-- registration and heartbeat (an upsert on (kind, name))
GRANT SELECT, INSERT, UPDATE ON noetl.runtime TO noetl_pgworker;
-- ids for events and runtime rows
GRANT EXECUTE ON FUNCTION noetl.snowflake_id() TO noetl_pgworker;
GRANT USAGE ON SEQUENCE noetl.snowflake_seq TO noetl_pgworker;
