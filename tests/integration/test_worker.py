"""The whole worker (Worker.run on a thread) against a real database."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from noetl_pgworker.enqueue import enqueue, ensure_catalog

from ..conftest import SAMPLES, RunningWorker
from ..helpers import all_terminal, count_status, insert_raw_command, scalar, wait_until

pytestmark = pytest.mark.integration

Start = Callable[..., RunningWorker]


def test_drains_a_mixed_queue_with_the_full_event_trail(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, tool_kind="noop", count=300, executions=5)
    enqueue(
        conn,
        tool_kind="python",
        step="double",
        tool_config={"code": "def main(x):\n    return {'y': x * 2}\n"},
        args={"x": 21},
        count=20,
    )
    enqueue(conn, tool_kind="python", step="bad", tool_config={"code": "result = 1/0"}, count=5)
    summary = start_worker(drain=True, concurrency=4).join(60)
    assert summary.claimed == 325 and summary.completed == 320 and summary.failed == 5
    assert count_status(conn, "COMPLETED") == 320 and count_status(conn, "FAILED") == 5
    rows = conn.execute(
        "SELECT result, started_at <= completed_at, claimed_at <= started_at, latest_event_id"
        " FROM noetl.command WHERE step_name = 'double'"
    ).fetchall()
    for result, ordered1, ordered2, latest in rows:
        assert result["status"] == "COMPLETED" and result["context"]["y"] == 42
        assert ordered1 and ordered2
        last = conn.execute(
            "SELECT event_type FROM noetl.event WHERE event_id = %s", (latest,)
        ).fetchone()
        assert last == ("command.completed",)
    failed = conn.execute(
        "SELECT DISTINCT error FROM noetl.command WHERE status = 'FAILED'"
    ).fetchall()
    assert failed == [("ZeroDivisionError: division by zero",)]
    trail = conn.execute(
        "SELECT c.command_id, array_agg(e.event_type ORDER BY e.event_id)"
        " FROM noetl.command c JOIN noetl.event e USING (execution_id, command_id)"
        " GROUP BY c.command_id"
    ).fetchall()
    assert len(trail) == 325
    for _cid, types in trail:
        assert types[:3] == ["command.issued", "command.claimed", "command.started"]
        assert types[3:] in (
            ["call.done", "step.exit", "command.completed"],
            ["call.error", "step.exit", "command.failed"],
        )


def test_four_workers_race_over_2000_commands_and_each_is_claimed_once(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, tool_kind="noop", count=2000, executions=40)
    workers = [start_worker(drain=True, concurrency=4, worker_id=f"racer-{i}") for i in range(4)]
    summaries = [w.join(120) for w in workers]
    assert sum(s.claimed for s in summaries) == 2000
    assert count_status(conn, "COMPLETED") == 2000
    per_command = conn.execute(
        "SELECT command_id, count(*) FILTER (WHERE event_type = 'command.claimed'),"
        "       count(*) FILTER (WHERE event_type = 'command.completed')"
        " FROM noetl.event GROUP BY command_id"
    ).fetchall()
    assert len(per_command) == 2000
    assert all(claimed == 1 and completed == 1 for _, claimed, completed in per_command)
    # The claim event's worker is the worker that completed the row.
    mismatched = scalar(
        conn,
        "SELECT count(*) FROM noetl.command c JOIN noetl.event e USING (execution_id, command_id)"
        " WHERE e.event_type = 'command.claimed' AND e.worker_id <> c.worker_id",
    )
    assert mismatched == 0
    assert scalar(conn, "SELECT count(DISTINCT worker_id) FROM noetl.command") >= 2


def test_notify_starts_a_new_command_long_before_the_poll_interval(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    running = start_worker(poll_interval=60)
    assert running.worker.listener is not None and running.worker.listener.wait_connected(10)
    # Let the first (startup) claim pass so that the worker is waiting on its 60 s timer.
    time.sleep(0.3)
    enqueue(conn, tool_kind="noop", count=1)
    t0 = time.monotonic()
    wait_until(lambda: count_status(conn, "COMPLETED") == 1, timeout=10)
    assert time.monotonic() - t0 < 5  # the poll timer alone would take 60 s
    delay = scalar(conn, "SELECT EXTRACT(epoch FROM started_at - created_at) FROM noetl.command")
    assert delay < 5


def test_with_notifications_lost_the_poll_still_drains(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    conn.execute("ALTER TABLE noetl.command DISABLE TRIGGER pgworker_command_notify")
    start_worker(poll_interval=0.2)
    enqueue(conn, tool_kind="noop", count=3)
    wait_until(lambda: count_status(conn, "COMPLETED") == 3, timeout=10)


def sample_held(dsn: str, stop: threading.Event, held: list[int]) -> threading.Thread:
    def sample() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            while not stop.is_set():
                n = scalar(
                    c,
                    "SELECT count(*) FROM noetl.command WHERE status IN ('CLAIMED', 'RUNNING')",
                )
                held.append(int(n))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return thread


def test_never_runs_more_commands_than_threads(
    start_worker: Start, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    code = (
        "import time\n"
        "def main(log):\n"
        "    t = time.time()\n"
        "    time.sleep(0.1)\n"
        "    with open(log, 'a') as fh:\n"
        "        fh.write(f'{t} {time.time()}\\n')\n"
    )
    enqueue(conn, tool_kind="python", tool_config={"code": code}, args={"log": str(log)}, count=30)
    running = start_worker(concurrency=3, poll_interval=0.1, python_mode="inline")
    wait_until(lambda: count_status(conn, "COMPLETED") == 30, timeout=30)
    running.stop()
    spans = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    assert len(spans) == 30
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    assert peak == 3  # all threads used, never more


def test_without_pending_writes_it_holds_no_more_claims_than_threads(
    start_worker: Start, conn: psycopg.Connection[Any], dsn: str
) -> None:
    code = "import time\ndef main():\n    time.sleep(0.05)\n    return 1\n"
    enqueue(conn, tool_kind="python", tool_config={"code": code}, count=40)
    held: list[int] = []
    stop = threading.Event()
    sampler = sample_held(dsn, stop, held)
    running = start_worker(
        concurrency=3, poll_interval=0.1, python_mode="inline", max_pending_writes=0
    )
    wait_until(lambda: count_status(conn, "COMPLETED") == 40, timeout=30)
    stop.set()
    sampler.join(5)
    running.stop()
    assert len(held) > 20
    assert max(held) <= 3, max(held)


def test_commands_claimed_ahead_go_back_when_no_thread_frees_up(
    start_worker: Start, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from noetl_pgworker.inflight import InFlight

    # Claims ahead as a busy worker does (how many depends on the rate; here a fixed 10).
    monkeypatch.setattr(InFlight, "ahead", lambda self, seconds: 10)
    code = "import time\ndef main():\n    time.sleep(4)\n    return 1\n"
    enqueue(conn, tool_kind="python", tool_config={"code": code}, count=2)
    enqueue(conn, tool_kind="noop", count=10)
    first = start_worker(worker_id="long", concurrency=2, poll_interval=0.1, python_mode="inline")
    wait_until(lambda: count_status(conn, "RUNNING") == 2, timeout=10)
    t0 = time.monotonic()
    # The ten claimed with the two long commands wait for no thread: back to PENDING ...
    wait_until(lambda: count_status(conn, "PENDING") == 10, timeout=3)
    second = start_worker(worker_id="free", concurrency=2, poll_interval=0.1)
    # ... and another worker runs them while the long ones still run.
    wait_until(lambda: count_status(conn, "COMPLETED") == 10, timeout=10)
    assert time.monotonic() - t0 < 3.5
    assert count_status(conn, "RUNNING") == 2
    ran = scalar(
        conn,
        "SELECT array_agg(DISTINCT worker_id) FROM noetl.command WHERE tool_kind = 'noop'",
    )
    assert ran == ["free"]
    wait_until(lambda: count_status(conn, "COMPLETED") == 12, timeout=10)
    assert first.stop().released == 0
    second.stop()


def test_malformed_rows_and_failing_code_fail_readably_and_the_worker_goes_on(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    bad = {
        insert_raw_command(conn, tool_kind="python", context="[1, 2]")[
            1
        ]: "malformed command: context is a JSON array, not an object",
        insert_raw_command(conn, tool_kind=None, context="{}")[
            1
        ]: "malformed command: tool_kind is empty",
        insert_raw_command(conn, tool_kind="noop", context='{"tool_config": 5}')[
            1
        ]: "malformed command: context.tool_config is a JSON number, not an object",
        insert_raw_command(conn, tool_kind="python", context='{"tool_config": {}}')[
            1
        ]: "python: tool_config.code (or code_b64) is required",
        insert_raw_command(
            conn, tool_kind="python", context='{"tool_config": {"code": "result = object()"}}'
        )[1]: "result is not JSON-serialisable",
        insert_raw_command(
            conn, tool_kind="python", context='{"tool_config": {"code": "import sys; sys.exit(2)"}}'
        )[1]: "SystemExit: 2",
        insert_raw_command(
            conn,
            tool_kind="python",
            context='{"tool_config": {"code": "result = \\"a\\\\u0000b\\""}}',
        )[1]: None,  # a NUL in the output is stored (replaced), not a crash
    }
    running = start_worker(concurrency=2)
    enqueue(conn, tool_kind="noop", count=5)
    wait_until(lambda: all_terminal(conn), timeout=20)
    for command_id, message in bad.items():
        status, error = conn.execute(
            "SELECT status, error FROM noetl.command WHERE command_id = %s", (command_id,)
        ).fetchone()  # type: ignore[misc]
        if message is None:
            assert status == "COMPLETED", error
        else:
            assert status == "FAILED" and message in error, (status, error)
            finals = scalar(
                conn,
                "SELECT count(*) FROM noetl.event WHERE command_id = %s"
                " AND event_type = 'command.failed'",
                (command_id,),
            )
            assert finals == 1
    assert count_status(conn, "COMPLETED") == 6
    assert running.thread.is_alive()


def test_every_event_row_passes_the_result_check(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    for code in (
        "result = [1, 2]",
        "result = None",
        "result = 'x' * 300000",
        "result = {'nested': {'a': [1, {'b': 2}]}}",
        "raise KeyError('k')",
    ):
        enqueue(conn, tool_kind="python", tool_config={"code": code}, count=1)
    start_worker(drain=True).join(30)
    assert all_terminal(conn)
    # The CHECK constraint would have refused a bad row; count with the same predicate anyway.
    bad = scalar(
        conn,
        "SELECT count(*) FROM noetl.event WHERE result IS NOT NULL AND NOT ("
        " jsonb_typeof(result) = 'object' AND jsonb_typeof(result -> 'status') = 'string'"
        " AND (result - 'status' - 'reference' - 'context') = '{}'::jsonb"
        " AND jsonb_typeof(COALESCE(result -> 'context', '{}')) = 'object')",
    )
    assert bad == 0
    biggest = scalar(conn, "SELECT max(pg_column_size(result)) FROM noetl.event")
    assert biggest < 100 * 1024


def test_runtime_row_is_ready_while_running_and_offline_after(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    running = start_worker(worker_id="beating", heartbeat_interval=0.2)
    row = conn.execute(
        "SELECT status, kind, capacity, capabilities FROM noetl.runtime WHERE name = 'beating'"
    ).fetchone()
    kinds = ["duckdb", "http", "noop", "postgres", "python", "shell", "task_sequence", "workbook"]
    assert row == ("ready", "worker_pool", 8, {"tool_kinds": kinds})
    first = scalar(conn, "SELECT heartbeat FROM noetl.runtime WHERE name = 'beating'")
    wait_until(
        lambda: scalar(conn, "SELECT heartbeat FROM noetl.runtime WHERE name = 'beating'") > first
    )
    running.stop()
    assert scalar(conn, "SELECT status FROM noetl.runtime WHERE name = 'beating'") == "offline"


def test_graceful_stop_finishes_running_commands_and_releases_nothing_claimed(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    code = "import time\ndef main():\n    time.sleep(0.5)\n    return 'slept'\n"
    enqueue(conn, tool_kind="python", tool_config={"code": code}, count=10)
    running = start_worker(concurrency=2)
    wait_until(lambda: count_status(conn, "RUNNING") == 2, timeout=10)
    summary = running.stop()
    assert summary.unwritten == 0
    statuses = dict(
        conn.execute("SELECT status, count(*) FROM noetl.command GROUP BY status").fetchall()
    )
    assert statuses.get("CLAIMED", 0) == 0 and statuses.get("RUNNING", 0) == 0
    assert statuses["COMPLETED"] >= 2
    assert statuses["COMPLETED"] + statuses.get("PENDING", 0) == 10


def test_real_noetl_rows_run_to_noetls_own_results(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    rows = json.loads((SAMPLES / "noetl-4.26-commands-happy.json").read_text())
    catalog_id = ensure_catalog(conn)
    for row in rows:
        conn.execute(
            "INSERT INTO noetl.command (command_id, event_id, execution_id, catalog_id, step_name,"
            " tool_kind, status, context, meta, attempt) VALUES"
            " (%s, %s, %s, %s, %s, %s, 'PENDING', %s::jsonb, %s::jsonb, %s)",
            (
                row["command_id"],
                row["event_id"],
                row["execution_id"],
                catalog_id,
                row["step_name"],
                row["tool_kind"],
                json.dumps(row["context"]),
                json.dumps(row["meta"]),
                row["attempt"],
            ),
        )
    start_worker(drain=True, worker_id="probe-1").join(30)
    for row in rows:
        got = scalar(
            conn, "SELECT result FROM noetl.command WHERE command_id = %s", (row["command_id"],)
        )
        assert got == row["result"], row["step_name"]


def test_a_killed_listener_connection_is_replaced(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    running = start_worker(poll_interval=60, worker_id="deaf")
    listener = running.worker.listener
    assert listener is not None and listener.wait_connected(10)
    killed = scalar(
        conn,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name LIKE 'noetl-pgworker-listener@%:deaf'",
    )
    assert killed == 1
    wait_until(lambda: listener.reconnects >= 1 and listener.connected, timeout=15)
    time.sleep(0.3)  # let the catch-up claim after reconnecting pass
    enqueue(conn, tool_kind="noop", count=1)
    wait_until(lambda: count_status(conn, "COMPLETED") == 1, timeout=10)  # NOTIFY, not the timer


def test_a_command_over_its_time_fails_and_frees_its_slot(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    enqueue(
        conn,
        tool_kind="python",
        step="endless",
        tool_config={"code": "while True:\n    pass\n", "timeout_seconds": 0.5},
        count=1,
    )
    enqueue(conn, tool_kind="shell", step="sleeper", tool_config={"command": "sleep 30"}, count=1)
    enqueue(conn, tool_kind="noop", count=3)
    start_worker(concurrency=1, command_timeout=1.0)
    wait_until(lambda: all_terminal(conn), timeout=30)
    rows = dict(
        conn.execute(
            "SELECT step_name, result -> 'context' ->> 'error_type' FROM noetl.command"
            " WHERE status = 'FAILED'"
        ).fetchall()
    )
    assert rows == {"endless": "timeout", "sleeper": "timeout"}
    assert count_status(conn, "COMPLETED") == 3


def test_results_over_the_limit_are_summarised_and_say_so(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, tool_kind="python", tool_config={"code": "result = 'y' * 50000"}, count=1)
    start_worker(drain=True, max_result_bytes=4096).join(30)
    result = scalar(conn, "SELECT result FROM noetl.command")
    assert result["status"] == "COMPLETED"
    ctx = result["context"]
    assert ctx["truncated"] is True and ctx["original_bytes"] == 50002
    assert ctx["limit_bytes"] == 4096 and ctx["preview"].startswith('"yyy')
