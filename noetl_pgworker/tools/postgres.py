"""``postgres``: run SQL on a PostgreSQL database.

Input: the SQL under ``query`` | ``queries`` | ``command`` | ``commands`` | ``cmd`` | ``cmds``
| ``sql`` (a string — several statements allowed when there are no ``params`` — or a list of
strings), or base64-encoded under ``query_b64`` | ``command_b64`` | ``commands_b64``;
``params`` (an object for ``%(name)s`` placeholders, or a list for ``%s``); and the
connection: ``connection_string`` | ``dsn``, or ``auth`` (a credential alias whose ``dsn`` is
used). The SQL is a Jinja template, rendered as NoETL's worker renders it (the command's render
context, the step's arguments over it with ``'`` doubled). All statements run in one
transaction, with ``statement_timeout`` set to the command's remaining time. Rows are read a
chunk at a time, and reading stops (the command fails) past ``--max-result-bytes``.

Output, as NoETL's: the last statement's result — ``{status, rows (as objects), row_count,
columns}`` for a statement that returns rows, ``{status, row_count, message, affected_rows}``
for one that does not — plus ``statement_count``, and ``results`` (every statement's result)
when there are several. Values are converted on purpose (see
:mod:`noetl_pgworker.tools.values`).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from ..credentials import auth_alias
from ..db import first_line
from ..errors import ToolError, ToolTimeout
from ..models import Command
from ..redact import redact_dsn, redact_text
from ..render import render_sql
from .base import Confinement, ToolContext
from .pgconnect import tool_conninfo
from .pgstream import run_streamed
from .resultcap import DEFAULT_MAX_RESULT_BYTES, ResultCap
from .scriptsource import command_script, has_script
from .values import statement_result

#: Where the SQL may be, in NoETL's order (base64 first), and ``sql`` (this worker's).
SQL_KEYS = ("query", "queries", "command", "commands", "cmd", "cmds", "sql")
SQL_B64_KEYS = ("command_b64", "commands_b64", "query_b64")


def sql_of(cfg: dict[str, Any], tool: str) -> Any:
    """The SQL as given (a string or a list), base64 decoded; ToolError if there is none."""
    for key in SQL_B64_KEYS:
        if key in cfg:
            try:
                return base64.b64decode(str(cfg[key]).encode("ascii"), validate=True).decode()
            except (ValueError, UnicodeError) as exc:
                raise ToolError(
                    f"{tool}: tool_config.{key} is not base64 UTF-8 text: {exc}"
                ) from None
    for key in SQL_KEYS:
        if cfg.get(key) is not None:
            return cfg[key]
    raise ToolError(f"{tool}: tool_config.query (a string or a list of strings) is required")


def with_script(
    command: Command,
    cfg: dict[str, Any],
    tool: str,
    limits: tuple[float, Confinement | None],
) -> dict[str, Any]:
    """``cfg`` with the SQL of ``tool_config.script`` (a file or an http source) in place of
    any inline SQL: NoETL's worker gives the script priority."""
    if not has_script(cfg):
        return cfg
    text = command_script(command, tool, *limits)
    inline = (*SQL_KEYS, *SQL_B64_KEYS)
    return {**{k: v for k, v in cfg.items() if k not in inline}, "query": text}


def statements_of(
    cfg: dict[str, Any], tool: str, render: Callable[[Any], Any] | None = None
) -> list[str]:
    """The SQL texts to run, after ``render``; empty when it renders to nothing."""
    sql = sql_of(cfg, tool)
    if not (
        (isinstance(sql, str) and sql.strip())
        or (isinstance(sql, list) and sql and all(isinstance(s, str) and s.strip() for s in sql))
    ):
        raise ToolError(f"{tool}: tool_config.query (a string or a list of strings) is required")
    if render is not None:
        sql = render(sql)
    if isinstance(sql, str):
        return [sql] if sql.strip() else []
    if isinstance(sql, list) and all(isinstance(s, str) for s in sql):
        return [s for s in sql if s.strip()]
    raise ToolError(f"{tool}: the SQL rendered to a {type(sql).__name__}, not text")


def rows_result(columns: list[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """A statement that returned rows, as NoETL reports it."""
    return {"status": "success", **statement_result(columns, rows)}


def command_result(rowcount: int) -> dict[str, Any]:
    """A statement without rows, as NoETL reports it, plus ``affected_rows`` (ours)."""
    return {
        "status": "success",
        "row_count": rowcount,
        "message": f"Command executed. {rowcount} rows affected.",
        "affected_rows": rowcount,
    }


def shape(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The step's result: the last statement's, ``statement_count``, and ``results`` (every
    statement's) when there are several."""
    if not results:
        return {"status": "success", "message": "No SQL statements executed", "statement_count": 0}
    out = {**results[-1], "statement_count": len(results)}
    if len(results) > 1:
        out["results"] = results
    return out


class PostgresTool:
    kind = "postgres"

    def __init__(
        self,
        *,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        confinement: Confinement | None = None,
    ) -> None:
        self.max_result_bytes = max_result_bytes
        #: where a ``script`` from an http source may come from (as the http tool may go)
        self.confinement = confinement

    def run(self, command: Command, ctx: ToolContext) -> dict[str, Any]:
        limits = (ctx.remaining(), self.confinement)
        cfg = with_script(command, {**command.args, **command.tool_config}, "postgres", limits)
        statements = statements_of(cfg, "postgres", lambda sql: render_sql(command, sql))
        params = cfg.get("params")
        if params is not None and not isinstance(params, dict | list):
            raise ToolError("postgres: tool_config.params must be an object or a list")
        alias = auth_alias(cfg)
        dsn = _target_dsn(cfg, ctx, alias)
        remaining = ctx.remaining()
        conninfo = tool_conninfo(dsn, trusted=bool(alias))
        try:
            conn = psycopg.connect(
                conninfo,
                connect_timeout=max(1, min(10, int(remaining))),
                application_name="noetl-pgworker-tool",
                # One command's connection: preparing buys nothing, and the target may be
                # behind a transaction-pooling proxy (PgBouncer), where it breaks.
                prepare_threshold=None,
            )
        except psycopg.Error as exc:
            raise ToolError(
                f"postgres: cannot connect to {alias or redact_dsn(dsn)}:"
                f" {redact_text(first_line(exc), dsn)}"
            ) from None
        results: list[dict[str, Any]] = []
        cap = ResultCap("postgres", self.max_result_bytes)
        try:
            with conn, conn.cursor() as cur:
                timeout_ms = max(1, int(ctx.remaining() * 1000))
                cur.execute(
                    "SELECT set_config('statement_timeout', %s, true)", (f"{timeout_ms}ms",)
                )
                for sql in statements:
                    _collect(conn, sql, params, cap, results)
        except psycopg.errors.QueryCanceled:
            raise ToolTimeout(f"postgres: statement timed out after {ctx.timeout:g} s") from None
        except psycopg.Error as exc:
            code = f" [{exc.sqlstate}]" if exc.sqlstate else ""
            raise ToolError(f"postgres{code}: {redact_text(first_line(exc), dsn)}") from None
        finally:
            conn.close()
        return shape(results)


def _target_dsn(cfg: dict[str, Any], ctx: ToolContext, alias: str | None) -> str:
    """The DSN to connect to: the ``auth`` alias's, else ``connection_string`` (or ``dsn``)."""
    dsn = cfg.get("connection_string") or cfg.get("dsn")
    if alias:
        dsn = ctx.credentials.get(alias).dsn
        if not dsn:
            raise ToolError(f"postgres: credential {alias!r} has no dsn")
    if not isinstance(dsn, str) or not dsn:
        raise ToolError("postgres: give connection_string (or dsn) or an auth alias")
    return dsn


def _collect(
    conn: psycopg.Connection[Any],
    sql: str,
    params: Any,
    cap: ResultCap,
    results: list[dict[str, Any]],
) -> None:
    """Run ``sql`` (one statement or several; ``params`` bound client-side, as literals) and
    put each of its results into ``results``, its rows read a chunk at a time against
    ``cap`` (:mod:`~noetl_pgworker.tools.pgstream`)."""
    text = psycopg.ClientCursor(conn).mogrify(sql, params) if params else sql
    for done in run_streamed(conn, text, cap):
        if done.columns is not None:
            results.append(rows_result(done.columns, done.rows))
        elif not done.empty:  # (a statement of only comments is no statement)
            results.append(command_result(done.rowcount))
