"""noetl-pgworker: run NoETL commands straight from PostgreSQL."""

from .config import Settings
from .dispatcher import Dispatcher, Slots, execute
from .errors import (
    ConfigError,
    DatabaseUnavailable,
    MalformedCommand,
    PgWorkerError,
    SchemaMissing,
    ToolError,
    UnknownTool,
)
from .models import Command, CommandRef, CommandStatus, Outcome
from .reporter import PgSink, Reporter, Sink
from .source import CommandSource, InMemorySource, PgCommandSource
from .tools import Tool, ToolRegistry, default_registry
from .worker import RunSummary, Worker

__all__ = [
    "Command",
    "CommandRef",
    "CommandSource",
    "CommandStatus",
    "ConfigError",
    "DatabaseUnavailable",
    "Dispatcher",
    "InMemorySource",
    "MalformedCommand",
    "Outcome",
    "PgCommandSource",
    "PgSink",
    "PgWorkerError",
    "Reporter",
    "RunSummary",
    "SchemaMissing",
    "Settings",
    "Sink",
    "Slots",
    "Tool",
    "ToolError",
    "ToolRegistry",
    "UnknownTool",
    "Worker",
    "default_registry",
    "execute",
]
