"""The least-privilege role: everything a worker does works, nothing else does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from noetl_pgworker import schema
from noetl_pgworker.enqueue import enqueue
from noetl_pgworker.source import ClaimOptions, PgCommandSource

from ..conftest import RunningWorker
from ..helpers import count_status, role_login, scalar

pytestmark = pytest.mark.integration


@pytest.fixture
def limited_dsn(dsn: str) -> Iterator[str]:
    """A login that holds nothing but the noetl_pgworker role."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        # What older releases granted: UPDATE on every column. Applying the role narrows it.
        schema.apply(admin, with_role=True)
        admin.execute("GRANT SELECT, UPDATE, INSERT ON noetl.command TO noetl_pgworker")
        admin.execute("GRANT INSERT, UPDATE ON noetl.event, noetl.runtime TO noetl_pgworker")
        schema.apply(admin, with_role=True)
    with role_login(dsn, "pgw_role") as login_dsn:
        yield login_dsn


def source(pool: ConnectionPool[Any], worker_id: str) -> PgCommandSource:
    return PgCommandSource(
        pool,
        worker_id=worker_id,
        tool_kinds=("noop", "python"),
        options=ClaimOptions(lease=60, stale_after=30, max_attempts=3),
    )


def test_the_role_runs_every_worker_statement(
    limited_dsn: str, conn: psycopg.Connection[Any], start_worker: Callable[..., RunningWorker]
) -> None:
    # Cancel of an ended execution, claim, release, reclaim and poison: as the limited login.
    ended = enqueue(conn, tool_kind="noop", count=1)
    conn.execute(
        "INSERT INTO noetl.event (execution_id, catalog_id, event_id, event_type, status)"
        " VALUES (%s, %s, noetl.snowflake_id(), 'playbook.failed', 'FAILED')",
        (ended.execution_ids[0], ended.catalog_id),
    )
    enqueue(conn, tool_kind="noop", count=3)
    dead = enqueue(conn, tool_kind="python", tool_config={"code": "result = 1"}, count=2)
    conn.execute(
        "UPDATE noetl.command SET status = 'RUNNING', worker_id = 'crasher',"
        " attempt = CASE WHEN command_id = %s THEN 3 ELSE 1 END,"
        " claimed_at = now() - interval '1 hour' WHERE tool_kind = 'python'",
        (dead.command_ids[0],),
    )
    with ConnectionPool(limited_dsn, min_size=1, max_size=2, open=True) as pool:
        src = source(pool, "limited")
        try:
            src._claim(10)
            assert src.counts.cancelled == 1 and src.counts.poisoned == 1
            assert src.buffered() == 4  # 3 noop + 1 reclaimed python
            assert src.release_unstarted() == 4
        finally:
            src.close()
    assert count_status(conn, "PENDING") == 4
    assert count_status(conn, "CANCELLED") == 1 and count_status(conn, "FAILED") == 1

    # A whole drain: claims, runs, writes outcomes and events, heartbeats, goes offline.
    enqueue(conn, tool_kind="python", tool_config={"code": "raise ValueError('no')"}, count=1)
    summary = start_worker(dsn=limited_dsn, drain=True, worker_id="limited").join(60)
    assert summary.clean
    assert count_status(conn, "COMPLETED") == 4 and count_status(conn, "FAILED") == 2
    assert scalar(conn, "SELECT status FROM noetl.runtime WHERE name = 'limited'") == "offline"
    assert scalar(conn, "SELECT count(*) FROM noetl.event WHERE worker_id = 'limited'") > 8


@pytest.mark.parametrize(
    "statement",
    [
        'UPDATE noetl.command SET context = \'{"tool_config": {"code": "evil"}}\'',
        "UPDATE noetl.command SET tool_kind = 'shell'",
        "UPDATE noetl.command SET execution_id = 1",
        "INSERT INTO noetl.command (command_id, event_id, execution_id, catalog_id, step_name,"
        " tool_kind, status) VALUES (1, 1, 1, 1, 's', 'shell', 'PENDING')",
        "DELETE FROM noetl.command",
        "UPDATE noetl.event SET result = '{}'",
        "DELETE FROM noetl.event",
        "UPDATE noetl.runtime SET kind = 'server_api'",
        "UPDATE noetl.runtime SET name = 'someone-else'",
    ],
)
def test_the_role_cannot_rewrite_what_the_worker_does_not_write(
    limited_dsn: str, conn: psycopg.Connection[Any], statement: str
) -> None:
    enqueue(conn, tool_kind="noop", count=1)
    with (
        psycopg.connect(limited_dsn) as limited,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        limited.execute(statement)
