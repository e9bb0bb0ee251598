"""A tool result that reports its own failure, judged as NoETL's worker judges it.

NoETL's worker fails a step whose tool *returned* (rather than raised) a failure: a result
object whose ``status`` is ``"error"`` or ``"failed"`` — a python step's ``result = {"status":
"failed", ...}`` as much as a tool's own error envelope — and a result whose ``data`` object
holds an entry with ``status: "error"``. The step then ends with ``call.error`` and the
playbook fails; the result travels with the error. This worker applies the same rule to every
tool kind, on every path (a step's tool, a task of a task sequence, a workbook action).
"""

from __future__ import annotations

from typing import Any

#: ``status`` values that mean the result reports a failure (NoETL: "error" from tools,
#: "failed" from task sequences and from code that says so).
FAILED_STATUSES = ("error", "failed")
DEFAULT_MESSAGE = "Tool returned error status"


def returned_failure(result: Any) -> str | None:
    """The error message of a result that reports its own failure; None for any other."""
    if not isinstance(result, dict):
        return None
    if result.get("status") in FAILED_STATUSES:
        error = result.get("error")
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error) if error else DEFAULT_MESSAGE
    data = result.get("data")
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, dict) and value.get("status") == "error":
                return f"{key}: {value.get('message', 'Unknown error')}"
    return None


__all__ = ["DEFAULT_MESSAGE", "FAILED_STATUSES", "returned_failure"]
