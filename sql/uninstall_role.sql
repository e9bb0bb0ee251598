-- `noetl-pgworker schema uninstall --with-role`: the group role noetl_pgworker (roles.sql),
-- a cluster-wide object. Its privileges in this database are dropped with it; grants it holds
-- in other databases must be revoked there first (DROP ROLE then names them).
DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'noetl_pgworker') THEN
        EXECUTE 'DROP OWNED BY noetl_pgworker';
        EXECUTE 'DROP ROLE noetl_pgworker';
    END IF;
END
$do$;
