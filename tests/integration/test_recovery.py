"""Taking back the claims of dead workers, in the claim path."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from noetl_pgworker.enqueue import enqueue
from noetl_pgworker.source import ClaimOptions, PgCommandSource, SourceHooks

from ..conftest import RunningWorker
from ..helpers import count_status, scalar, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def pool(dsn: str) -> Iterator[ConnectionPool[Any]]:
    with ConnectionPool(dsn, min_size=1, max_size=2, open=True) as p:
        yield p


def source(pool: ConnectionPool[Any], worker_id: str = "rescuer", **kw: Any) -> PgCommandSource:
    hooks = {k: kw.pop(k) for k in list(kw) if k in SourceHooks.__dataclass_fields__}
    return PgCommandSource(
        pool,
        worker_id=worker_id,
        tool_kinds=("noop", "python"),
        hooks=SourceHooks(**hooks),
        options=ClaimOptions(lease=60, stale_after=30, **kw),
    )


def claim_as(
    conn: psycopg.Connection[Any],
    worker: str,
    age_s: int,
    status: str = "RUNNING",
    attempt: int = 1,
) -> None:
    conn.execute(
        "UPDATE noetl.command SET status = %s, worker_id = %s, attempt = %s,"
        " claimed_at = now() - make_interval(secs => %s)",
        (status, worker, attempt, age_s),
    )


def register(conn: psycopg.Connection[Any], worker: str, status: str, heartbeat_age_s: int) -> None:
    conn.execute(
        "INSERT INTO noetl.runtime (runtime_id, name, kind, status, heartbeat)"
        " VALUES (noetl.snowflake_id(), %s, 'worker_pool', %s, now() - make_interval(secs => %s))",
        (worker, status, heartbeat_age_s),
    )


@pytest.mark.parametrize(
    ("status", "heartbeat_age", "reason"),
    [
        ("ready", 300, "heartbeat stale"),
        ("offline", 0, "worker offline"),
        (None, 0, "worker not registered"),
    ],
)
def test_a_dead_workers_claim_is_taken_back(
    pool: ConnectionPool[Any],
    conn: psycopg.Connection[Any],
    status: str | None,
    heartbeat_age: int,
    reason: str,
) -> None:
    enqueue(conn, tool_kind="noop", count=1)
    claim_as(conn, "dead-1", age_s=600)
    if status:
        register(conn, "dead-1", status, heartbeat_age)
    src = source(pool)
    (cmd,) = src.claim(5)
    assert cmd.attempt == 2
    row = conn.execute("SELECT status, worker_id, attempt FROM noetl.command").fetchone()
    assert row == ("CLAIMED", "rescuer", 2)
    meta = scalar(
        conn,
        "SELECT meta FROM noetl.event WHERE event_type = 'command.claimed'"
        " ORDER BY event_id DESC LIMIT 1",
    )
    assert meta["reclaimed"] is True
    assert meta["reclaimed_from_worker"] == "dead-1"
    assert meta["reason"] == reason
    assert src.counts.reclaimed == 1


def test_a_live_workers_claim_is_never_touched(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, tool_kind="noop", count=1)
    claim_as(conn, "alive", age_s=3600)  # a long-running command...
    register(conn, "alive", "ready", 1)  # ...of a worker that is alive
    assert source(pool).claim(5) == []
    assert scalar(conn, "SELECT worker_id FROM noetl.command") == "alive"


def test_a_young_claim_is_kept_even_if_its_worker_looks_dead(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, tool_kind="noop", count=1)
    claim_as(conn, "maybe-dead", age_s=10)  # younger than the 60 s lease
    assert source(pool).claim(5) == []
    assert scalar(conn, "SELECT worker_id FROM noetl.command") == "maybe-dead"


def test_a_command_abandoned_max_attempts_times_fails_as_poison(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, tool_kind="python", count=1)
    enqueue(conn, tool_kind="noop", count=1)
    conn.execute(
        "UPDATE noetl.command SET status = 'RUNNING', worker_id = 'crasher', attempt = 3,"
        " claimed_at = now() - interval '1 hour' WHERE tool_kind = 'python'"
    )
    src = source(pool, max_attempts=3)
    got = src.claim(5)
    assert [c.tool_kind for c in got] == ["noop"]  # the queue goes on
    status, error, result = conn.execute(
        "SELECT status, error, result FROM noetl.command WHERE tool_kind = 'python'"
    ).fetchone()  # type: ignore[misc]
    assert status == "FAILED"
    assert "abandoned by 3 worker(s)" in error and "crasher" in error
    assert result["status"] == "FAILED" and result["context"]["error_type"] == "abandoned"
    finals = scalar(conn, "SELECT count(*) FROM noetl.event WHERE event_type = 'command.failed'")
    assert finals == 1
    assert src.counts.poisoned == 1


def test_own_claims_from_a_previous_life_are_taken_back_at_start(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, tool_kind="noop", count=2)
    claim_as(conn, "same-name", age_s=1)  # young, and our runtime row would look alive
    register(conn, "same-name", "ready", 0)
    got = source(pool, worker_id="same-name").claim(5)
    assert len(got) == 2 and all(c.attempt == 2 for c in got)
    reasons = conn.execute(
        "SELECT meta ->> 'reason' FROM noetl.event WHERE meta ? 'reclaimed'"
    ).fetchall()
    assert reasons == [("orphaned",), ("orphaned",)]


def test_own_claims_that_this_process_holds_are_left_alone(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    first, second = enqueue(conn, tool_kind="noop", count=2).command_ids
    claim_as(conn, "me", age_s=600)
    register(conn, "me", "ready", 0)
    got = source(pool, worker_id="me", held=lambda: [first]).claim(5)
    assert [int(c.command_id) for c in got] == [second]


def test_recovery_ignores_kinds_this_worker_does_not_run(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, tool_kind="http", count=1)
    claim_as(conn, "dead-2", age_s=600)
    assert source(pool).claim(5) == []
    assert scalar(conn, "SELECT worker_id FROM noetl.command") == "dead-2"


OVERLAP = (
    "import time\n"
    "def main():\n"
    "    t0 = time.time()\n"
    "    time.sleep(2)\n"
    "    return {'start': t0, 'end': time.time()}\n"
)


def test_taken_back_commands_tell_their_run_and_run_side_by_side_when_isolated(
    start_worker: Any, conn: psycopg.Connection[Any]
) -> None:
    """Commands of a dead worker, taken back: each run writes its own command.started (the
    trail tells attempt 2 ran), and python commands (each in a process of its own, where a
    poison kills only itself) run at the same time instead of one after another."""
    enqueue(conn, tool_kind="python", tool_config={"code": OVERLAP}, count=4)
    claim_as(conn, "dead-3", age_s=600)
    conn.execute(
        "INSERT INTO noetl.event (execution_id, catalog_id, event_id, event_type, status,"
        " worker_id, command_id) SELECT execution_id, catalog_id, noetl.snowflake_id(),"
        " 'command.started', 'RUNNING', 'dead-3', command_id FROM noetl.command"
    )
    running: RunningWorker = start_worker(
        worker_id="rescuer", concurrency=4, python_mode="process", tool_kinds=("python",)
    )
    wait_until(lambda: count_status(conn, "COMPLETED") == 4, timeout=60)
    running.stop()
    started = conn.execute(
        "SELECT command_id, worker_id FROM noetl.event WHERE event_type = 'command.started'"
    ).fetchall()
    assert sorted(w for _, w in started) == ["dead-3"] * 4 + ["rescuer"] * 4, started
    spans = [
        (r[0]["context"]["start"], r[0]["context"]["end"])
        for r in conn.execute("SELECT result FROM noetl.command").fetchall()
    ]
    spans.sort()
    # side by side: a command started before the one before it ended
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans
