"""The tool registry: one tool per ``tool_kind``.

A tool is anything with a ``kind`` and a ``run(command, ctx)`` that returns JSON-ready data or
raises (a :class:`~noetl_pgworker.errors.ToolError` for expected failures). Tools run on the
dispatcher's threads and must honour ``ctx.timeout``; they must not keep per-command state.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import (
    DEFAULT_COMMAND_TIMEOUT,
    Confinement,
    Tool,
    ToolContext,
    ToolRegistry,
    command_timeout,
)


def default_registry(
    *,
    python_mode: str = "process",
    python_memory_mb: int = 2048,
    run_as: str | None = None,
    child_max_procs: int | None = 256,
    child_max_file_mb: int | None = 1024,
    child_cpu_seconds: int | None = 3600,
    python_preload: Sequence[str] | None = None,
    confinement: Confinement | None = None,
) -> ToolRegistry:
    """Every tool that ships with noetl-pgworker. python and shell share one sandbox (fork
    server), started on first use or by :meth:`ToolRegistry.start`; templates and duckdb
    another (same limits, same user), whose processes run the worker's own code on a row's
    data. ``playbook`` (a sub-playbook started through NoETL's server) only with a
    ``server_url``. ``workbook`` steps run as their action once the worker has looked it up
    (:mod:`noetl_pgworker.workbook`). ``confinement``: where the tools may reach (default: the
    defaults)."""
    from ..workbook import WorkbookTool
    from .duckdb import DuckdbTool
    from .http import HttpTool
    from .isolated import MALLOC_ENV, Isolated, isolated_preload
    from .noop import NoopTool
    from .postgres import PostgresTool
    from .process import DEFAULT_PRELOAD, Limits, Sandbox
    from .python import PythonTool
    from .shell import ShellTool
    from .task_sequence import TaskSequenceTool

    c = confinement or Confinement()
    limits = Limits(python_memory_mb, child_max_procs, child_max_file_mb, child_cpu_seconds)
    preload = DEFAULT_PRELOAD if python_preload is None else tuple(python_preload)
    sandbox = Sandbox(limits, run_as=run_as, preload=preload)
    own = Sandbox(limits, run_as=run_as, preload=isolated_preload(), extra_env=MALLOC_ENV)
    isolated = Isolated(own)
    registry = ToolRegistry(
        [
            NoopTool(),
            PythonTool(
                mode=python_mode, memory_mb=python_memory_mb, sandbox=sandbox, confinement=c
            ),
            HttpTool(allow_loopback=c.http_allow_loopback, own_ports=c.own_ports),
            PostgresTool(max_result_bytes=c.max_result_bytes, confinement=c),
            ShellTool(sandbox),
        ],
        isolated=isolated,
    )
    if duckdb_installed():  # else this worker neither lists nor claims duckdb commands
        registry.register(
            DuckdbTool(
                isolated,
                max_result_bytes=c.max_result_bytes,
                db_dir=c.duckdb_dir,
                allowed_dirs=c.duckdb_allowed_dirs,
                confinement=c,
            )
        )
    registry.register(TaskSequenceTool(registry))  # runs its tasks through the others
    registry.register(WorkbookTool())  # run as its action: the worker expands it first
    return registry


def duckdb_installed() -> bool:
    """Is the optional ``duckdb`` package importable (``noetl-pgworker[duckdb]``)?"""
    import importlib.util

    try:
        return importlib.util.find_spec("duckdb") is not None
    except (ImportError, ValueError):  # (ValueError: a module without a spec, or blocked)
        return False


__all__ = [
    "DEFAULT_COMMAND_TIMEOUT",
    "Confinement",
    "Tool",
    "ToolContext",
    "ToolRegistry",
    "command_timeout",
    "default_registry",
]
