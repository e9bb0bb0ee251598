"""Kill, restart, cut off and pause workers and the database mid-drain; then read the table.

Every test ends with :func:`table_check`: each command terminal, exactly one
``command.completed|command.failed`` event per command, none left CLAIMED/RUNNING, none lost.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from noetl_pgworker.enqueue import enqueue

from ..helpers import count_status, scalar, table_check, wait_until
from .conftest import WorkerProcess, report, spawn

pytestmark = pytest.mark.chaos

SLEEPY = "import time\ndef main(s=1.0):\n    time.sleep(s)\n    return {'slept': s}\n"


def done(conn: psycopg.Connection[Any]) -> int:
    return count_status(conn, "COMPLETED", "FAILED", "CANCELLED")


def test_kill_9_one_of_two_workers_mid_drain(
    chaos_dsn: str, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    n = 5000
    # 5 ms of work each (inline python): a worker always has commands in hand when it is killed.
    quick = {"code": "import time\ntime.sleep(0.005)\nresult = 1"}
    inline = ("--concurrency", "8", "--python-mode", "inline")
    with psycopg.connect(chaos_dsn, autocommit=True) as conn:
        enqueue(conn, tool_kind="python", tool_config=quick, count=n, executions=50)
        victim = spawn(workers, chaos_dsn, tmp_path, "victim", *inline)
        survivor = spawn(workers, chaos_dsn, tmp_path, "survivor", *inline)
        # Killed mid-drain while it holds claims. A worker writes its outcomes in batches, and a
        # write it has sent commits even if it dies, so it is frozen first (SIGSTOP), its
        # statements in flight are let finish, and it is killed only if it then still holds
        # claims; else it is let go on for a moment and caught again.
        # (A session "active" but waiting to read from the client was frozen mid-pipeline: the
        # server waits for the rest, and nothing of it commits if the client dies.)
        victim_sessions = (
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
            " AND wait_event IS DISTINCT FROM 'ClientRead'"
            " AND application_name LIKE 'noetl-pgworker%%:victim'"
        )
        held_now = (
            "SELECT count(*) FROM noetl.command WHERE worker_id = 'victim'"
            " AND status IN ('CLAIMED', 'RUNNING')"
        )
        wait_until(
            lambda: (
                scalar(
                    conn,
                    "SELECT count(*) FROM noetl.command WHERE worker_id = 'victim'"
                    " AND status = 'COMPLETED'",
                )
                >= 500
            ),
            timeout=60,
        )
        for _ in range(200):
            victim.signal(signal.SIGSTOP)
            wait_until(lambda: scalar(conn, victim_sessions) == 0, timeout=10, interval=0.005)
            if scalar(conn, held_now) > 0:
                break
            victim.signal(signal.SIGCONT)
            time.sleep(0.003)
        victim.proc.kill()
        killed_at = time.monotonic()
        victim.wait()
        # Its backends may still be finishing a commit it sent just before it died.
        wait_until(
            lambda: (
                scalar(
                    conn,
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name LIKE 'noetl-pgworker%%:victim'",
                )
                == 0
            ),
            timeout=30,
        )
        # What it held when it died: still in its name, or already taken back by the survivor
        # (a slow moment here can outlast --lease and --stale-after: 2 s), in one snapshot.
        orphaned = scalar(
            conn,
            "SELECT (SELECT count(*) FROM noetl.command WHERE worker_id = 'victim'"
            "        AND status IN ('CLAIMED', 'RUNNING'))"
            "     + (SELECT count(*) FROM noetl.event WHERE event_type = 'command.claimed'"
            "        AND meta ->> 'reclaimed_from_worker' = 'victim')",
        )
        wait_until(lambda: done(conn) == n, timeout=120)
        recovered_in = time.monotonic() - killed_at
        assert survivor.stop() == 0, survivor.text()
        figures = table_check(conn, n)
    assert figures["duplicates_completed"] == 0
    assert orphaned > 0  # it died holding claims...
    assert figures["recovered"] == orphaned  # ...and every one was taken back
    report(
        "kill -9 one of two workers",
        kills=1,
        orphaned_claims=orphaned,
        time_to_recover_s=round(recovered_in, 2),
        **figures,
    )


def test_postgres_restart_mid_drain(
    chaos_dsn: str, chaos_cluster: Any, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    n = 3000
    with psycopg.connect(chaos_dsn, autocommit=True) as conn:
        enqueue(conn, tool_kind="noop", count=n, executions=30)
    a = spawn(workers, chaos_dsn, tmp_path, "restart-a", "--concurrency", "8")
    b = spawn(workers, chaos_dsn, tmp_path, "restart-b", "--concurrency", "8")
    with psycopg.connect(chaos_dsn, autocommit=True) as conn:
        wait_until(lambda: done(conn) >= 600, timeout=60)
    t0 = time.monotonic()
    chaos_cluster.restart()
    with psycopg.connect(chaos_dsn, autocommit=True) as conn:
        wait_until(lambda: done(conn) == n, timeout=120)
        recovered_in = time.monotonic() - t0
        assert a.proc.poll() is None and b.proc.poll() is None, "a worker died with the database"
        assert a.stop() == 0, a.text()
        assert b.stop() == 0, b.text()
        figures = table_check(conn, n)
    assert figures["duplicates_completed"] == 0
    log = a.text() + b.text()
    assert "Traceback" not in log
    assert (
        "database unavailable" in log or "cannot write outcomes" in log or "claiming paused" in log
    )
    report(
        "postgres restart mid-drain",
        restarts=1,
        time_to_recover_s=round(recovered_in, 2),
        **figures,
    )


def test_every_worker_connection_terminated_mid_drain(
    chaos_dsn: str, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    n = 3000
    with psycopg.connect(chaos_dsn, autocommit=True) as conn:
        enqueue(conn, tool_kind="noop", count=n, executions=30)
        w = spawn(
            workers, chaos_dsn, tmp_path, "cut-off", "--concurrency", "8", "--poll-interval", "60"
        )
        wait_until(lambda: done(conn) >= 500, timeout=60)
        killed = 0
        for _ in range(3):
            killed += scalar(
                conn,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name LIKE 'noetl-pgworker%%'",
            )
            time.sleep(0.3)
        t0 = time.monotonic()
        wait_until(lambda: done(conn) == n, timeout=120)
        recovered_in = time.monotonic() - t0
        # The listener came back: a new command starts without waiting for the 60 s poll.
        enqueue(conn, tool_kind="noop", count=1)
        wait_until(lambda: done(conn) == n + 1, timeout=20)
        assert w.stop() == 0, w.text()
        figures = table_check(conn, n + 1)
    assert killed >= 3  # pool connections and the listener
    assert figures["duplicates_completed"] == 0
    assert "listener reconnected" in w.text()
    report(
        "pg_terminate_backend of all worker connections",
        terminated_backends=killed,
        time_to_recover_s=round(recovered_in, 2),
        **figures,
    )


def test_sigterm_mid_drain_then_a_second_worker_finishes(
    chaos_dsn: str, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    n = 40
    with psycopg.connect(chaos_dsn, autocommit=True) as conn:
        enqueue(conn, tool_kind="python", tool_config={"code": SLEEPY}, args={"s": 0.5}, count=n)
        first = spawn(workers, chaos_dsn, tmp_path, "first", "--concurrency", "4")
        wait_until(lambda: count_status(conn, "COMPLETED") >= 4, timeout=30)
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0, first.text()
        after_stop = dict(
            conn.execute("SELECT status, count(*) FROM noetl.command GROUP BY status").fetchall()
        )
        assert after_stop.get("CLAIMED", 0) == 0 and after_stop.get("RUNNING", 0) == 0
        assert after_stop["COMPLETED"] + after_stop.get("PENDING", 0) == n
        assert after_stop.get("PENDING", 0) > 0
        assert scalar(conn, "SELECT status FROM noetl.runtime WHERE name = 'first'") == "offline"
        second = spawn(workers, chaos_dsn, tmp_path, "second", "--concurrency", "8", "--drain")
        assert second.wait(60) == 0, second.text()
        figures = table_check(conn, n)
    assert figures["duplicates_executed"] == 0 and figures["recovered"] == 0
    report(
        "SIGTERM mid-drain",
        completed_by_first=after_stop["COMPLETED"],
        left_pending=after_stop.get("PENDING", 0),
        **figures,
    )


def test_a_command_that_kills_its_worker_ends_failed_after_max_attempts(
    chaos_dsn: str, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    n = 30
    with psycopg.connect(chaos_dsn, autocommit=True) as conn:
        enqueue(conn, tool_kind="noop", count=n - 1)
        enqueue(
            conn,
            tool_kind="python",
            step="poison",
            tool_config={"code": "import os\nos._exit(7)"},
            count=1,
        )
        crashes = 0
        deadline = time.monotonic() + 120
        # A supervisor, as systemd's Restart=on-failure would be.
        while done(conn) < n:
            assert time.monotonic() < deadline, "queue never drained"
            w = spawn(
                workers,
                chaos_dsn,
                tmp_path,
                None,
                "--concurrency",
                "2",
                "--drain",
                "--python-mode",
                "inline",
            )  # in-process: the code kills the worker
            code = w.wait(60)
            if code != 0:
                assert code == 7, w.text()
                crashes += 1
        status, error = conn.execute(
            "SELECT status, error FROM noetl.command WHERE step_name = 'poison'"
        ).fetchone()  # type: ignore[misc]
        figures = table_check(conn, n)
    assert status == "FAILED" and "abandoned by 3 worker(s)" in error, error
    assert crashes == 3
    assert count_status_after(chaos_dsn, "COMPLETED") == n - 1
    report("poison command kills its worker", kills=crashes, **figures)


def count_status_after(dsn: str, status: str) -> int:
    with psycopg.connect(dsn) as conn:
        return count_status(conn, status)


def test_a_paused_worker_cannot_overwrite_the_new_owners_result(
    chaos_dsn: str, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    n = 4
    with psycopg.connect(chaos_dsn, autocommit=True) as conn:
        enqueue(conn, tool_kind="python", tool_config={"code": SLEEPY}, args={"s": 2.0}, count=n)
        paused = spawn(workers, chaos_dsn, tmp_path, "paused", "--concurrency", "4")
        wait_until(lambda: count_status(conn, "RUNNING") == n, timeout=30)
        paused.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        owner = spawn(workers, chaos_dsn, tmp_path, "new-owner", "--concurrency", "4")
        wait_until(lambda: count_status(conn, "COMPLETED") == n, timeout=60)
        taken_in = time.monotonic() - stopped_at
        paused.signal(signal.SIGCONT)
        # The paused worker's sleeps are over: it tries to write, and the fence refuses.
        wait_until(lambda: "was lost" in paused.text(), timeout=30)
        assert paused.stop() == 0, paused.text()
        assert owner.stop() == 0, owner.text()
        winners = conn.execute("SELECT DISTINCT worker_id FROM noetl.command").fetchall()
        completers = conn.execute(
            "SELECT DISTINCT worker_id FROM noetl.event WHERE event_type = 'command.completed'"
        ).fetchall()
        figures = table_check(conn, n)
    assert winners == [("new-owner",)] and completers == [("new-owner",)]
    assert figures["duplicates_completed"] == 0
    assert figures["duplicates_executed"] == n  # at-least-once: both ran them
    report("SIGSTOP past the lease, then SIGCONT", paused_s=round(taken_in, 2), **figures)


def test_readyz_follows_the_database(chaos_dsn: str, chaos_cluster: Any) -> None:
    import threading
    import urllib.error
    import urllib.request

    from noetl_pgworker.config import Settings
    from noetl_pgworker.worker import Worker

    worker = Worker(
        Settings(
            dsn=chaos_dsn,
            metrics_port=0,
            metrics_host="127.0.0.1",
            heartbeat_interval=0.3,
            stale_after=2,
            poll_interval=0.2,
            connect_timeout=2,
        )
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    assert worker.wait_ready(30)

    def readyz() -> int:
        assert worker.health is not None
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{worker.health.port}/readyz", timeout=5
            ) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    try:
        wait_until(lambda: readyz() == 200, timeout=15)
        chaos_cluster.stop()
        try:
            wait_until(lambda: readyz() == 503, timeout=30, interval=0.2)
        finally:
            chaos_cluster.start()
        wait_until(lambda: readyz() == 200, timeout=60, interval=0.2)
    finally:
        worker.stop()
        thread.join(60)
    report("readyz across a database stop/start", ready_again=True)
