"""The worker id's lock: taken back from one's own abandoned session, or from a dead earlier
process, never from a live one."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from noetl_pgworker import incarnation
from noetl_pgworker.incarnation import WORKER_LOCK_CLASS, WorkerIdInUse, take_worker_id

pytestmark = pytest.mark.integration


OPEN: list[psycopg.Connection[Any]] = []


@pytest.fixture(autouse=True)
def _close_holders() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def holder(dsn: str, worker_id: str, token: str, role: str = "claim") -> psycopg.Connection[Any]:
    """A session that holds the worker id's lock, named as a worker's claim session."""
    conn = psycopg.connect(
        dsn, autocommit=True, application_name=incarnation.application_name(role, worker_id, token)
    )
    locked = conn.execute(
        "SELECT pg_try_advisory_lock(%s::int, hashtext(%s::text))", (WORKER_LOCK_CLASS, worker_id)
    ).fetchone()
    assert locked == (True,)
    OPEN.append(conn)
    return conn


def beat(
    conn: psycopg.Connection[Any], worker_id: str, age: float = 0.0, status: str = "ready"
) -> None:
    conn.execute(
        "INSERT INTO noetl.runtime (runtime_id, name, kind, status, runtime, heartbeat)"
        " VALUES (noetl.snowflake_id(), %(n)s, 'worker_pool', %(s)s, %(r)s::jsonb,"
        "         now() - make_interval(secs => %(age)s))"
        " ON CONFLICT (kind, name) DO UPDATE SET heartbeat = EXCLUDED.heartbeat,"
        "   status = EXCLUDED.status",
        {"n": worker_id, "s": status, "r": json.dumps({}), "age": age},
    )


def alive(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


def test_own_abandoned_session_is_ended(dsn: str, conn: psycopg.Connection[Any]) -> None:
    old = holder(dsn, "w1", "aaaa0001")
    pool_session = holder(dsn, "w1-other", "aaaa0001", role="")  # same incarnation, no lock
    with psycopg.connect(dsn, autocommit=True) as mine:
        take_worker_id(mine, "w1", "aaaa0001", stale_after=30, running=True)
    assert not alive(old)
    assert not alive(pool_session)  # every session of the incarnation goes


def test_a_live_process_keeps_its_id(dsn: str, conn: psycopg.Connection[Any]) -> None:
    other = holder(dsn, "w2", "bbbb0001")
    beat(conn, "w2")
    stop = threading.Event()

    def beating() -> None:
        while not stop.wait(0.3):
            beat(conn_b, "w2")

    with psycopg.connect(dsn, autocommit=True) as conn_b:
        t = threading.Thread(target=beating, daemon=True)
        t.start()
        try:
            with psycopg.connect(dsn, autocommit=True) as mine, pytest.raises(WorkerIdInUse):
                take_worker_id(mine, "w2", "cccc0001", stale_after=5, running=False)
        finally:
            stop.set()
            t.join(5)
    assert alive(other)
    # While running, a process never takes its id back from another incarnation.
    with (
        psycopg.connect(dsn, autocommit=True) as mine,
        pytest.raises(WorkerIdInUse, match="taken over by another process"),
    ):
        take_worker_id(mine, "w2", "cccc0001", stale_after=0.1, running=True)
    assert alive(other)


def test_a_dead_earlier_process_is_taken_over(dsn: str, conn: psycopg.Connection[Any]) -> None:
    old = holder(dsn, "w3", "dddd0001")
    old_listener = holder(dsn, "w3-l", "dddd0001", role="listener")
    bystander = holder(dsn, "w3-b", "eeee0001")
    beat(conn, "w3", age=60)
    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as mine:
        take_worker_id(mine, "w3", "ffff0001", stale_after=30, running=False)
        assert time.monotonic() - t0 < 10
    assert not alive(old) and not alive(old_listener)
    assert alive(bystander)


def test_a_heartbeat_that_stops_is_taken_over_after_stale_after(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    old = holder(dsn, "w4", "abab0001")
    beat(conn, "w4", age=0.5)
    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as mine:
        take_worker_id(mine, "w4", "cdcd0001", stale_after=2, running=False)
    waited = time.monotonic() - t0
    assert 1.0 <= waited < 10, waited
    assert not alive(old)


def test_an_offline_holder_is_taken_over(dsn: str, conn: psycopg.Connection[Any]) -> None:
    old = holder(dsn, "w5", "efef0001")
    beat(conn, "w5", status="offline")
    with psycopg.connect(dsn, autocommit=True) as mine:
        take_worker_id(mine, "w5", "0a0a0001", stale_after=30, running=False)
    assert not alive(old)
