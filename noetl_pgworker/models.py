"""What flows through the worker: a claimed :class:`Command` and its :class:`Outcome`.

``Command`` is a pydantic model because it is built from a database row (an edge); the rest
are frozen dataclasses. The first five fields of ``Command`` serialise to the same JSON as the
``Command`` of NoETL's Rust worker (``worker/source.rs``).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import MalformedCommand

#: What a tool kind looks like (NoETL's are all so); the claim fails any other as malformed.
_KIND = re.compile(r"[a-z][a-z0-9_]*")

#: The fields shared with the Rust ``Command``, in its order.
SEED_FIELDS = ("command_id", "execution_id", "step", "tool_kind", "input")


class CommandStatus(enum.StrEnum):
    PENDING = "PENDING"
    CLAIMED = "CLAIMED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_STATUSES = frozenset(
    {CommandStatus.COMPLETED, CommandStatus.FAILED, CommandStatus.CANCELLED}
)


@dataclass(frozen=True, slots=True)
class CommandRef:
    """The columns needed to report on a command; present even when the row is malformed."""

    execution_id: int
    command_id: int
    catalog_id: int
    step: str
    tool_kind: str | None = None
    parent_execution_id: int | None = None
    #: ``meta.command_id`` exactly as NoETL wrote it (an integer on 4.x servers), echoed back.
    meta_command_id: Any = None
    #: A loop iteration's epoch and index as NoETL's ``meta`` holds them, echoed in events.
    loop_epoch_id: Any = None
    loop_index: Any = None
    #: Which run of the command this is (``noetl.command.attempt``): events of runs after the
    #: first say so in their ``meta``.
    attempt: int = 1

    @property
    def wire_command_id(self) -> Any:
        return self.command_id if self.meta_command_id is None else self.meta_command_id

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CommandRef:
        try:
            meta = _json_column(row.get("meta"))
        except MalformedCommand:
            meta = None
        if not isinstance(meta, dict) and row.get("meta_command_id") is not None:
            meta = {"command_id": row["meta_command_id"]}
        return cls(
            execution_id=int(row["execution_id"]),
            command_id=int(row["command_id"]),
            catalog_id=int(row["catalog_id"]),
            step=str(row.get("step_name") or ""),
            tool_kind=row.get("tool_kind"),
            parent_execution_id=row.get("parent_execution_id"),
            meta_command_id=meta.get("command_id") if isinstance(meta, dict) else None,
            **_loop_keys(meta, row.get("loop_event_id"), row.get("iter_index")),
            attempt=_attempt(row.get("attempt")),
        )


def _attempt(value: Any) -> int:
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1


class Command(BaseModel):
    """One executable instruction, claimed from ``noetl.command``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    command_id: str = Field(description="the snowflake id, as a string (the wire id)")
    execution_id: int
    step: str = Field(min_length=1, description="the step name (noetl.command.step_name)")
    tool_kind: str = Field(min_length=1)
    input: dict[str, Any] = Field(
        default_factory=dict,
        description="the row's context: tool_config, input, render_context, spec",
    )
    event_id: int | None = None
    catalog_id: int
    attempt: int = 1
    meta: dict[str, Any] = Field(default_factory=dict)
    loop_event_id: str | None = None
    iter_index: int | None = None
    parent_execution_id: int | None = None
    parent_command_id: int | None = None
    #: When the row was created (its wait for a claim starts there); not serialised.
    created_at: datetime | None = Field(default=None, exclude=True)

    @property
    def tool_config(self) -> dict[str, Any]:
        value = self.input.get("tool_config")
        return value if isinstance(value, dict) else {}

    @property
    def args(self) -> dict[str, Any]:
        """The step's inputs as NoETL's worker hands them to every tool.

        ``tool_config.args``, then ``tool_config.input`` (a tool-level ``input:`` and every
        loop's ``iter`` value arrive there), then ``context.input``; later wins.
        """
        merged: dict[str, Any] = {}
        config = self.tool_config
        for value in (config.get("args"), config.get("input"), self.input.get("input")):
            if isinstance(value, dict):
                merged.update(value)
        return merged

    @property
    def ref(self) -> CommandRef:
        return CommandRef(
            execution_id=self.execution_id,
            command_id=int(self.command_id),
            catalog_id=self.catalog_id,
            step=self.step,
            tool_kind=self.tool_kind,
            parent_execution_id=self.parent_execution_id,
            meta_command_id=self.meta.get("command_id"),
            **_loop_keys(self.meta, self.loop_event_id, self.iter_index),
            attempt=self.attempt,
        )

    def seed_json(self) -> str:
        """The JSON of the fields shared with the Rust ``Command``."""
        return self.model_dump_json(include=set(SEED_FIELDS))

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Command:
        """Map a ``noetl.command`` row; raise :class:`MalformedCommand` saying why it cannot be.

        ``context`` and ``meta`` may come as JSON text (the claim returns them so, to parse each
        row alone); whatever cannot be parsed or mapped is a malformed command, never a crash.
        """
        try:
            return cls._from_row(row)
        except MalformedCommand:
            raise
        except RecursionError:
            raise MalformedCommand("malformed command: nested too deeply to be read") from None
        except Exception as exc:
            raise MalformedCommand(
                f"malformed command: cannot be read ({type(exc).__name__}: {exc})"[:500]
            ) from None

    @classmethod
    def _from_row(cls, row: Mapping[str, Any]) -> Command:
        context = _json_column(row.get("context"), "context")
        if context is None:
            context = {}
        if not isinstance(context, dict):
            raise MalformedCommand(
                f"malformed command: context is a JSON {_json_kind(context)}, not an object"
            )
        for key in ("tool_config", "input"):
            value = context.get(key)
            if value is not None and not isinstance(value, dict):
                raise MalformedCommand(
                    f"malformed command: context.{key} is a JSON {_json_kind(value)}, not an object"
                )
        meta = _json_column(row.get("meta"), "meta")
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise MalformedCommand(
                f"malformed command: meta is a JSON {_json_kind(meta)}, not an object"
            )
        tool_kind = row.get("tool_kind")
        if not tool_kind or not str(tool_kind).strip():
            raise MalformedCommand("malformed command: tool_kind is empty")
        if not _KIND.fullmatch(str(tool_kind)):
            raise MalformedCommand(
                f"malformed command: tool_kind {str(tool_kind)!r} is not a tool kind"
                " (lowercase letters, digits and _, starting with a letter)"
            )
        iter_index = row.get("iter_index")
        try:
            return cls(
                command_id=str(row["command_id"]),
                execution_id=int(row["execution_id"]),
                step=row.get("step_name") or "",
                tool_kind=str(tool_kind).strip(),
                input=context,
                event_id=row.get("event_id"),
                catalog_id=int(row["catalog_id"]),
                attempt=int(row.get("attempt") or 1),
                meta=meta,
                loop_event_id=row.get("loop_event_id"),
                iter_index=iter_index,
                parent_execution_id=row.get("parent_execution_id"),
                parent_command_id=row.get("parent_command_id"),
                created_at=row.get("created_at"),
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise MalformedCommand(f"malformed command: {problems}") from exc


def _json_column(value: Any, name: str = "meta") -> Any:
    """A jsonb column's value, parsed when it came as text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except RecursionError:
        raise MalformedCommand(f"malformed command: {name} is nested too deeply") from None
    except ValueError as exc:
        raise MalformedCommand(f"malformed command: {name} is not JSON ({exc})") from None


def _loop_keys(meta: Any, loop_event_id: Any, iter_index: Any) -> dict[str, Any]:
    """A loop iteration's epoch and index: from NoETL's ``meta``, else from the columns."""
    meta = meta if isinstance(meta, dict) else {}
    epoch = meta.get("__loop_epoch_id") or meta.get("loop_event_id") or loop_event_id
    if epoch is None:
        return {}
    index = meta.get("loop_iteration_index")
    return {"loop_epoch_id": epoch, "loop_index": iter_index if index is None else index}


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """A tool's data plus worker-added context (captured output), when it has some."""

    data: Any
    extra: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What running a command produced."""

    ok: bool
    data: Any = None
    error: str | None = None
    error_type: str | None = None
    duration: float = 0.0
    started_at: datetime | None = None
    #: Worker-added context beside the data (``_stdout``, ``_stderr``, ``_traceback``).
    extra: dict[str, Any] | None = None

    @classmethod
    def success(
        cls,
        data: Any,
        *,
        duration: float = 0.0,
        started_at: datetime | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Outcome:
        return cls(ok=True, data=data, duration=duration, started_at=started_at, extra=extra)

    @classmethod
    def failure(
        cls,
        error: str,
        *,
        error_type: str = "error",
        data: Any = None,
        duration: float = 0.0,
        started_at: datetime | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Outcome:
        return cls(
            ok=False,
            data=data,
            error=error,
            error_type=error_type,
            duration=duration,
            started_at=started_at,
            extra=extra,
        )
