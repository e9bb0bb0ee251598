"""``duckdb``: run SQL on DuckDB (optional: ``pip install 'noetl-pgworker[duckdb]'``).

Input: the SQL as for ``postgres`` (string, several statements allowed, or a list; a Jinja
template rendered against the command's context with the step's arguments, rendered, over it),
``params`` (a list or an object, used with a single statement), ``db_path`` (default: an
in-memory database). Output as for ``postgres``, plus NoETL's duckdb keys (``executed_commands``,
``command_<n>_rows``, ``command_<n>_sample`` — first five rows as lists — ``task_id``,
``execution_id``, ``database_path``, ``secrets_created``). Interrupted at the command's timeout.
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import ToolError, ToolTimeout
from ..models import Command
from ..render import render_sql
from .base import ToolContext
from .postgres import command_result, rows_result, shape, statements_of
from .values import to_json

INSTALL_HINT = "duckdb is not installed on this worker: pip install 'noetl-pgworker[duckdb]'"


class DuckdbTool:
    kind = "duckdb"

    def run(self, command: Command, ctx: ToolContext) -> dict[str, Any]:
        try:
            import duckdb
        except ImportError:
            raise ToolError(f"duckdb: {INSTALL_HINT}") from None
        cfg = {**command.args, **command.tool_config}
        texts = statements_of(cfg, "duckdb", lambda sql: render_sql(command, sql, quote=False))
        params = cfg.get("params")
        if params is not None and not isinstance(params, dict | list):
            raise ToolError("duckdb: tool_config.params must be an object or a list")
        db_path = cfg.get("db_path") or ":memory:"
        if not isinstance(db_path, str):
            raise ToolError("duckdb: tool_config.db_path must be a string")
        try:
            con = duckdb.connect(db_path)
        except duckdb.Error as exc:
            raise ToolError(f"duckdb: cannot open {db_path}: {exc}") from None
        timer = threading.Timer(ctx.remaining(), con.interrupt)
        timer.daemon = True
        timer.start()
        results: list[dict[str, Any]] = []
        noetl: dict[str, Any] = {}  # NoETL's own keys: command_<n>_rows, command_<n>_sample
        try:
            for text in texts:
                _execute(duckdb, con, text, params, results, noetl)
        except duckdb.InterruptException:
            raise ToolTimeout(f"duckdb: interrupted after {ctx.timeout:g} s") from None
        except duckdb.Error as exc:
            raise ToolError(f"duckdb: {type(exc).__name__}: {exc}") from None
        finally:
            timer.cancel()
            con.close()
        # NoETL's duckdb result (a later step may read `{{ step.executed_commands }}`) beside
        # the shape shared with postgres.
        return {
            **shape(results),
            "executed_commands": len(results),
            "task_id": command.command_id,
            "execution_id": str(command.execution_id),
            "database_path": db_path,
            "secrets_created": 0,
            **noetl,
        }


def _execute(
    duckdb: Any,
    con: Any,
    text: str,
    params: dict[str, Any] | list[Any] | None,
    results: list[dict[str, Any]],
    noetl: dict[str, Any],
) -> None:
    """Run one text's statements (``params`` only for a single statement); add their results
    to ``results`` and NoETL's ``command_<n>_rows|sample`` keys to ``noetl``."""
    statements = duckdb.extract_statements(text)
    for stmt in statements:
        rel = con.execute(stmt, params) if params and len(statements) == 1 else con.execute(stmt)
        if not rel.description:
            results.append(command_result(-1))
            continue
        columns = [d[0] for d in rel.description]
        rows = rel.fetchall()
        results.append(rows_result(columns, rows))
        if rows:
            n = len(results)
            noetl[f"command_{n}_rows"] = len(rows)
            noetl[f"command_{n}_sample"] = to_json([list(r) for r in rows[:5]])
