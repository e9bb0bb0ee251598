"""``duckdb``: run SQL on DuckDB (optional: ``pip install 'noetl-pgworker[duckdb]'``).

Input: the SQL as for ``postgres`` (string, several statements allowed, or a list; a Jinja
template rendered against the command's context with the step's arguments, rendered, over it),
``params`` (a list or an object, used with a single statement), ``db_path`` (default: an
in-memory database). Output as for ``postgres``, plus NoETL's duckdb keys (``executed_commands``,
``command_<n>_rows``, ``command_<n>_sample`` — first five rows as lists — ``task_id``,
``execution_id``, ``database_path``, ``secrets_created``).

It runs in a sandboxed child process (:mod:`noetl_pgworker.tools.duckdb_child`), never in the
worker: the sandbox's limits, its user (``--run-as``), a scrubbed environment, killed at the
command's timeout. DuckDB's external access is off before the command's first statement (no
file, extension or network) except for the command's own directory, ``--duckdb-dir`` and
``--duckdb-allowed-dirs``; the configuration is locked. ``db_path`` is a file name under
``--duckdb-dir`` (a relative path, or an absolute one inside it); without ``--duckdb-dir`` a
relative ``db_path`` lives in the command's own directory, removed when it ends. Rows are read
a chunk at a time up to ``--max-result-bytes``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ToolError
from ..models import Command
from ..render import render_sql
from .base import Confinement, ToolContext
from .postgres import statements_of, with_script
from .resultcap import DEFAULT_MAX_RESULT_BYTES

INSTALL_HINT = "duckdb is not installed on this worker: pip install 'noetl-pgworker[duckdb]'"
ENTRY = "noetl_pgworker.tools.duckdb_child:run"


class DuckdbTool:
    kind = "duckdb"
    #: every command in a process of its own (the isolated sandbox)
    runs_apart = True

    def __init__(
        self,
        isolated: Any,
        *,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        db_dir: str | None = None,
        allowed_dirs: Sequence[str] = (),
        confinement: Confinement | None = None,
    ) -> None:
        self.isolated = isolated
        #: where a ``script`` from an http source may come from (as the http tool may go)
        self.confinement = confinement
        self.max_result_bytes = max_result_bytes
        self.db_dir = os.path.realpath(db_dir) if db_dir else None
        self.allowed_dirs = [os.path.realpath(d) for d in allowed_dirs]

    def run(self, command: Command, ctx: ToolContext) -> dict[str, Any]:
        if importlib.util.find_spec("duckdb") is None:
            raise ToolError(f"duckdb: {INSTALL_HINT}")
        limits = (ctx.remaining(), self.confinement)
        cfg = with_script(command, {**command.args, **command.tool_config}, "duckdb", limits)
        texts = statements_of(cfg, "duckdb", lambda sql: render_sql(command, sql, quote=False))
        params = cfg.get("params")
        if params is not None and not isinstance(params, dict | list):
            raise ToolError("duckdb: tool_config.params must be an object or a list")
        db_path = cfg.get("db_path") or ":memory:"
        if not isinstance(db_path, str):
            raise ToolError("duckdb: tool_config.db_path must be a string")
        sandbox = self.isolated.sandbox
        with sandbox.workdir("noetl-pgworker-duckdb-") as workdir:
            where = self._place(db_path, workdir)
            allowed = [workdir, *([self.db_dir] if self.db_dir else []), *self.allowed_dirs]
            args = {
                "texts": texts,
                "params": params,
                "db_path": where,
                "allowed": allowed,
                "max_bytes": self.max_result_bytes,
                "memory_mb": sandbox.limits.memory_mb,
            }
            out = self.isolated.call(
                ENTRY,
                args,
                timeout=ctx.remaining(),
                what="duckdb",
                max_bytes=self.max_result_bytes * 2,
                workdir=Path(workdir),
            )
        # NoETL's duckdb result (a later step may read `{{ step.executed_commands }}`) beside
        # the shape shared with postgres.
        return {
            **out,
            "task_id": command.command_id,
            "execution_id": str(command.execution_id),
            "database_path": db_path,
            "secrets_created": 0,
        }

    def _place(self, db_path: str, workdir: str) -> str:
        """Where the database file is: in memory, under ``--duckdb-dir``, or (without it, a
        relative path) in the command's own directory; ToolError anywhere else."""
        if db_path == ":memory:" or db_path.startswith(":memory:"):
            return db_path
        base = self.db_dir or workdir
        path = os.path.realpath(os.path.join(base, db_path))
        if os.path.commonpath([path, base]) != base:
            where = "--duckdb-dir" if self.db_dir else "the command's own directory"
            raise ToolError(
                f"duckdb: db_path {db_path!r} is outside {where}"
                + ("" if self.db_dir else " (the worker names no --duckdb-dir)")
            )
        return path
