"""A managed PostgreSQL: the worker's login is no superuser and owns nothing.

Everything the worker does at run time works for a login holding only the noetl_pgworker role
(the drain itself is in test_roles.py); `schema apply` run by such a login says which
privileges it lacks, in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import conninfo, sql

from noetl_pgworker.enqueue import enqueue
from noetl_pgworker.queries import query
from noetl_pgworker.session import WORKER_LOCK_CLASS, ClaimSession, WorkerIdInUse

from .test_roles import limited_dsn  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "noetl_pgworker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def other_login(dsn: str, limited_dsn: str) -> Iterator[str]:  # noqa: F811
    """A second login with only the noetl_pgworker role (another worker host, say)."""
    login = f"pgw_other_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE noetl_pgworker").format(sql.Identifier(login))
        )
    try:
        yield conninfo.make_conninfo(dsn, user=login)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login)))


@pytest.mark.parametrize("flags", [(), ("--with-role",), ("--with-noetl-tables",)])
def test_schema_apply_names_the_privileges_it_lacks(
    limited_dsn: str,  # noqa: F811
    flags: tuple[str, ...],
) -> None:
    out = cli("schema", "apply", *flags, "--dsn", limited_dsn)
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "lacks: CREATE on schema noetl" in lines[0]
    assert "ownership of noetl.command (owner: postgres" in lines[0]
    assert "Traceback" not in out.stderr


def test_one_process_per_worker_id_holds_between_non_superuser_logins(
    limited_dsn: str,  # noqa: F811
    other_login: str,
) -> None:
    first = ClaimSession(limited_dsn, worker_id="managed")
    first.open()
    try:
        # The lock query reads pg_locks and pg_stat_activity only to name the holder: another
        # login may not see it, and the answer is still "taken".
        with psycopg.connect(other_login, autocommit=True) as conn:
            row = conn.execute(
                query("lock_worker_id"), {"cls": WORKER_LOCK_CLASS, "worker_id": "managed"}
            ).fetchone()
            assert row is not None and row[0] is False
        with pytest.raises(WorkerIdInUse, match="already running as worker id 'managed'"):
            ClaimSession(other_login, worker_id="managed").open()
    finally:
        first.close()
    second = ClaimSession(other_login, worker_id="managed")
    second.open()  # free again once the first is gone
    second.close()


def test_status_and_enqueue_work_for_the_worker_login(
    limited_dsn: str,  # noqa: F811
    conn: psycopg.Connection[object],
) -> None:
    enqueue(conn, tool_kind="noop", count=3)
    out = cli("status", "--json", "--dsn", limited_dsn)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)
    out = cli("schema", "verify", "--dsn", limited_dsn)
    assert out.returncode == 0, out.stderr
