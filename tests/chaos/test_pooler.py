"""The worker through a real PgBouncer, in transaction and in session pooling mode.

Each test drains 2,000 commands with two worker processes through the pooler, reads the table
(:func:`table_check`: every command terminal, completed exactly once, no claim left), and
times a new command's start: within the poll interval when the worker polls (transaction
pooling without --session-dsn), at once when it listens (a session DSN, or session pooling).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from noetl_pgworker.enqueue import enqueue

from ..helpers import count_status, scalar, table_check, wait_until
from ..pgbouncer import pgbouncer
from .conftest import WorkerProcess, report, spawn

pytestmark = pytest.mark.chaos

N = 2000


def done(conn: psycopg.Connection[Any]) -> int:
    return count_status(conn, "COMPLETED", "FAILED", "CANCELLED")


def start_latencies(conn: psycopg.Connection[Any], rounds: int = 5) -> list[float]:
    """Seconds from a new command's commit to its completion, one command at a time."""
    out = []
    for _ in range(rounds):
        before = done(conn)
        t0 = time.monotonic()
        enqueue(conn, tool_kind="noop", count=1)
        wait_until(lambda before=before: done(conn) > before, timeout=30, interval=0.005)
        out.append(time.monotonic() - t0)
    return out


def ready(conn: psycopg.Connection[Any], worker_id: str) -> bool:
    return (
        scalar(
            conn,
            "SELECT count(*) FROM noetl.runtime WHERE name = %s AND status = 'ready'",
            (worker_id,),
        )
        == 1
    )


def clean_log(w: WorkerProcess) -> str:
    text = w.text()
    assert "Traceback" not in text, text
    assert 'prepared statement "' not in text, text
    assert "claiming paused" not in text, text
    return text


def test_drain_through_pgbouncer_transaction_pooling(
    chaos_dsn: str, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    # Fewer server connections than the workers' clients: consecutive transactions of one
    # client connection run on different server connections.
    with pgbouncer(chaos_dsn, "transaction", pool_size=4) as bouncer:
        via = bouncer.dsn(chaos_dsn)
        tx = ("--dsn", via, "--pool-mode", "transaction", "--concurrency", "8")
        with psycopg.connect(chaos_dsn, autocommit=True) as conn:
            enqueue(conn, tool_kind="noop", count=N, executions=20)
            t0 = time.monotonic()
            # One with a session DSN (LISTEN and session locks there), one without (polls).
            listening = spawn(
                workers, chaos_dsn, tmp_path, "pgb-listen", *tx,
                "--session-dsn", chaos_dsn, "--poll-interval", "5",
            )  # fmt: skip
            polling = spawn(workers, chaos_dsn, tmp_path, "pgb-poll", *tx, "--poll-interval", "0.5")
            wait_until(lambda: done(conn) == N, timeout=60)
            drained_in = time.monotonic() - t0
            by_worker = dict(
                conn.execute(
                    "SELECT worker_id, count(*) FROM noetl.command GROUP BY worker_id"
                ).fetchall()
            )
            assert by_worker.get("pgb-listen", 0) > 0 and by_worker.get("pgb-poll", 0) > 0

            # A session DSN: a new command starts at once (NOTIFY), not after 5 s of polling.
            assert polling.stop() == 0, polling.text()
            at_once = start_latencies(conn)
            assert max(at_once) < 1.0, at_once

            # Without one: within the poll interval, and no session lock is left behind on
            # the pooler's server connections.
            polling = spawn(workers, chaos_dsn, tmp_path, "pgb-poll", *tx, "--poll-interval", "0.5")
            wait_until(lambda: ready(conn, "pgb-poll"), timeout=30)
            assert listening.stop() == 0, listening.text()
            polled = start_latencies(conn)
            assert max(polled) < 0.5 + 0.5, polled
            locks = scalar(
                conn,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            assert locks == 0, "session locks taken through the transaction pooler"
            assert polling.stop() == 0, polling.text()

            figures = table_check(conn, N + 10)
        assert figures["duplicates_completed"] == 0
        listen_log, poll_log = clean_log(listening), clean_log(polling)
        assert "pool mode transaction" in listen_log and "--session-dsn" in listen_log
        assert "no LISTEN" not in listen_log
        assert "no LISTEN" in poll_log and "not enforced" in poll_log
    report(
        "pgbouncer transaction pooling",
        drain_s=round(drained_in, 2),
        start_at_once_max_s=round(max(at_once), 3),
        start_polled_p50_s=round(statistics.median(polled), 3),
        start_polled_max_s=round(max(polled), 3),
        **figures,
    )


def test_drain_through_pgbouncer_session_pooling(
    chaos_dsn: str, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    with pgbouncer(chaos_dsn, "session", pool_size=40) as bouncer:
        via = bouncer.dsn(chaos_dsn)
        # A long poll interval: a fast start proves that LISTEN works through the pooler.
        sess = ("--dsn", via, "--pool-mode", "session", "--concurrency", "8")
        with psycopg.connect(chaos_dsn, autocommit=True) as conn:
            enqueue(conn, tool_kind="noop", count=N, executions=20)
            t0 = time.monotonic()
            a = spawn(workers, chaos_dsn, tmp_path, "pgb-a", *sess, "--poll-interval", "5")
            b = spawn(workers, chaos_dsn, tmp_path, "pgb-b", *sess, "--poll-interval", "5")
            wait_until(lambda: done(conn) == N, timeout=60)
            drained_in = time.monotonic() - t0
            at_once = start_latencies(conn)
            assert max(at_once) < 1.0, at_once
            # Session locks hold through session pooling: a second "pgb-a" refuses to start.
            twin = spawn(workers, chaos_dsn, tmp_path, "pgb-a", *sess)
            assert twin.wait(30) == 1
            assert "already running as worker id 'pgb-a'" in twin.text(), twin.text()
            assert a.stop() == 0, a.text()
            assert b.stop() == 0, b.text()
            figures = table_check(conn, N + 5)
        assert figures["duplicates_completed"] == 0
        for w in (a, b):
            assert "pool mode session" in clean_log(w)
    report(
        "pgbouncer session pooling",
        drain_s=round(drained_in, 2),
        start_at_once_max_s=round(max(at_once), 3),
        **figures,
    )


def test_a_pooler_without_pool_mode_is_named_with_the_option(chaos_dsn: str) -> None:
    """PgBouncer refuses the `options` startup parameter the worker sends in direct mode: the
    error names the cause and the option, instead of a bare time-out."""
    import subprocess
    import sys

    with pgbouncer(chaos_dsn, "session", pool_size=4) as bouncer:
        args = [sys.executable, "-m", "noetl_pgworker", "start", "--drain"]
        args += ["--dsn", bouncer.dsn(chaos_dsn), "--connect-timeout", "3", "--worker-id", "x"]
        r = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert r.returncode == 1, r.stderr
    assert "unsupported startup parameter" in r.stderr, r.stderr
    assert "--pool-mode session" in r.stderr, r.stderr
