"""The database objects the worker needs: print them, apply them, verify them."""

from __future__ import annotations

from typing import Any

import psycopg

from .errors import PgWorkerError, SchemaMissing
from .queries import query, read_sql_file

NOETL_TABLES_FILE = "noetl_tables.sql"
WORKER_OBJECTS_FILE = "worker_objects.sql"
ROLES_FILE = "roles.sql"
UNINSTALL_FILE = "uninstall.sql"
UNINSTALL_ROLE_FILE = "uninstall_role.sql"
# Serialises concurrent `schema apply` runs (many workers starting at once).
_APPLY_LOCK_KEY = 0x6E6F65746C706777  # "noetlpgw"


def schema_sql(*, with_noetl_tables: bool = False, with_role: bool = False) -> str:
    """The DDL that ``apply`` runs, as one script."""
    parts = []
    if with_noetl_tables:
        parts.append(read_sql_file(NOETL_TABLES_FILE))
    parts.append(read_sql_file(WORKER_OBJECTS_FILE))
    if with_role:
        parts.append(read_sql_file(ROLES_FILE))
    return "\n".join(parts)


def apply(
    conn: psycopg.Connection[Any], *, with_noetl_tables: bool = False, with_role: bool = False
) -> None:
    """Create what is missing, in one transaction; applying twice changes nothing.

    A login that lacks a privilege it needs (a managed database's worker login, say) gets
    :class:`MissingPrivilege` naming each one, before anything runs.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_APPLY_LOCK_KEY,))
        if not with_noetl_tables:
            missing = [m for m in _missing(conn) if "pgworker" not in m]
            if missing:
                raise NoNoetlTables(conn.info.dbname, missing)
        lacking = [
            str(need)
            for need, has in conn.execute(
                query("apply_privileges"),
                {"with_noetl_tables": with_noetl_tables, "with_role": with_role},
            ).fetchall()
            if not has
        ]
        user = conn.execute("SELECT current_user").fetchone()
        if lacking:
            raise MissingPrivilege(str(user[0]) if user else "?", lacking)
        try:
            conn.execute(
                schema_sql(with_noetl_tables=with_noetl_tables, with_role=with_role).encode()
            )
        except psycopg.errors.InsufficientPrivilege as exc:
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise MissingPrivilege(str(user[0]) if user else "?", [first]) from exc


class NoNoetlTables(SchemaMissing):
    """`schema apply` on a database without NoETL's tables (and no --with-noetl-tables)."""

    def __init__(self, dbname: str, missing: list[str]) -> None:
        self.missing = missing
        PgWorkerError.__init__(
            self,
            f"the database {dbname} has no NoETL tables (missing: {', '.join(missing)}):"
            " point --dsn at NoETL's database, or add --with-noetl-tables to create"
            " NoETL-compatible ones here (a standalone queue, tests)",
        )


def uninstall(conn: psycopg.Connection[Any], *, with_role: bool = False) -> None:
    """Remove the worker's own objects (trigger, functions, indexes, its tables) and, with
    ``with_role``, the role noetl_pgworker; never NoETL's tables or rows. One transaction."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_APPLY_LOCK_KEY,))
        conn.execute(read_sql_file(UNINSTALL_FILE).encode())
        if with_role:
            conn.execute(read_sql_file(UNINSTALL_ROLE_FILE).encode())


class MissingPrivilege(PgWorkerError):
    """The login running `schema apply` lacks a privilege it needs."""

    def __init__(self, user: str, lacking: list[str]) -> None:
        self.lacking = lacking
        super().__init__(
            f"`schema apply` as {user} lacks: "
            + "; ".join(lacking)
            + ". Run it as the owner of NoETL's tables; the worker itself needs only a login"
            " granted noetl_pgworker (`schema apply --with-role`)"
        )


def _missing(conn: psycopg.Connection[Any]) -> list[str]:
    missing: list[str] = []
    with conn.cursor() as cur:
        for name in ("verify_objects", "verify_columns"):
            cur.execute(query(name))
            missing += [str(obj) for obj, present in cur.fetchall() if not present]
    # A missing table explains its missing columns; name the table alone.
    tables = {m.removeprefix("table ") for m in missing if m.startswith("table ")}
    return [
        m
        for m in missing
        if not (m.startswith("column ") and m.removeprefix("column ").rsplit(".", 1)[0] in tables)
    ]


def verify(conn: psycopg.Connection[Any]) -> list[str]:
    """Names of the objects the worker needs but the database lacks (empty when all is well)."""
    try:
        return _missing(conn)
    finally:
        if not conn.autocommit:
            conn.rollback()


def require(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`SchemaMissing` naming what is missing."""
    missing = verify(conn)
    if missing:
        raise SchemaMissing(missing)
