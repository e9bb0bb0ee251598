-- `noetl-pgworker schema uninstall`: remove noetl-pgworker's own objects (those of
-- worker_objects.sql), nothing of NoETL's: its tables, their rows and events stay. Workers
-- still running stop claiming (their statements need these objects): stop them first.
DO $do$
BEGIN
    IF to_regclass('noetl.command') IS NOT NULL THEN
        DROP TRIGGER IF EXISTS pgworker_command_notify ON noetl.command;
    END IF;
END
$do$;
DROP FUNCTION IF EXISTS noetl.pgworker_notify_command();
DROP INDEX IF EXISTS noetl.pgworker_command_claim_idx;
DROP INDEX IF EXISTS noetl.pgworker_command_kind_claim_idx;
DROP INDEX IF EXISTS noetl.pgworker_command_badkind_idx;
DROP INDEX IF EXISTS noetl.pgworker_command_inflight_idx;
DROP INDEX IF EXISTS noetl.pgworker_command_failed_idx;
DROP TABLE IF EXISTS noetl.pgworker_paused_kind;
DROP TABLE IF EXISTS noetl.pgworker_cancel;
DROP FUNCTION IF EXISTS noetl.pgworker_prune_runtime(double precision);
DROP VIEW IF EXISTS noetl.pgworker_queue_by_kind;
