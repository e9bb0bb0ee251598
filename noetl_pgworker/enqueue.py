"""Writing commands the way NoETL's server does (for tests, demos and benchmarks)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg

from .queries import query

DEFAULT_CATALOG_PATH = "noetl-pgworker/enqueue"


@dataclass(frozen=True, slots=True)
class Enqueued:
    catalog_id: int
    execution_ids: tuple[int, ...]
    command_ids: tuple[int, ...]
    #: each command's execution id, in the order of ``command_ids``
    command_executions: tuple[int, ...] = ()


def ensure_catalog(conn: psycopg.Connection[Any], path: str = DEFAULT_CATALOG_PATH) -> int:
    """The id of the playbook entry at ``path``, created when missing."""
    with conn.cursor() as cur:
        cur.execute(query("find_catalog"), {"path": path})
        row = cur.fetchone()
        if row:
            return int(row[0])
        cur.execute(query("ensure_resource"), {"kind": "playbook"})
        cur.execute(
            query("insert_catalog"),
            {"path": path, "kind": "playbook", "content": "# enqueued by noetl-pgworker\n"},
        )
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


def enqueue(  # noqa: PLR0913 — keyword-only, the columns of the commands it writes
    conn: psycopg.Connection[Any],
    *,
    tool_kind: str,
    step: str = "step",
    tool_config: dict[str, Any] | None = None,
    args: dict[str, Any] | None = None,
    count: int = 1,
    executions: int = 1,
    execution_id: int | None = None,
    catalog_path: str = DEFAULT_CATALOG_PATH,
    max_attempts: int = 3,
) -> Enqueued:
    """Insert ``count`` PENDING commands (and their ``command.issued`` events) in one transaction.

    The commands are spread round-robin over ``executions`` new executions, or all go into
    ``execution_id`` when it is given.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    if execution_id is not None:
        executions = 1
    if executions < 1:
        raise ValueError("executions must be at least 1")
    context = {"tool_config": tool_config or {}, "input": args or {}, "render_context": {}}
    with conn.transaction(), conn.cursor() as cur:
        catalog_id = ensure_catalog(conn, catalog_path)
        cur.execute(
            query("enqueue_commands"),
            {
                "catalog_id": catalog_id,
                "tool_kind": tool_kind,
                "step": step,
                "context": json.dumps(context),
                "count": count,
                "executions": executions,
                "execution_id": execution_id,
                "max_attempts": max_attempts,
            },
        )
        rows = cur.fetchall()
    return Enqueued(
        catalog_id=catalog_id,
        execution_ids=tuple(dict.fromkeys(int(r[0]) for r in rows)),
        command_ids=tuple(int(r[1]) for r in rows),
        command_executions=tuple(int(r[0]) for r in rows),
    )
