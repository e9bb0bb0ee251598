"""The claim session's locks: NoETL's HTTP claim is kept off a command until its outcome is
written, and one worker id runs in one process only."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from noetl_pgworker.errors import PgWorkerError
from noetl_pgworker.session import WorkerIdInUse

from ..helpers import insert_raw_command, scalar, wait_until

pytestmark = pytest.mark.integration


def server_claim_would_lock(dsn: str, command_id: int) -> bool:
    """What NoETL's server does in its HTTP claim: try the transaction-level advisory lock."""
    with psycopg.connect(dsn) as other:
        return bool(scalar(other, "SELECT pg_try_advisory_xact_lock(%s)", (command_id,)))


def test_a_claimed_command_stays_locked_until_its_outcome_is_written(
    dsn: str, conn: psycopg.Connection[Any], start_worker: Callable[..., Any]
) -> None:
    code = "import time\ndef main():\n    time.sleep(1.5)\n    return 1\n"
    _, command_id = insert_raw_command(
        conn, tool_kind="python", context=json.dumps({"tool_config": {"code": code}})
    )
    running = start_worker(poll_interval=0.2)
    wait_until(
        lambda: (
            scalar(conn, "SELECT status FROM noetl.command WHERE command_id = %s", (command_id,))
            in ("CLAIMED", "RUNNING")
        )
    )
    # The claim transaction committed long ago: only a session-level lock can refuse this.
    assert not server_claim_would_lock(dsn, command_id)
    wait_until(
        lambda: (
            scalar(conn, "SELECT status FROM noetl.command WHERE command_id = %s", (command_id,))
            == "COMPLETED"
        )
    )
    # Given back within a poll interval of the write.
    wait_until(lambda: server_claim_would_lock(dsn, command_id), timeout=5)
    running.stop()


def test_locks_of_a_failed_claim_are_given_back(dsn: str, conn: psycopg.Connection[Any]) -> None:
    from noetl_pgworker.session import ClaimSession

    _, command_id = insert_raw_command(conn, tool_kind="noop", context="{}")
    session = ClaimSession(dsn)
    try:
        with pytest.raises(psycopg.errors.DivisionByZero), session.transaction() as c:
            c.execute("SELECT pg_try_advisory_lock(%s)", (command_id,))
            c.execute("SELECT 1 / 0")
        assert session.held_locks() == set()
        assert server_claim_would_lock(dsn, command_id)
    finally:
        session.close()


def test_a_second_process_with_the_same_worker_id_refuses_to_start(
    start_worker: Callable[..., Any],
) -> None:
    first = start_worker(worker_id="twin")
    second = start_worker(worker_id="twin", drain=True)
    with pytest.raises(WorkerIdInUse, match="already running as worker id 'twin'") as info:
        second.join(30)
    assert isinstance(info.value, PgWorkerError)
    assert first.thread.is_alive()
    first.stop()
