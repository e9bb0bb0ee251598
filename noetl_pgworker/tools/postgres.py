"""``postgres``: run SQL on a PostgreSQL database.

Input: ``query`` | ``command`` | ``sql`` (a string — several statements allowed when there are
no ``params`` — or a list of strings), ``params`` (an object for ``%(name)s`` placeholders, or
a list for ``%s``), and the connection: ``connection_string`` | ``dsn``, or ``auth`` (a
credential alias whose ``dsn`` is used). All statements run in one transaction, with
``statement_timeout`` set to the command's remaining time.

Output, per statement, ``{columns, rows, row_count}`` (rows as objects) or
``{affected_rows}``; one statement gives its object, several give ``{"results": [...]}``.
Values are converted on purpose (see :mod:`noetl_pgworker.tools.values`).
"""

from __future__ import annotations

from typing import Any

import psycopg

from ..credentials import auth_alias
from ..db import first_line, redact_dsn, redact_text
from ..errors import ToolError, ToolTimeout
from ..models import Command
from . import ToolContext
from .pgconnect import tool_conninfo
from .values import statement_result


def statements_of(cfg: dict[str, Any], tool: str) -> list[str]:
    sql = cfg.get("query", cfg.get("command", cfg.get("sql")))
    if isinstance(sql, str) and sql.strip():
        return [sql]
    if isinstance(sql, list) and sql and all(isinstance(s, str) and s.strip() for s in sql):
        return list(sql)
    raise ToolError(f"{tool}: tool_config.query (a string or a list of strings) is required")


def shape(results: list[dict[str, Any]]) -> dict[str, Any]:
    return results[0] if len(results) == 1 else {"results": results}


class PostgresTool:
    kind = "postgres"

    def run(self, command: Command, ctx: ToolContext) -> dict[str, Any]:
        cfg = {**command.args, **command.tool_config}
        statements = statements_of(cfg, "postgres")
        params = cfg.get("params")
        if params is not None and not isinstance(params, dict | list):
            raise ToolError("postgres: tool_config.params must be an object or a list")
        dsn = cfg.get("connection_string") or cfg.get("dsn")
        alias = auth_alias(cfg)
        if alias:
            dsn = ctx.credentials.get(alias).dsn
            if not dsn:
                raise ToolError(f"postgres: credential {alias!r} has no dsn")
        if not isinstance(dsn, str) or not dsn:
            raise ToolError("postgres: give connection_string (or dsn) or an auth alias")
        remaining = ctx.remaining()
        conninfo = tool_conninfo(dsn, trusted=bool(alias))
        try:
            conn = psycopg.connect(
                conninfo,
                connect_timeout=max(1, min(10, int(remaining))),
                application_name="noetl-pgworker-tool",
            )
        except psycopg.Error as exc:
            raise ToolError(
                f"postgres: cannot connect to {alias or redact_dsn(dsn)}:"
                f" {redact_text(first_line(exc), dsn)}"
            ) from None
        results: list[dict[str, Any]] = []
        try:
            with conn, conn.cursor() as cur:
                timeout_ms = max(1, int(ctx.remaining() * 1000))
                cur.execute(
                    "SELECT set_config('statement_timeout', %s, true)", (f"{timeout_ms}ms",)
                )
                for sql in statements:
                    cur.execute(sql.encode(), params or None)
                    while True:
                        if cur.description is not None:
                            columns = [d.name for d in cur.description]
                            results.append(statement_result(columns, cur.fetchall()))
                        else:
                            results.append({"affected_rows": cur.rowcount})
                        if not cur.nextset():
                            break
        except psycopg.errors.QueryCanceled:
            raise ToolTimeout(f"postgres: statement timed out after {ctx.timeout:g} s") from None
        except psycopg.Error as exc:
            code = f" [{exc.sqlstate}]" if exc.sqlstate else ""
            raise ToolError(f"postgres{code}: {redact_text(first_line(exc), dsn)}") from None
        finally:
            conn.close()
        return shape(results)
