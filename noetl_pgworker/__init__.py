"""noetl-pgworker: run NoETL commands straight from PostgreSQL."""

from .config import Settings
from .dispatcher import Dispatcher, execute
from .errors import (
    ConfigError,
    DatabaseUnavailable,
    ItemRefused,
    MalformedCommand,
    PgWorkerError,
    RetryLater,
    SchemaMissing,
    ToolError,
    UnknownTool,
)
from .inflight import InFlight, Slots
from .memory import InMemorySink, InMemorySource
from .models import Command, CommandRef, CommandStatus, Outcome
from .reporter import Reporter
from .sink import PgSink, Sink
from .source import ClaimOptions, CommandSource, PgCommandSource, SourceHooks
from .tools import Tool, ToolRegistry, default_registry
from .worker import RunSummary, Worker

__all__ = [
    "ClaimOptions",
    "Command",
    "CommandRef",
    "CommandSource",
    "CommandStatus",
    "ConfigError",
    "DatabaseUnavailable",
    "Dispatcher",
    "InFlight",
    "InMemorySink",
    "InMemorySource",
    "ItemRefused",
    "MalformedCommand",
    "Outcome",
    "PgCommandSource",
    "PgSink",
    "PgWorkerError",
    "Reporter",
    "RetryLater",
    "RunSummary",
    "SchemaMissing",
    "Settings",
    "Sink",
    "Slots",
    "SourceHooks",
    "Tool",
    "ToolError",
    "ToolRegistry",
    "UnknownTool",
    "Worker",
    "default_registry",
    "execute",
]
