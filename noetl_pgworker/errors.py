"""Exceptions of noetl-pgworker.

One root, :class:`PgWorkerError`; each leaf's docstring is its default message. Driver errors
are wrapped once, at the boundary, with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any


class PgWorkerError(Exception):
    """noetl-pgworker failed."""

    def __init__(self, message: str | None = None, **context: Any) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.context = context
        super().__init__(self.message)


class ConfigError(PgWorkerError):
    """The configuration is not valid."""


class DatabaseUnavailable(PgWorkerError):
    """The database cannot be reached."""


class SchemaMissing(PgWorkerError):
    """The database lacks objects the worker needs (run `noetl-pgworker schema apply`)."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(
            "the database lacks what the worker needs: "
            + ", ".join(missing)
            + " (run `noetl-pgworker schema apply`; add --with-noetl-tables on a database"
            " without NoETL)"
        )


class RetryLater(PgWorkerError):
    """The outcomes could not be written now; they are kept and written later."""

    def __init__(
        self,
        message: str | None = None,
        *,
        written: set[tuple[int, int]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        #: The (execution_id, command_id) of the items that did go through before the failure.
        self.written = written or set()
        #: Seconds the other side asked us to wait (HTTP ``Retry-After``), if it said.
        self.retry_after = retry_after


class ItemRefused(PgWorkerError):
    """An outcome cannot be stored; writing it again will not change that."""

    def __init__(
        self,
        message: str | None = None,
        *,
        key: tuple[int, int] | None = None,
        error_type: str = "storage",
    ) -> None:
        super().__init__(message)
        #: The refused item's (execution_id, command_id); None when the database refused a
        #: batch without saying which item (the reporter then writes them one by one).
        self.key = key
        #: The ``error_type`` of the failure stored instead of the refused outcome.
        self.error_type = error_type


class MalformedCommand(PgWorkerError):
    """A noetl.command row cannot be mapped to a Command."""


class ToolError(PgWorkerError):
    """A tool failed."""

    error_type = "tool_error"

    def __init__(
        self,
        message: str | None = None,
        *,
        data: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        #: What the tool got before it failed (an HTTP response, a process's output).
        self.data = data
        #: Worker-added context (captured output), merged into the result envelope.
        self.extra = extra or {}


class UnknownTool(ToolError):
    """No tool is registered for this tool kind."""

    error_type = "unknown_tool"


class ToolTimeout(ToolError):
    """The command ran out of time."""

    error_type = "timeout"


class CredentialError(ToolError):
    """A credential alias cannot be resolved."""

    error_type = "credentials"
