"""--pool-mode transaction in process: what the worker opens, locks and reports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from noetl_pgworker.enqueue import enqueue

from ..conftest import RunningWorker
from ..helpers import count_status, scalar, wait_until

pytestmark = pytest.mark.integration

SLEEPY = {"code": "import time\ntime.sleep(1.0)\nresult = 1"}


def advisory_locks(conn: psycopg.Connection[Any]) -> int:
    return int(
        scalar(
            conn,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
    )


def test_transaction_pooling_without_session_dsn_polls_and_holds_no_session_lock(
    conn: psycopg.Connection[Any], start_worker: Callable[..., RunningWorker]
) -> None:
    running = start_worker(pool_mode="transaction", python_mode="inline", poll_interval=0.2)
    w = running.worker
    assert w.listener is None  # no LISTEN through a transaction pooler
    assert w.readiness() == (True, "ready")  # and ready without one
    enqueue(conn, tool_kind="python", tool_config=SLEEPY, count=2)
    wait_until(lambda: count_status(conn, "RUNNING") == 2, timeout=10)
    assert advisory_locks(conn) == 0  # neither the commands' nor the worker id's
    wait_until(lambda: count_status(conn, "COMPLETED") == 2, timeout=10)
    assert running.stop().clean


def test_transaction_pooling_with_session_dsn_listens_and_locks_there(
    dsn: str, conn: psycopg.Connection[Any], start_worker: Callable[..., RunningWorker]
) -> None:
    running = start_worker(
        pool_mode="transaction", session_dsn=dsn, python_mode="inline", poll_interval=30
    )
    assert running.worker.listener is not None
    assert running.worker.readiness() == (True, "ready")
    enqueue(conn, tool_kind="python", tool_config=SLEEPY, count=2)
    wait_until(lambda: count_status(conn, "RUNNING") == 2, timeout=5)  # NOTIFY, not the poll
    assert advisory_locks(conn) == 3  # two commands and the worker id
    wait_until(lambda: count_status(conn, "COMPLETED") == 2, timeout=10)
    assert running.stop().clean


def test_session_pooling_sets_the_worker_session_settings_with_set(dsn: str) -> None:
    """Through a session-pooling proxy no startup options are sent; the pool's connections and
    the claim session get the worker's settings (timeouts, one generic plan) with SET."""
    import contextlib

    from noetl_pgworker.config import Settings
    from noetl_pgworker.connections import open_pool
    from noetl_pgworker.db import WORKER_SESSION_SETTINGS
    from noetl_pgworker.session import open_session

    wanted = {"lock_timeout": "5s", "statement_timeout": "1min", "plan_cache_mode": ""}
    wanted["plan_cache_mode"] = WORKER_SESSION_SETTINGS["plan_cache_mode"]
    settings = Settings(dsn=dsn, worker_id="pooled-s", pool_mode="session")
    with contextlib.ExitStack() as closing:
        pool = open_pool(settings, closing)
        with pool.connection() as c:
            for name, value in wanted.items():
                assert scalar(c, f"SHOW {name}") == value, name
        session = open_session(settings, tuple, closing, listens=False)
        with session.transaction() as c:
            for name, value in wanted.items():
                assert scalar(c, f"SHOW {name}") == value, name
