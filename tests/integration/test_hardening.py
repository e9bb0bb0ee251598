"""Rows and failures that once killed or wedged a worker: each now fails alone, or waits."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from noetl_pgworker.worker import WorkerThreadDied

from ..helpers import insert_raw_command, scalar, wait_until

pytestmark = pytest.mark.integration


def status_of(conn: psycopg.Connection[Any], command_id: int) -> tuple[str, str | None]:
    row = conn.execute(
        "SELECT status, error FROM noetl.command WHERE command_id = %s", (command_id,)
    ).fetchone()
    assert row is not None
    return str(row[0]), row[1]


def test_a_context_nested_thousands_deep_fails_alone(
    conn: psycopg.Connection[Any], start_worker: Callable[..., Any]
) -> None:
    deep = '{"input": {"x": ' + "[" * 3000 + "]" * 3000 + "}}"
    _, bad = insert_raw_command(conn, tool_kind="noop", context=deep)
    good = [insert_raw_command(conn, tool_kind="noop", context="{}")[1] for _ in range(3)]
    summary = start_worker(drain=True, concurrency=4).join(60)
    status, error = status_of(conn, bad)
    assert status == "FAILED"
    assert error is not None and "nested too deeply" in error
    assert all(status_of(conn, g)[0] == "COMPLETED" for g in good)
    assert summary.unwritten == 0


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_lone_surrogates_in_results_and_errors_are_stored(
    mode: str, conn: psycopg.Connection[Any], start_worker: Callable[..., Any]
) -> None:
    ok_code = 'def main():\n    return {"s": "\\ud800", "k\\udcff": 1}\n'
    bad_code = 'def main():\n    raise ValueError("bad \\udcff byte")\n'
    _, ok = insert_raw_command(
        conn, tool_kind="python", context=json.dumps({"tool_config": {"code": ok_code}})
    )
    _, bad = insert_raw_command(
        conn, tool_kind="python", context=json.dumps({"tool_config": {"code": bad_code}})
    )
    _, after = insert_raw_command(conn, tool_kind="noop", context="{}")
    start_worker(drain=True, python_mode=mode).join(60)
    assert status_of(conn, ok)[0] == "COMPLETED"
    result = scalar(conn, "SELECT result FROM noetl.command WHERE command_id = %s", (ok,))
    assert result["context"]["s"] == "\ufffd"
    status, error = status_of(conn, bad)
    assert status == "FAILED" and error is not None and "bad \ufffd byte" in error
    assert status_of(conn, after)[0] == "COMPLETED"  # the writer lived on


def test_a_dead_internal_thread_makes_the_worker_unready_and_stop_non_zero(
    start_worker: Callable[..., Any],
) -> None:
    running = start_worker(poll_interval=0.2)
    worker = running.worker
    assert worker.readiness()[0] or worker.readiness()[1] != "ready"
    reporter = worker.reporter
    assert reporter is not None

    def explode() -> float:
        raise SystemExit("simulated writer crash")  # BaseException: ends the thread

    original = threading.excepthook
    threading.excepthook = lambda args: None  # the traceback is expected; keep output clean
    try:
        reporter._until_writable = explode  # type: ignore[method-assign]
        with reporter._cond:
            reporter._cond.notify_all()
        wait_until(lambda: not reporter._thread.is_alive(), timeout=10)
        ready, why = worker.readiness()
        assert not ready and "noetl-pgworker-reporter" in why
        assert not worker.loop_alive(60)  # the systemd watchdog is no longer fed
        with pytest.raises(WorkerThreadDied, match="noetl-pgworker-reporter"):
            running.join(30)
    finally:
        threading.excepthook = original


def test_a_read_only_database_pauses_the_worker_and_fails_nothing(
    dsn: str, conn: psycopg.Connection[Any], start_worker: Callable[..., Any]
) -> None:
    """A failover looks like ``default_transaction_read_only``: outcomes wait, claims pause."""
    dbname = scalar(conn, "SELECT current_database()")
    code = "import time\ndef main():\n    time.sleep(2)\n    return {'ok': True}\n"
    _, slow = insert_raw_command(
        conn, tool_kind="python", context=json.dumps({"tool_config": {"code": code}})
    )
    running = start_worker(poll_interval=0.2, python_mode="inline")
    wait_until(lambda: status_of(conn, slow)[0] in ("CLAIMED", "RUNNING"))

    def kick_worker_sessions() -> None:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name LIKE 'noetl-pgworker%%'"
        )

    conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    try:
        kick_worker_sessions()
        # New commands arrive meanwhile (this session predates the setting).
        later = [insert_raw_command(conn, tool_kind="noop", context="{}")[1] for _ in range(3)]
        import time

        time.sleep(4)  # the slow command finished; its outcome cannot be written yet
        assert status_of(conn, slow)[0] in ("CLAIMED", "RUNNING")
        assert running.thread.is_alive()
    finally:
        conn.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
    kick_worker_sessions()
    wait_until(lambda: status_of(conn, slow)[0] == "COMPLETED", timeout=60)
    wait_until(lambda: all(status_of(conn, c)[0] == "COMPLETED" for c in later), timeout=60)
    assert scalar(conn, "SELECT count(*) FROM noetl.command WHERE status = 'FAILED'") == 0
    running.stop()


@pytest.mark.parametrize("kind", ["", " python ", "Python", "no op"])
def test_a_row_whose_tool_kind_is_not_a_kind_ends_failed(
    kind: str, conn: psycopg.Connection[Any], start_worker: Callable[..., Any]
) -> None:
    _, bad = insert_raw_command(conn, tool_kind=kind, context="{}")
    _, good = insert_raw_command(conn, tool_kind="noop", context="{}")
    # A worker that runs only noop still takes it: such a row is nobody's kind.
    start_worker(drain=True, tool_kinds=("noop",)).join(60)
    status, error = status_of(conn, bad)
    assert status == "FAILED", (status, error)
    assert error is not None and ("is not a tool kind" in error or "is empty" in error)
    assert status_of(conn, good)[0] == "COMPLETED"


def test_an_in_flight_row_without_claimed_at_is_taken_back(
    conn: psycopg.Connection[Any], start_worker: Callable[..., Any]
) -> None:
    _, lost = insert_raw_command(conn, tool_kind="noop", context="{}")
    conn.execute(
        "UPDATE noetl.command SET status = 'RUNNING', worker_id = 'gone', claimed_at = NULL,"
        " updated_at = now() - interval '1 hour' WHERE command_id = %s",
        (lost,),
    )
    from noetl_pgworker.status import read_status

    assert read_status(conn, lease=60).stuck == 1  # shown
    start_worker(drain=True, lease=60).join(60)
    assert status_of(conn, lost)[0] == "COMPLETED"  # and taken back


def test_an_empty_tool_kind_list_is_refused() -> None:
    from pydantic import ValidationError

    from noetl_pgworker.config import Settings

    for value in ("", " , ", ()):
        with pytest.raises(ValidationError, match="names no tool kind"):
            Settings(dsn="x", tool_kinds=value)


def test_outcomes_that_cannot_be_written_at_shutdown_are_kept_and_written_next_start(
    conn: psycopg.Connection[Any], start_worker: Callable[..., Any], tmp_path: Any
) -> None:
    """A stop during an outage: bounded, and the finished command's outcome is not dropped
    (it is not run again either)."""
    import time

    dbname = scalar(conn, "SELECT current_database()")
    marker = tmp_path / "runs"
    code = (
        "import time\n"
        f"def main():\n    with open({str(marker)!r}, 'a') as fh:\n        fh.write('x')\n"
        "    time.sleep(1.5)\n"
        "    return {'ok': 1}\n"
    )
    _, cid = insert_raw_command(
        conn, tool_kind="python", context=json.dumps({"tool_config": {"code": code}})
    )
    spool = tmp_path / "spool"
    first = start_worker(
        worker_id="spooler", python_mode="inline", spool_dir=str(spool), shutdown_timeout=2
    )
    wait_until(lambda: marker.exists())
    # While it runs the database turns read-only (a failover): its outcome cannot be written.
    conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    try:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name LIKE 'noetl-pgworker%%'"
        )
        time.sleep(1.0)
        t0 = time.monotonic()
        summary = first.stop(60)
        took = time.monotonic() - t0
    finally:
        conn.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
    assert took < 2 + 15, took  # --shutdown-timeout plus the documented few seconds
    assert summary.unwritten == 1
    assert (spool / "spooler.jsonl").exists()
    assert status_of(conn, cid)[0] in ("CLAIMED", "RUNNING")
    second = start_worker(worker_id="spooler", python_mode="inline", spool_dir=str(spool))
    wait_until(lambda: status_of(conn, cid)[0] == "COMPLETED")
    second.stop()
    assert marker.read_text() == "x"  # ran once: the kept outcome was written, not rerun
    assert not (spool / "spooler.jsonl").exists()


def test_the_workers_own_timeouts_override_a_databases_shorter_ones(
    conn: psycopg.Connection[Any], start_worker: Callable[..., Any]
) -> None:
    """A role or database with a tiny statement_timeout made every claim and write fail, and
    the writer retry for ever; the worker sets its own on its sessions."""
    dbname = scalar(conn, "SELECT current_database()")
    ids = [insert_raw_command(conn, tool_kind="noop", context="{}")[1] for _ in range(20)]
    conn.execute(f"ALTER DATABASE \"{dbname}\" SET statement_timeout = '1ms'")
    conn.execute(f"ALTER DATABASE \"{dbname}\" SET lock_timeout = '1ms'")
    try:
        summary = start_worker(drain=True).join(60)
    finally:
        conn.execute(f'ALTER DATABASE "{dbname}" RESET statement_timeout')
        conn.execute(f'ALTER DATABASE "{dbname}" RESET lock_timeout')
    assert summary.completed == 20
    assert all(status_of(conn, c)[0] == "COMPLETED" for c in ids)


def test_a_table_lock_does_not_hold_a_stop_past_its_bound(
    conn: psycopg.Connection[Any], start_worker: Callable[..., Any], dsn: str
) -> None:
    import time

    running = start_worker(shutdown_timeout=1)
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE noetl.runtime, noetl.command IN ACCESS EXCLUSIVE MODE")
        t0 = time.monotonic()
        running.stop(60)
        took = time.monotonic() - t0
        locker.rollback()
    assert took < 1 + 20, took  # --shutdown-timeout plus the documented bound of the rest
