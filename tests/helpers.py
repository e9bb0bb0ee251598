"""Small helpers shared by the database tests."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NoReturn

import psycopg
import pytest

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


def wait_until(
    predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02
) -> None:
    """Poll ``predicate`` (a database condition) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def scalar(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
    return None if row is None else row[0]


def count_status(conn: psycopg.Connection[Any], *statuses: str) -> int:
    return int(
        scalar(conn, "SELECT count(*) FROM noetl.command WHERE status = ANY(%s)", (list(statuses),))
    )


def all_terminal(conn: psycopg.Connection[Any]) -> bool:
    return count_status(conn, "PENDING", "CLAIMED", "RUNNING") == 0


def insert_raw_command(
    conn: psycopg.Connection[Any],
    *,
    tool_kind: str | None,
    context: str | None,
    step: str = "raw",
    meta: str | None = None,
    execution_id: int | None = None,
) -> tuple[int, int]:
    """Insert one command row as given (JSON text for context/meta), for malformed-row tests."""
    from noetl_pgworker.enqueue import ensure_catalog

    catalog_id = ensure_catalog(conn)
    row = conn.execute(
        """
        INSERT INTO noetl.command (command_id, event_id, execution_id, catalog_id, step_name,
                                   tool_kind, status, context, meta)
        SELECT noetl.snowflake_id(), noetl.snowflake_id(),
               COALESCE(%(execution_id)s::bigint, noetl.snowflake_id()), %(catalog_id)s,
               %(step)s, %(tool_kind)s, 'PENDING', %(context)s::jsonb, %(meta)s::jsonb
        RETURNING execution_id, command_id
        """,
        {
            "execution_id": execution_id,
            "catalog_id": catalog_id,
            "step": step,
            "tool_kind": tool_kind,
            "context": context,
            "meta": meta,
        },
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def unavailable(reason: str) -> NoReturn:
    """A test that needs something this machine lacks: skipped, saying why, on a user's
    machine; failed in CI (``CI=true``), where everything it needs is installed."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
