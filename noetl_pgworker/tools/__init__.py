"""The tool registry: one tool per ``tool_kind``.

A tool is anything with a ``kind`` and a ``run(command)`` that returns JSON-ready data or
raises. Tools run on the dispatcher's threads; they must not keep per-command state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from ..errors import UnknownTool
from ..models import Command


@runtime_checkable
class Tool(Protocol):
    kind: str

    def run(self, command: Command) -> Any:
        """Execute ``command``; return its output, or raise to fail it."""
        ...


class ToolRegistry:
    """Tools by kind."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
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

    def __contains__(self, kind: object) -> bool:
        return kind in self._tools


def default_registry() -> ToolRegistry:
    """Every tool that ships with noetl-pgworker."""
    from .noop import NoopTool
    from .python import PythonTool

    return ToolRegistry([NoopTool(), PythonTool()])


__all__ = ["Tool", "ToolRegistry", "default_registry"]
