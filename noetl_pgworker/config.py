"""Worker settings.

One story for every value: command-line flag > ``NOETL_PGWORKER_*`` environment variable >
default. The CLI resolves flags and environment (click does it, and ``--help`` shows the
variable names); this model validates the result and is what the library takes.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV_PREFIX = "NOETL_PGWORKER_"
NOTIFY_CHANNEL = "noetl_pgworker_command"


def default_worker_id() -> str:
    """The host name, or ``<host>-<instance>`` with ``NOETL_PGWORKER_INSTANCE`` (the template
    unit ``noetl-pgworker@<instance>.service`` sets it): the same at every restart, so that
    what a stop spooled is written by the next start, and ``noetl.runtime`` keeps one row per
    worker. Several processes on one machine need an instance (or a --worker-id) each."""
    host = socket.gethostname() or "noetl-pgworker"
    instance = os.environ.get(f"{ENV_PREFIX}INSTANCE", "").strip()
    return f"{host}-{instance}" if instance else host


#: Outcomes that may await their write: deep enough that claims and writes overlap over a
#: database a few milliseconds away (docs/benchmarks.md, "Latency to the database").
DEFAULT_PENDING_WRITES = 256


class Settings(BaseModel):
    """Everything a running worker needs to know."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dsn: str = Field(
        default="",
        description="libpq connection string or URL; empty = libpq defaults and PG* variables",
    )
    session_dsn: str | None = Field(
        default=None,
        description="a direct connection for what needs a session (LISTEN, the claim session's"
        " advisory locks) when `dsn` goes through a transaction-pooling proxy",
    )
    pool_mode: Literal["direct", "session", "transaction"] = Field(
        default="direct",
        description="how `dsn` reaches PostgreSQL: directly, or through a pooling proxy"
        " (PgBouncer) in session or transaction pooling mode",
    )
    worker_id: str = Field(default_factory=default_worker_id, min_length=1, max_length=200)
    concurrency: int = Field(default=8, ge=1, le=1024)
    tool_kinds: tuple[str, ...] | None = Field(
        default=None, description="tool kinds to claim; None = every kind the registry has"
    )
    poll_interval: float = Field(default=2.0, gt=0, le=3600)
    drain: bool = False
    heartbeat_interval: float = Field(default=5.0, gt=0, le=15)
    shutdown_timeout: float = Field(default=30.0, ge=0)
    spool_dir: str | None = Field(
        default=None,
        description="where outcomes that cannot be written at shutdown are kept for the next"
        " start (default: systemd's $STATE_DIRECTORY, else none)",
    )
    connect_timeout: float = Field(default=10.0, gt=0)
    network_timeout: float = Field(
        default=20.0,
        ge=0,
        le=3600,
        description="a connection whose peer does not answer is dropped after about this long"
        " (keepalives and tcp_user_timeout, client and server side; 0: the system's)",
    )
    flush_interval: float = Field(
        default=0.0, ge=0, le=1, description="how long the writer gathers outcomes"
    )
    flush_max: int = Field(default=500, ge=1, le=10_000)
    claim_gather: float = Field(
        default=0.03,
        ge=0,
        le=1,
        description="under load, how long a free thread waits for others to free up before"
        " claiming, so that one claim statement serves several threads",
    )
    write_gather: float = Field(
        default=0.015,
        ge=0,
        le=1,
        description="while other commands run, how long a finished command's outcome waits"
        " for theirs, so that one write serves several (alone: written at once)",
    )
    start_write_delay: float = Field(
        default=0.2,
        ge=0,
        le=60,
        description="a command's start (RUNNING, command.started) is written alone only once it"
        " has run this long; a shorter command's start goes with its outcome, in one write",
    )
    max_pending_writes: int = Field(
        default=DEFAULT_PENDING_WRITES,
        ge=0,
        le=100_000,
        description="finished commands whose outcome may await its write while the worker"
        " claims more; claims held <= concurrency + this (each holds one entry of"
        " PostgreSQL's lock table until its outcome is written)",
    )
    listener_check_interval: float = Field(default=30.0, gt=0)
    max_result_bytes: int = Field(default=1024 * 1024, ge=1024)
    lease: float = Field(
        default=120.0, gt=0, description="a dead worker's claim is taken back after this age"
    )
    stale_after: float = Field(
        default=30.0, gt=0, description="a worker whose heartbeat is older than this is dead"
    )
    max_attempts: int = Field(default=3, ge=1, le=1000)
    command_timeout: float = Field(
        default=300.0, gt=0, description="default time a command may run (tool_config overrides)"
    )
    python_mode: Literal["process", "spawn", "inline"] = "process"
    python_memory_mb: int = Field(default=2048, ge=16)
    python_preload: tuple[str, ...] | None = Field(
        default=None,
        description="modules the fork server imports once; None = what the python runner needs",
    )
    run_as: str | None = Field(
        default=None, description="run python and shell commands as this user (worker: root)"
    )
    child_max_procs: int = Field(default=256, ge=1, description="RLIMIT_NPROC of a child")
    child_max_file_mb: int = Field(default=1024, ge=1, description="RLIMIT_FSIZE of a child")
    child_cpu_seconds: int = Field(default=3600, ge=1, description="RLIMIT_CPU of a child")
    verify_schema: bool = True
    server_url: str | None = Field(
        default=None, description="report to this NoETL server instead of writing rows"
    )
    duckdb_dir: str | None = Field(
        default=None, description="where duckdb database files (db_path) live; None: nowhere"
    )
    duckdb_allowed_dirs: tuple[str, ...] = Field(
        default=(), description="directories duckdb SQL may read and write besides its own"
    )
    script_dir: str | None = Field(
        default=None, description="where file scripts are read; None: file scripts refused"
    )
    http_allow_loopback: bool = Field(
        default=False, description="let http commands reach loopback and link-local addresses"
    )
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = Field(
        default="127.0.0.1", description="the metrics server's address; 0.0.0.0 exposes it"
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="send command traces over OTLP/HTTP to this collector (base URL);"
        " OTEL_EXPORTER_OTLP_ENDPOINT works too",
    )

    @model_validator(mode="after")
    def _liveness_is_consistent(self) -> Settings:
        if self.stale_after <= self.heartbeat_interval:
            raise ValueError(
                f"stale_after ({self.stale_after} s) must be longer than heartbeat_interval"
                f" ({self.heartbeat_interval} s), or live workers would look dead"
            )
        return self

    @field_validator("python_preload", "duckdb_allowed_dirs", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("tool_kinds", mode="before")
    @classmethod
    def _split_kinds(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list | tuple):
            kinds = tuple(dict.fromkeys(str(k).strip() for k in value if str(k).strip()))
            if not kinds:
                # Fail closed: an empty list must not mean "every kind" (python and shell
                # included) by accident, e.g. an unset variable in a unit file.
                raise ValueError(
                    "names no tool kind; leave it out to claim every kind this worker runs"
                )
            return kinds
        return value
