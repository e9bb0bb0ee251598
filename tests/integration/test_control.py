"""Job control beside running workers: show, retry, cancel, pause and resume."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from noetl_pgworker import control
from noetl_pgworker.enqueue import enqueue

from ..conftest import RunningWorker
from ..helpers import count_status, scalar, wait_until

pytestmark = pytest.mark.integration

FAILING = {
    "code": "def main(x):\n    if x < 1:\n        raise ValueError('too small')\n    return x"
}


def status_of(conn: psycopg.Connection[Any], command_id: int) -> str:
    return str(
        scalar(conn, "SELECT status FROM noetl.command WHERE command_id = %s", (command_id,))
    )


def events_of(conn: psycopg.Connection[Any], command_id: int) -> list[str]:
    rows = conn.execute(
        "SELECT event_type FROM noetl.event WHERE command_id = %s ORDER BY event_id", (command_id,)
    ).fetchall()
    return [r[0] for r in rows]


def test_show_a_command_and_an_execution(start_worker: Any, conn: psycopg.Connection[Any]) -> None:
    done = enqueue(conn, tool_kind="noop", count=2)
    running: RunningWorker = start_worker()
    wait_until(lambda: count_status(conn, "COMPLETED") == 2)
    running.stop()
    cid = done.command_ids[0]
    found = control.show(conn, cid)
    assert found is not None
    assert found["command"]["status"] == "COMPLETED" and found["command"]["attempt"] == 1
    types = [e["event_type"] for e in found["events"]]
    assert (
        types[:2] == ["command.issued", "command.claimed"] and types[-1] == "command.completed"
    ), types
    text = control.format_show(found)
    assert f"command {cid}" in text and "command.completed" in text
    execution = control.show(conn, done.execution_ids[0])
    assert execution is not None and len(execution["commands"]) == 2
    assert control.show(conn, 42) is None


def test_retry_a_failed_command_wakes_a_worker_and_keeps_the_trail(
    start_worker: Any, conn: psycopg.Connection[Any]
) -> None:
    failed = enqueue(conn, tool_kind="python", tool_config=FAILING, args={"x": 0})
    cid = failed.command_ids[0]
    # a long poll: only the NOTIFY can wake the worker in time
    running: RunningWorker = start_worker(poll_interval=60, python_mode="inline")
    wait_until(lambda: status_of(conn, cid) == "FAILED")
    assert control.retry(conn, 1).ok is False  # no such command
    # the code is fixed by the input being changed: a retry runs the same row again
    conn.execute(
        "UPDATE noetl.command SET context = jsonb_set(context, '{input,x}', '1')"
        " WHERE command_id = %s",
        (cid,),
    )
    t0 = time.monotonic()
    result = control.retry(conn, cid)
    assert result.ok and "attempt 2" in result.message, result
    wait_until(lambda: status_of(conn, cid) == "COMPLETED", timeout=20)
    assert time.monotonic() - t0 < 20  # far below the 60 s poll
    running.stop()
    types = events_of(conn, cid)
    assert types.count("command.failed") == 1, types
    assert types.count("command.completed") == 1, types
    assert types.count("command.started") == 2, types  # each run tells its own start
    found = control.show(conn, cid)
    assert found is not None
    runs = {e["event_type"]: e["attempt"] for e in found["events"]}
    assert runs["command.completed"] == "2" and "attempt 2" in control.format_show(found)
    again = control.retry(conn, cid)
    assert not again.ok and "COMPLETED" in again.message


def test_retry_is_refused_once_the_execution_ended(conn: psycopg.Connection[Any]) -> None:
    e = enqueue(conn, tool_kind="noop")
    cid, eid = e.command_ids[0], e.execution_ids[0]
    conn.execute("UPDATE noetl.command SET status = 'FAILED' WHERE command_id = %s", (cid,))
    conn.execute(
        "INSERT INTO noetl.event (execution_id, catalog_id, event_id, event_type, status)"
        " VALUES (%s, %s, noetl.snowflake_id(), 'playbook.failed', 'FAILED')",
        (eid, e.catalog_id),
    )
    result = control.retry(conn, cid)
    assert not result.ok and "playbook.failed" in result.message
    assert status_of(conn, cid) == "FAILED"


def test_cancel_a_pending_command(conn: psycopg.Connection[Any]) -> None:
    e = enqueue(conn, tool_kind="noop")
    cid = e.command_ids[0]
    result = control.cancel(conn, cid, by="tester")
    assert result.ok and "was PENDING" in result.message
    assert status_of(conn, cid) == "CANCELLED"
    assert events_of(conn, cid)[-1] == "command.cancelled"
    again = control.cancel(conn, cid)
    assert not again.ok and "already CANCELLED" in again.message
    assert not control.cancel(conn, 7).ok


def test_pause_and_resume_a_kind_for_every_worker(
    start_worker: Any, conn: psycopg.Connection[Any]
) -> None:
    assert control.pause(conn, "noop", by="tester").ok
    assert "already" in control.pause(conn, "noop").message
    assert [p["tool_kind"] for p in control.paused_kinds(conn)] == ["noop"]
    first: RunningWorker = start_worker(poll_interval=60, worker_id="a")
    second: RunningWorker = start_worker(poll_interval=60, worker_id="b")
    enqueue(conn, tool_kind="noop", count=5)
    enqueue(conn, tool_kind="python", tool_config={"code": "result = 1"}, count=2)
    wait_until(lambda: count_status(conn, "COMPLETED") == 2, timeout=30)
    time.sleep(1.0)  # the workers were woken by the insert and claimed what they may
    assert count_status(conn, "PENDING") == 5
    t0 = time.monotonic()
    assert control.resume(conn, "noop").ok
    wait_until(lambda: count_status(conn, "COMPLETED") == 7, timeout=20)
    assert time.monotonic() - t0 < 20  # woken, not polled (60 s)
    assert "not paused" in control.resume(conn, "noop").message
    first.stop()
    second.stop()


SLEEPY = {"code": "import time\ndef main():\n    time.sleep(60)\n    return 1\n"}


@pytest.mark.parametrize(
    ("kind", "config"),
    [("python", SLEEPY), ("shell", {"command": "sleep 60"})],
    ids=["python", "shell"],
)
def test_cancel_a_running_command_stops_its_process(
    start_worker: Any, conn: psycopg.Connection[Any], kind: str, config: dict[str, Any]
) -> None:
    e = enqueue(conn, tool_kind=kind, tool_config=config)
    cid = e.command_ids[0]
    # a long poll: the worker learns of the cancel by the NOTIFY
    running: RunningWorker = start_worker(poll_interval=60, python_mode="process")
    wait_until(lambda: status_of(conn, cid) == "RUNNING", timeout=30)
    result = control.cancel(conn, cid, wait=20, by="tester")
    assert result.ok, result
    assert result.data["was"] == "RUNNING" and result.data["status"] == "CANCELLED"
    assert result.data["seconds"] < 20  # the 60 s process was stopped, not waited for
    summary = running.stop()
    assert summary.cancelled == 1 and summary.failed == 0
    types = events_of(conn, cid)
    assert types[-1] == "command.cancelled" and "command.failed" not in types, types
    error = scalar(conn, "SELECT error FROM noetl.command WHERE command_id = %s", (cid,))
    assert error == "cancelled by tester"


def test_cancel_an_execution(start_worker: Any, conn: psycopg.Connection[Any]) -> None:
    e = enqueue(conn, tool_kind="python", tool_config=SLEEPY, count=3)
    eid = e.execution_ids[0]
    running: RunningWorker = start_worker(concurrency=1, poll_interval=60, python_mode="process")
    wait_until(lambda: count_status(conn, "RUNNING") == 1, timeout=30)
    result = control.cancel_execution(conn, eid, wait=20, by="tester")
    assert result.ok, result
    assert "3 of 3 command(s) cancelled" in result.message
    running.stop()
    assert count_status(conn, "CANCELLED") == 3


def test_a_cancel_request_without_its_notify_is_found_by_the_poll(
    start_worker: Any, conn: psycopg.Connection[Any]
) -> None:
    e = enqueue(conn, tool_kind="python", tool_config=SLEEPY)
    cid, eid = e.command_ids[0], e.execution_ids[0]
    running: RunningWorker = start_worker(poll_interval=1, python_mode="process")
    wait_until(lambda: status_of(conn, cid) == "RUNNING", timeout=30)
    # the request alone, as if the notification were lost
    conn.execute(
        "INSERT INTO noetl.pgworker_cancel (command_id, execution_id, requested_by)"
        " VALUES (%s, %s, 'tester')",
        (cid, eid),
    )
    wait_until(lambda: status_of(conn, cid) == "CANCELLED", timeout=30)
    running.stop()
