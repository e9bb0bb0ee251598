"""What every tool shares: the ``Tool`` protocol, its ``ToolContext``, the registry.

A leaf of ``noetl_pgworker.tools``: the tools import it, it imports no tool.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..credentials import CredentialProvider, EnvCredentials
from ..errors import ToolError, UnknownTool
from ..models import Command

DEFAULT_COMMAND_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool may use besides the command."""

    timeout: float = DEFAULT_COMMAND_TIMEOUT
    credentials: CredentialProvider = field(default_factory=EnvCredentials)
    started: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        """Seconds left of the command's time (never below a millisecond)."""
        return max(0.001, self.timeout - (time.monotonic() - self.started))


@runtime_checkable
class Tool(Protocol):
    kind: str

    def run(self, command: Command, ctx: ToolContext) -> Any:
        """Execute ``command`` within ``ctx.timeout``; return its output, or raise to fail it."""
        ...


def command_timeout(command: Command, default: float) -> float:
    """``tool_config.timeout_seconds`` or ``tool_config.timeout``, else the worker's default."""
    for key in ("timeout_seconds", "timeout"):
        value = command.tool_config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ToolError(f"tool_config.{key} must be a positive number of seconds")
        return float(value)
    return default


@dataclass(frozen=True, slots=True)
class Confinement:
    """Where a command's tools may reach, and how much they may read."""

    #: what postgres and duckdb read of a result, at most (--max-result-bytes)
    max_result_bytes: int = 1024 * 1024
    #: where duckdb database files live (--duckdb-dir); None: only the command's directory
    duckdb_dir: str | None = None
    #: what duckdb SQL may read and write besides (--duckdb-allowed-dirs)
    duckdb_allowed_dirs: tuple[str, ...] = ()
    #: whether http may reach loopback and link-local addresses (--http-allow-loopback)
    http_allow_loopback: bool = False
    #: the worker's own ports (never reachable by http)
    own_ports: tuple[int, ...] = ()
    #: where file scripts (``script: {source: {type: file}}``) are read (--script-dir); None:
    #: nowhere
    script_dir: str | None = None


class ToolRegistry:
    """Tools by kind."""

    def __init__(self, tools: Iterable[Tool] = (), *, isolated: Any = None) -> None:
        self._tools: dict[str, Tool] = {}
        #: Where the templates of a command (and duckdb) are evaluated: a
        #: :class:`~noetl_pgworker.tools.isolated.Isolated`; None: in the worker's process.
        self.isolated = isolated
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        if not tool.kind or tool.kind != tool.kind.strip():
            raise ValueError(f"invalid tool kind {tool.kind!r}")
        self._tools[tool.kind] = tool

    def get(self, kind: str) -> Tool:
        try:
            return self._tools[kind]
        except KeyError:
            raise UnknownTool(
                f"unknown tool kind {kind!r}; this worker runs: {', '.join(self.kinds())}"
            ) from None

    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted(self._tools))

    def runs_apart(self, kind: str | None) -> bool:
        """Does a command of ``kind`` run where it cannot take the worker down with it (a
        process of its own, or nothing of it runs)? A tool says so with ``runs_apart = True``."""
        tool = self._tools.get(kind or "")
        return getattr(tool, "runs_apart", False) is True

    def start(self) -> None:
        """Start what tools keep running (the fork servers)."""
        for tool in [*self._tools.values(), self.isolated]:
            start = getattr(tool, "start", None)
            if callable(start):
                start()

    def close(self) -> None:
        """Release what tools keep open (HTTP connection pools, the fork servers)."""
        for tool in [*self._tools.values(), self.isolated]:
            close = getattr(tool, "close", None)
            if callable(close):
                close()

    def __contains__(self, kind: object) -> bool:
        return kind in self._tools
