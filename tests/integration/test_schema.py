from __future__ import annotations

from typing import Any

import psycopg
import pytest

from noetl_pgworker import schema
from noetl_pgworker.errors import SchemaMissing
from noetl_pgworker.queries import read_sql_file

pytestmark = pytest.mark.integration

SNAPSHOT = """
SELECT 'class' AS kind, c.oid::text, c.relname, c.relkind::text, pg_get_userbyid(c.relowner)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'noetl'
UNION ALL
SELECT 'trigger', t.oid::text, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'noetl'
UNION ALL
SELECT 'proc', p.oid::text, p.proname, md5(pg_get_functiondef(p.oid)), ''
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'noetl'
ORDER BY 1, 3, 2
"""


def snapshot(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(SNAPSHOT).fetchall()


def test_apply_twice_is_a_no_op(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn) as conn:
        schema.apply(conn, with_noetl_tables=True)
        first = snapshot(conn)
        conn.commit()
        schema.apply(conn, with_noetl_tables=True)
        schema.apply(conn)
        assert snapshot(conn) == first
        assert schema.verify(conn) == []


def test_the_noetl_tables_match_the_contract(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn) as conn:
        schema.apply(conn, with_noetl_tables=True)
        parts = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'noetl.command'::regclass"
        ).fetchone()
        assert parts == (16,)
        strategy = conn.execute(
            "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'noetl.command'::regclass"
        ).fetchone()
        assert strategy == ("h",)
        assert conn.execute(
            "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'noetl.event'::regclass"
        ).fetchone() == ("r",)
        pk = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'noetl.command'::regclass AND contype = 'p'"
        ).fetchone()
        assert pk == ("PRIMARY KEY (execution_id, command_id)",)
        ids = conn.execute("SELECT noetl.snowflake_id() FROM generate_series(1, 1000)").fetchall()
        assert len({i for (i,) in ids}) == 1000


def test_the_event_result_check_rejects_bad_envelopes(conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO noetl.resource (name) VALUES ('playbook')")
    conn.execute("INSERT INTO noetl.catalog (catalog_id, path, kind) VALUES (1, 'p', 'playbook')")
    insert = (
        "INSERT INTO noetl.event (execution_id, catalog_id, event_id, event_type, result)"
        " VALUES (1, 1, %s, 'x', %s::jsonb)"
    )
    conn.execute(insert, (1, '{"status": "OK", "context": {"a": 1}, "reference": {}}'))
    for i, bad in enumerate(
        [
            '{"context": {}}',
            '{"status": "OK", "data": 1}',
            '{"status": 1}',
            "[1]",
            '{"status": "OK", "context": 5}',
        ]
    ):
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(insert, (10 + i, bad))


def test_verify_names_what_is_missing_and_apply_refuses_without_noetl(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn) as conn:
        missing = schema.verify(conn)
        assert "table noetl.command" in missing
        assert "trigger pgworker_command_notify on noetl.command" in missing
        assert not any(m.startswith("column noetl.command.") for m in missing)
        with pytest.raises(SchemaMissing, match=r"table noetl\.command"):
            schema.apply(conn)


def test_worker_objects_apply_to_a_noetl_database_and_leave_it_alone(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn) as conn:
        conn.execute(read_sql_file("noetl_tables.sql").encode())  # "NoETL's own" schema
        conn.commit()
        assert "trigger pgworker_command_notify on noetl.command" in schema.verify(conn)
        before = set(snapshot(conn))
        schema.apply(conn)
        conn.commit()
        after = set(snapshot(conn))
        assert before <= after  # nothing of NoETL's altered or dropped
        for kind, _oid, name, detail, _ in after - before:
            # only our trigger, function and claim index (with its per-partition children)
            assert "pgworker" in name or (kind == "class" and detail == "i"), name
        assert schema.verify(conn) == []


def test_one_notify_per_inserting_transaction(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn) as writer:
        listener.execute("LISTEN noetl_pgworker_command")
        from noetl_pgworker.enqueue import enqueue

        enqueue(writer, tool_kind="noop", count=500, executions=7)
        with writer.transaction():
            for _ in range(3):
                enqueue(writer, tool_kind="noop", count=2)
        got = list(listener.notifies(timeout=1.0))
        assert len(got) == 2
        assert {n.channel for n in got} == {"noetl_pgworker_command"}


def test_uninstall_removes_the_workers_objects_and_keeps_noetls(dsn: str) -> None:
    from noetl_pgworker.enqueue import enqueue

    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.apply(conn, with_role=True)
        enqueue(conn, tool_kind="noop", count=3)
        schema.uninstall(conn, with_role=True)
        missing = schema.verify(conn)
        assert missing and all("pgworker" in m for m in missing), missing
        assert conn.execute("SELECT count(*) FROM noetl.command").fetchone() == (3,)
        assert conn.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'noetl_pgworker'"
        ).fetchone() == (0,)
        schema.uninstall(conn)  # again: nothing left to remove, no error
        schema.apply(conn)  # and back
        assert schema.verify(conn) == []


def test_apply_on_a_database_without_noetl_names_it_and_the_option(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn) as conn, pytest.raises(schema.NoNoetlTables) as err:
        schema.apply(conn)
    dbname = psycopg.conninfo.conninfo_to_dict(empty_dsn)["dbname"]
    assert f"the database {dbname} has no NoETL tables" in str(err.value)
    assert "--with-noetl-tables" in str(err.value)
