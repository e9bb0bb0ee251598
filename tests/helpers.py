"""Small helpers shared by the database tests."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import psycopg
import pytest
from psycopg import conninfo, sql

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


def require_module(name: str, extra: str) -> ModuleType:
    """The module ``name``; if it is not installed, :func:`unavailable` (failed in CI, where
    ``make test`` installs the ``dev`` extra that holds it)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(f"{name} is not installed (pip install 'noetl-pgworker[{extra}]')")


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A local HTTP server answering with ``handler`` for the block: its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=httpd.serve_forever, name=f"test-{handler.__name__}", daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@contextlib.contextmanager
def role_login(dsn: str, prefix: str) -> Iterator[str]:
    """A new login holding nothing but the role ``noetl_pgworker`` (which must exist), for the
    block: its DSN. Dropped with whatever it owns afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    login = sql.Identifier(name)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE noetl_pgworker").format(login))
    try:
        yield conninfo.make_conninfo(dsn, user=name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(login))
            admin.execute(sql.SQL("DROP ROLE {}").format(login))


class Figures:
    """What a tier's scenarios measured: printed as one JSON line each in pytest's terminal
    summary, and written to the file the environment variable ``env`` names, if set."""

    def __init__(self, title: str, env: str) -> None:
        self.title, self.env = title, env
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, **figures: Any) -> None:
        self.rows.append({"test": name, **figures})

    def summary(self, terminalreporter: Any) -> None:
        if not self.rows:
            return
        terminalreporter.section(self.title)
        for row in self.rows:
            terminalreporter.write_line(json.dumps(row, sort_keys=True))
        out = os.environ.get(self.env)
        if out:
            Path(out).write_text(json.dumps(self.rows, indent=2))


def table_check(conn: psycopg.Connection[Any], expected: int) -> dict[str, int]:
    """The end-of-test verdict: every command terminal exactly once, nothing lost or stuck."""
    total = conn.execute("SELECT count(*) FROM noetl.command").fetchone()
    assert total == (expected,), f"commands lost or added: {total}"
    stuck = conn.execute(
        "SELECT count(*) FROM noetl.command"
        " WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')"
    ).fetchone()
    assert stuck == (0,), f"{stuck} commands not terminal"
    finals = conn.execute(
        "SELECT c.command_id, count(e.event_id) FROM noetl.command c"
        " LEFT JOIN noetl.event e ON e.execution_id = c.execution_id"
        "  AND e.command_id = c.command_id"
        "  AND e.event_type IN ('command.completed', 'command.failed')"
        " GROUP BY c.command_id"
    ).fetchall()
    bad = [(cid, n) for cid, n in finals if n != 1]
    assert not bad, f"commands without exactly one terminal event: {bad[:10]} ({len(bad)})"
    started = conn.execute(
        "SELECT count(*) FILTER (WHERE n > 1), coalesce(sum(n - 1) FILTER (WHERE n > 1), 0)"
        " FROM (SELECT command_id, count(*) AS n FROM noetl.event"
        "       WHERE event_type = 'command.started' GROUP BY command_id) s"
    ).fetchone()
    reclaimed = conn.execute(
        "SELECT count(*) FROM noetl.event"
        " WHERE event_type = 'command.claimed' AND meta ? 'reclaimed'"
    ).fetchone()
    assert started is not None and reclaimed is not None
    return {
        "commands": expected,
        "recovered": int(reclaimed[0]),
        "duplicates_executed": int(started[1]),
        "duplicates_completed": sum(max(0, n - 1) for _, n in finals),
    }
