"""A bound on what a tool reads from a database: ``--max-result-bytes``.

Rows are counted as they are read (an estimate of their JSON size), and reading stops with a
clear error as soon as the total passes the cap: a tool's memory is bounded by the cap (plus
one chunk of rows), not by the result.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ToolError

#: The cap when the worker names none (its default --max-result-bytes).
DEFAULT_MAX_RESULT_BYTES = 1024 * 1024


class ResultTooLarge(ToolError):
    error_type = "result_too_large"


def value_size(value: Any) -> int:
    """About the bytes ``value`` takes as JSON (a few bytes off; never much less)."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value) * 4 // 3 + 4
    if isinstance(value, dict):
        return 2 + sum(value_size(k) + value_size(v) + 2 for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return 2 + sum(value_size(v) + 1 for v in value)
    return 8 if value is None or isinstance(value, bool | int | float) else len(str(value))


class ResultCap:
    """Counts the rows a tool reads; raises :class:`ResultTooLarge` past ``limit`` bytes."""

    def __init__(self, tool: str, limit: int = DEFAULT_MAX_RESULT_BYTES) -> None:
        self.tool = tool
        self.limit = limit
        self.used = 0
        self.rows = 0

    def add(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.used += 2 + sum(value_size(v) + 4 for v in row)
            self.rows += 1
            if self.used > self.limit:
                raise ResultTooLarge(
                    f"{self.tool}: the result is larger than --max-result-bytes"
                    f" ({self.limit} bytes): reading stopped after {self.rows} rows; select"
                    " fewer rows or columns, or aggregate in SQL"
                )


__all__ = ["DEFAULT_MAX_RESULT_BYTES", "ResultCap", "ResultTooLarge", "value_size"]
