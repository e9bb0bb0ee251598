"""The ``duckdb`` tool's work, in its sandboxed child process (never in the worker).

:func:`run` opens the database (in memory, or a file under the directories the worker named),
then, before any statement of the command, takes DuckDB's own external access away except for
``allowed`` directories (``allowed_directories``; ``enable_external_access=false``), turns off
installing and loading extensions, and locks the configuration, so that no statement can
reach a file, an extension or the network the operator did not name. Rows are read a chunk at
a time and counted against ``max_bytes`` (``--max-result-bytes``).
"""

from __future__ import annotations

from typing import Any

from .postgres import command_result, rows_result, shape
from .resultcap import ResultCap
from .values import to_json

CHUNK_ROWS = 1024
#: Settings fixed before the database opens.
OPEN_CONFIG = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
}


def _lock_down(con: Any, allowed: list[str]) -> None:
    dirs = [d.rstrip("/") + "/" for d in allowed]
    con.execute("SET allowed_directories = ?", [dirs])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _statement(con: Any, stmt: Any, params: Any, cap: ResultCap) -> dict[str, Any]:
    rel = con.execute(stmt, params) if params is not None else con.execute(stmt)
    if not rel.description:
        return command_result(-1)
    columns = [d[0] for d in rel.description]
    rows: list[Any] = []
    while chunk := rel.fetchmany(CHUNK_ROWS):
        cap.add(chunk)
        rows.extend(chunk)
    return rows_result(columns, rows)


def run(
    texts: list[str],
    params: Any,
    db_path: str,
    allowed: list[str],
    max_bytes: int,
    memory_mb: int | None = None,
) -> dict[str, Any]:
    """Run ``texts`` (SQL, several statements each allowed) on ``db_path``; the tool's result
    (the shape shared with ``postgres``, plus NoETL's ``command_<n>_rows|sample``). ``memory_mb``:
    the sandbox's address-space limit (DuckDB is told to keep under half of it)."""
    import duckdb

    cap = ResultCap("duckdb", max_bytes)
    config: dict[str, Any] = dict(OPEN_CONFIG)
    if memory_mb:  # DuckDB's own default is most of the machine's memory: its half of ours
        config["memory_limit"] = f"{max(64, memory_mb // 2)}MB"
    con = duckdb.connect(db_path, config=config)
    try:
        _lock_down(con, allowed)
        results: list[dict[str, Any]] = []
        noetl: dict[str, Any] = {}
        for text in texts:
            statements = duckdb.extract_statements(text)
            single = params if params and len(statements) == 1 else None
            for stmt in statements:
                result = _statement(con, stmt, single, cap)
                results.append(result)
                if result.get("rows"):
                    n = len(results)
                    noetl[f"command_{n}_rows"] = result["row_count"]
                    sample = [list(r.values()) for r in result["rows"][:5]]
                    noetl[f"command_{n}_sample"] = to_json(sample)
    finally:
        con.close()
    return {**shape(results), "executed_commands": len(results), **noetl}


__all__ = ["run"]
