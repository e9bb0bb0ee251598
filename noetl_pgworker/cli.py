"""The ``noetl-pgworker`` command.

Every option also reads ``NOETL_PGWORKER_<NAME>`` from the environment (``--help`` shows the
name); the connection string goes to libpq untouched, so ``PG*`` variables work too.
Expected failures print one line on stderr and exit 1 (usage errors exit 2); ``-v`` shows
the traceback. Data goes to stdout, progress and logs to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from . import enqueue as enqueue_mod
from . import logs, schema
from . import status as status_mod
from .cli_control import register as register_control
from .config import DEFAULT_PENDING_WRITES, Settings
from .db import connect, wrap_errors
from .errors import ConfigError, PgWorkerError
from .redact import redact_dsn, redact_secrets
from .sdnotify import Notifier
from .stopguard import STOP_MARGIN, StopDeadline
from .tools import default_registry
from .tools.process import harden_process

logger = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _env(name: str) -> str:
    return f"NOETL_PGWORKER_{name}"


def dsn_option(func: F) -> F:
    return click.option(
        "--dsn",
        envvar=_env("DSN"),
        show_envvar=True,
        default="",
        help="PostgreSQL connection string or URL. Empty: libpq defaults and PG* variables"
        " (PGHOST, PGDATABASE, ...).",
    )(func)


def log_options(func: F) -> F:
    func = click.option(
        "--log-format",
        envvar=_env("LOG_FORMAT"),
        show_envvar=True,
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Log lines on stderr as text or as one JSON object per line.",
    )(func)
    func = click.option(
        "--log-level",
        envvar=_env("LOG_LEVEL"),
        show_envvar=True,
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        default="info",
        show_default=True,
        help="Least severe log level shown.",
    )(func)
    return click.option(
        "-v", "--verbose", is_flag=True, help="Show tracebacks of errors (for bug reports)."
    )(func)


def options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Apply ``decorators`` as if stacked in this order (the first one on top)."""

    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


_START_OPTIONS = (
    click.option(
        "--worker-id",
        envvar=_env("WORKER_ID"),
        show_envvar=True,
        default=None,
        help="Name of this worker in noetl.runtime and noetl.command.worker_id; the same at"
        " every restart, one process per name.  [default: the host name, or"
        " <host>-$NOETL_PGWORKER_INSTANCE]",
    ),
    click.option(
        "--concurrency",
        envvar=_env("CONCURRENCY"),
        show_envvar=True,
        type=click.IntRange(1, 1024),
        default=8,
        show_default=True,
        help="Threads, i.e. commands run at once.",
    ),
    click.option(
        "--max-pending-writes",
        envvar=_env("MAX_PENDING_WRITES"),
        show_envvar=True,
        type=click.IntRange(0, 100_000),
        default=DEFAULT_PENDING_WRITES,
        show_default=True,
        help="Finished commands whose outcome may await its write while the worker claims"
        " more, so that claims and writes overlap over a distant database. Claims held <="
        " concurrency + this; each holds an entry of PostgreSQL's lock table until written.",
    ),
    click.option(
        "--tool-kinds",
        envvar=_env("TOOL_KINDS"),
        show_envvar=True,
        default=None,
        help="Comma-separated tool kinds to claim; nothing else is claimed."
        "  [default: every kind this worker has]",
    ),
    click.option(
        "--poll-interval",
        envvar=_env("POLL_INTERVAL"),
        show_envvar=True,
        type=click.FloatRange(0.01, 3600),
        default=2.0,
        show_default=True,
        help="Seconds between claims when no NOTIFY arrives (the fallback).",
    ),
    click.option(
        "--drain",
        envvar=_env("DRAIN"),
        show_envvar=True,
        is_flag=True,
        help="Exit 0 once the queue has nothing left for this worker.",
    ),
    click.option(
        "--heartbeat-interval",
        envvar=_env("HEARTBEAT_INTERVAL"),
        show_envvar=True,
        type=click.FloatRange(0.1, 15),
        default=5.0,
        show_default=True,
        help="Seconds between noetl.runtime heartbeats.",
    ),
    click.option(
        "--shutdown-timeout",
        envvar=_env("SHUTDOWN_TIMEOUT"),
        show_envvar=True,
        type=click.FloatRange(0),
        default=30.0,
        show_default=True,
        help="On SIGTERM/SIGINT, seconds to let running commands finish.",
    ),
    click.option(
        "--spool-dir",
        envvar=_env("SPOOL_DIR"),
        show_envvar=True,
        default=None,
        help="Keep outcomes that cannot be written at shutdown (database away) in this directory;"
        " the next start under the same worker id writes them.  [default: $STATE_DIRECTORY under"
        " systemd, else not kept: their commands run again after the lease]",
    ),
    click.option(
        "--connect-timeout",
        envvar=_env("CONNECT_TIMEOUT"),
        show_envvar=True,
        type=click.FloatRange(1),
        default=10.0,
        show_default=True,
        help="Seconds to wait for a database connection.",
    ),
    click.option(
        "--network-timeout",
        envvar=_env("NETWORK_TIMEOUT"),
        show_envvar=True,
        type=click.FloatRange(0, 3600),
        default=20.0,
        show_default=True,
        help="Seconds after which a connection whose peer does not answer is dropped"
        " (keepalives and tcp_user_timeout, on the worker's and the server's side; a DSN's own"
        " keepalives_* or tcp_user_timeout win; 0: the system's, i.e. up to hours).",
    ),
    click.option(
        "--max-result-bytes",
        envvar=_env("MAX_RESULT_BYTES"),
        show_envvar=True,
        type=click.IntRange(1024),
        default=1024 * 1024,
        show_default=True,
        help="Tool output larger than this is stored as a summary, not inline.",
    ),
    click.option(
        "--lease",
        envvar=_env("LEASE"),
        show_envvar=True,
        type=click.FloatRange(0.1),
        default=120.0,
        show_default=True,
        help="Seconds after which a dead worker's claim may be taken back (NoETL uses 120).",
    ),
    click.option(
        "--stale-after",
        envvar=_env("STALE_AFTER"),
        show_envvar=True,
        type=click.FloatRange(0.1),
        default=30.0,
        show_default=True,
        help="A worker whose noetl.runtime heartbeat is older than this many seconds is dead.",
    ),
    click.option(
        "--max-attempts",
        envvar=_env("MAX_ATTEMPTS"),
        show_envvar=True,
        type=click.IntRange(1, 1000),
        default=3,
        show_default=True,
        help="A command abandoned by this many workers (crashes) ends FAILED instead of rerunning.",
    ),
    click.option(
        "--command-timeout",
        envvar=_env("COMMAND_TIMEOUT"),
        show_envvar=True,
        type=click.FloatRange(0.001),
        default=300.0,
        show_default=True,
        help="Seconds a command may run; tool_config.timeout_seconds|timeout overrides it.",
    ),
    click.option(
        "--python-mode",
        envvar=_env("PYTHON_MODE"),
        show_envvar=True,
        type=click.Choice(["process", "spawn", "inline"]),
        default="process",
        show_default=True,
        help="Run python commands in a fresh fork of the fork server (isolated), in a new"
        " interpreter each (spawn: isolated, slower), or inline on a worker thread (fastest; a"
        " crash or endless loop in the code takes the worker down).",
    ),
    click.option(
        "--python-preload",
        envvar=_env("PYTHON_PRELOAD"),
        show_envvar=True,
        default=None,
        help="Comma-separated modules the fork server imports once, so python steps that import"
        " them start warm.  [default: what the python runner needs]",
    ),
    click.option(
        "--duckdb-dir",
        envvar=_env("DUCKDB_DIR"),
        show_envvar=True,
        default=None,
        help="Directory of duckdb database files: a command's db_path is a file under it."
        "  [default: none: in-memory databases, or files in the command's own directory,"
        " removed after]",
    ),
    click.option(
        "--script-dir",
        envvar=_env("SCRIPT_DIR"),
        show_envvar=True,
        default=None,
        help="Directory of file scripts (NoETL's script: {uri, source: {type: file}}): a"
        " relative uri is resolved under it, no file outside it is read.  [default: none:"
        " file scripts refused]",
    ),
    click.option(
        "--duckdb-allowed-dirs",
        envvar=_env("DUCKDB_ALLOWED_DIRS"),
        show_envvar=True,
        default=None,
        help="Comma-separated directories duckdb SQL may read and write (read_csv, COPY,"
        " ATTACH); nothing else of the machine.  [default: none]",
    ),
    click.option(
        "--http-allow-loopback",
        envvar=_env("HTTP_ALLOW_LOOPBACK"),
        show_envvar=True,
        is_flag=True,
        help="Let http commands reach loopback (127.0.0.0/8, ::1) and link-local"
        " (169.254.0.0/16, fe80::/10: cloud metadata) addresses; never the worker's own"
        " metrics port.",
    ),
    click.option(
        "--run-as",
        envvar=_env("RUN_AS"),
        show_envvar=True,
        default=None,
        help="Run python and shell commands as this user (the worker must run as root).",
    ),
    click.option(
        "--child-max-procs",
        envvar=_env("CHILD_MAX_PROCS"),
        show_envvar=True,
        type=click.IntRange(1),
        default=256,
        show_default=True,
        help="Process limit (RLIMIT_NPROC, per user) of python and shell commands.",
    ),
    click.option(
        "--child-max-file-mb",
        envvar=_env("CHILD_MAX_FILE_MB"),
        show_envvar=True,
        type=click.IntRange(1),
        default=1024,
        show_default=True,
        help="Largest file a python or shell command may write (RLIMIT_FSIZE), MiB.",
    ),
    click.option(
        "--child-cpu-seconds",
        envvar=_env("CHILD_CPU_SECONDS"),
        show_envvar=True,
        type=click.IntRange(1),
        default=3600,
        show_default=True,
        help="CPU seconds of each process of a python or shell command (RLIMIT_CPU).",
    ),
    click.option(
        "--python-memory-mb",
        envvar=_env("PYTHON_MEMORY_MB"),
        show_envvar=True,
        type=click.IntRange(16),
        default=2048,
        show_default=True,
        help="Address-space cap of a python or shell command's process (not inline).",
    ),
    click.option(
        "--server-url",
        envvar=[_env("SERVER_URL"), "NOETL_SERVER_URL"],
        show_envvar=True,
        default=None,
        help="Report to this NoETL server over HTTP (so that workflows advance) instead of writing"
        " status and event rows directly.  [default: direct mode]",
    ),
    click.option(
        "--session-dsn",
        envvar=_env("SESSION_DSN"),
        show_envvar=True,
        default=None,
        help="A direct connection to PostgreSQL for what needs a session (LISTEN, the claim"
        " session's advisory locks) when --dsn goes through a transaction-pooling proxy."
        "  [default: --dsn]",
    ),
    click.option(
        "--pool-mode",
        envvar=_env("POOL_MODE"),
        show_envvar=True,
        type=click.Choice(["direct", "session", "transaction"]),
        default="direct",
        show_default=True,
        help="How --dsn reaches PostgreSQL: directly, or through a pooling proxy such as PgBouncer"
        " pooling sessions or transactions. transaction: no server-side prepared statements, and"
        " LISTEN and the claim session's locks only over --session-dsn (without it the worker"
        " polls every --poll-interval).",
    ),
    click.option(
        "--metrics-port",
        envvar=_env("METRICS_PORT"),
        show_envvar=True,
        type=click.IntRange(0, 65535),
        default=None,
        help="Serve Prometheus /metrics, /healthz and /readyz on this port.  [default: off]",
    ),
    click.option(
        "--metrics-host",
        envvar=_env("METRICS_HOST"),
        show_envvar=True,
        default="127.0.0.1",
        show_default=True,
        help="Address the metrics server listens on (0.0.0.0: every interface).",
    ),
    click.option(
        "--otlp-endpoint",
        envvar=_env("OTLP_ENDPOINT"),
        show_envvar=True,
        default=None,
        help="Send a trace of each command over OTLP/HTTP to this collector (e.g."
        " http://collector:4318; needs the otel extra). OTEL_EXPORTER_OTLP_ENDPOINT and the"
        " other OTEL_* variables work too.  [default: off]",
    ),
    click.option(
        "--gather",
        envvar=_env("GATHER"),
        show_envvar=True,
        type=click.FloatRange(0, 0.5),
        default=0.015,
        show_default=True,
        help="Seconds a finished command's outcome waits for other running commands' outcomes,"
        " and (twice this) a free thread waits for others before claiming, so that one statement"
        " serves several commands; only while other commands run and finish that often (an idle"
        " worker never waits). 0: write and claim at once.",
    ),
    click.option(
        "--start-write-delay",
        envvar=_env("START_WRITE_DELAY"),
        show_envvar=True,
        type=click.FloatRange(0, 60),
        default=0.2,
        show_default=True,
        help="Seconds a command runs before its start (status RUNNING, command.started) is written"
        " on its own; a command that ends sooner has its start written with its outcome, in one"
        " write. 0: write every start at once.",
    ),
    click.option(
        "--skip-schema-check",
        envvar=_env("SKIP_SCHEMA_CHECK"),
        show_envvar=True,
        is_flag=True,
        help="Do not verify the schema before starting.",
    ),
)


def handle_errors(func: F) -> F:
    """Expected failures: one clear line on stderr, exit 1; tracebacks only with -v."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = bool(kwargs.get("verbose"))
        logs.configure(
            kwargs.get("log_level") or "info",
            kwargs.get("log_format") or "text",
            kwargs.get("worker_id"),
        )
        try:
            return func(*args, **kwargs)
        except PgWorkerError as exc:
            if verbose:  # the driver's own message may quote a DSN whole
                click.echo(redact_secrets(traceback.format_exc()).rstrip(), err=True)
            click.echo(f"noetl-pgworker: error: {redact_secrets(exc.message)}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="noetl-pgworker")
def main() -> None:
    """Run NoETL commands straight from PostgreSQL.

    Claims rows of noetl.command with SELECT ... FOR UPDATE SKIP LOCKED, wakes on
    LISTEN/NOTIFY, runs each command's tool on a thread pool and writes the outcome back:
    row status and NoETL's lifecycle events.
    """


@main.command()
@dsn_option
@options(*_START_OPTIONS)
@log_options
@handle_errors
def start(**opts: Any) -> None:
    """Claim and run commands until stopped (SIGTERM/SIGINT: graceful; twice: now)."""
    from .worker import Worker

    settings = _start_settings(opts)
    if not opts["worker_id"]:
        logs.configure(opts["log_level"], opts["log_format"], settings.worker_id)
    harden_process()  # children cannot read this process's memory or /proc/<pid>/environ
    worker = Worker(settings, notifier=Notifier.from_env())
    deadline = StopDeadline(settings.shutdown_timeout + STOP_MARGIN, worker.keep_unwritten)
    _install_signal_handlers(worker.stop, deadline)
    summary = worker.run()
    deadline.disarm()
    if not summary.clean:
        sys.exit(1)


# start's options that go to Settings under the same name and value.
_SETTINGS_AS_IS = (
    "dsn",
    "concurrency",
    "max_pending_writes",
    "tool_kinds",
    "poll_interval",
    "drain",
    "heartbeat_interval",
    "shutdown_timeout",
    "connect_timeout",
    "network_timeout",
    "max_result_bytes",
    "lease",
    "stale_after",
    "max_attempts",
    "command_timeout",
    "python_mode",
    "python_memory_mb",
    "child_max_procs",
    "child_max_file_mb",
    "child_cpu_seconds",
    "pool_mode",
    "metrics_port",
    "metrics_host",
    "start_write_delay",
    "http_allow_loopback",
)


def _start_settings(opts: dict[str, Any]) -> Settings:
    """The Settings of ``start``'s options; a clear ConfigError when they do not validate."""
    values: dict[str, Any] = {name: opts[name] for name in _SETTINGS_AS_IS}
    for name in (
        "python_preload",
        "run_as",
        "server_url",
        "session_dsn",
        "duckdb_dir",
        "script_dir",
        "otlp_endpoint",
    ):
        values[name] = opts[name] or None
    state_directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    values["spool_dir"] = opts["spool_dir"] or state_directory or None
    values["duckdb_allowed_dirs"] = opts["duckdb_allowed_dirs"] or ()
    values["verify_schema"] = not opts["skip_schema_check"]
    values["write_gather"] = opts["gather"]
    values["claim_gather"] = 2 * opts["gather"]
    if opts["worker_id"]:
        values["worker_id"] = opts["worker_id"]
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc


def _install_signal_handlers(graceful: Callable[[], None], deadline: StopDeadline) -> None:
    """First SIGTERM/SIGINT: graceful stop, ended at --shutdown-timeout + STOP_MARGIN s at the
    latest (``stopguard.py``). Second: keep the unwritten outcomes, exit 130 at once."""
    received: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) == 1:
            logger.warning(
                "%s received: stopping gracefully (send it again to stop at once)",
                signal.Signals(signum).name,
                extra={"action": "stopping"},
            )
            deadline.arm()
            graceful()
        else:
            deadline.expire("second signal: stopping at once", status=130)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@main.group(name="schema")
def schema_group() -> None:
    """Print, apply or verify the database objects the worker needs."""


with_tables_option = click.option(
    "--with-noetl-tables",
    is_flag=True,
    help="Also create NoETL's tables (for a database without a NoETL server).",
)


with_role_option = click.option(
    "--with-role",
    is_flag=True,
    help="Also create the group role noetl_pgworker with exactly the grants a worker needs"
    " (then: GRANT noetl_pgworker TO <worker login>).",
)


@schema_group.command(name="sql")
@with_tables_option
@with_role_option
def schema_sql(with_noetl_tables: bool, with_role: bool) -> None:
    """Print the DDL that `schema apply` runs."""
    click.echo(schema.schema_sql(with_noetl_tables=with_noetl_tables, with_role=with_role))


@schema_group.command(name="apply")
@dsn_option
@with_tables_option
@with_role_option
@log_options
@handle_errors
def schema_apply(dsn: str, with_noetl_tables: bool, with_role: bool, **_: Any) -> None:
    """Create the worker's trigger and indexes (NoETL's tables, the role, on request).
    Idempotent."""
    with wrap_errors(dsn, "applying the schema"), connect(dsn) as conn:
        schema.apply(conn, with_noetl_tables=with_noetl_tables, with_role=with_role)
    click.echo(f"schema applied to {redact_dsn(dsn)}", err=True)


@schema_group.command(name="uninstall")
@dsn_option
@click.option(
    "--with-role",
    is_flag=True,
    help="Also drop the group role noetl_pgworker (cluster-wide; `schema apply --with-role`).",
)
@log_options
@handle_errors
def schema_uninstall(dsn: str, with_role: bool, **_: Any) -> None:
    """Remove the worker's own objects (trigger, functions, indexes, the paused-kind and
    cancel tables); NoETL's tables and rows stay. Stop the workers first."""
    with wrap_errors(dsn, "uninstalling the schema"), connect(dsn) as conn:
        schema.uninstall(conn, with_role=with_role)
    role = " and the role noetl_pgworker" if with_role else ""
    click.echo(f"noetl-pgworker's objects{role} removed from {redact_dsn(dsn)}")


@schema_group.command(name="verify")
@dsn_option
@log_options
@handle_errors
def schema_verify(dsn: str, **_: Any) -> None:
    """Exit 0 if the database has everything the worker needs; else name what is missing."""
    with wrap_errors(dsn, "verifying the schema"), connect(dsn) as conn:
        missing = schema.verify(conn)
    if missing:
        for item in missing:
            click.echo(f"missing: {item}")
        click.echo(
            f"noetl-pgworker: error: {len(missing)} object(s) missing; run"
            " `noetl-pgworker schema apply`",
            err=True,
        )
        sys.exit(1)
    click.echo("schema ok", err=True)


def _json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object")
    return parsed


_ENQUEUE_OPTIONS = (
    click.option(
        "--tool-kind", default="noop", show_default=True, help="Tool kind of the commands."
    ),
    click.option("--step", default="step", show_default=True, help="Step name of the commands."),
    click.option(
        "--config",
        "tool_config",
        callback=_json_object,
        help="Tool configuration as a JSON object (context.tool_config),"
        ' e.g. \'{"code": "result = 1"}\'.',
    ),
    click.option(
        "--input",
        "args",
        callback=_json_object,
        help="Step inputs as a JSON object (context.input).",
    ),
    click.option(
        "--count", type=click.IntRange(1), default=1, show_default=True, help="How many commands."
    ),
    click.option(
        "--executions",
        type=click.IntRange(1),
        default=1,
        show_default=True,
        help="Spread the commands over this many new executions.",
    ),
    click.option(
        "--execution-id",
        type=int,
        default=None,
        help="Add the commands to this existing execution instead.",
    ),
    click.option(
        "--catalog-path",
        default=enqueue_mod.DEFAULT_CATALOG_PATH,
        show_default=True,
        help="Playbook path in noetl.catalog (created when missing).",
    ),
)


@main.command(name="enqueue")
@dsn_option
@options(*_ENQUEUE_OPTIONS)
@log_options
@handle_errors
def enqueue_cmd(  # noqa: PLR0913 — click passes each option as an argument
    dsn: str,
    tool_kind: str,
    step: str,
    tool_config: dict[str, Any] | None,
    args: dict[str, Any] | None,
    count: int,
    executions: int,
    execution_id: int | None,
    catalog_path: str,
    **_: Any,
) -> None:
    """Write PENDING commands the way NoETL's server does, in one transaction.

    Prints the execution ids on stdout.
    """
    with wrap_errors(dsn, "enqueueing"), connect(dsn) as conn:
        result = enqueue_mod.enqueue(
            conn,
            tool_kind=tool_kind,
            step=step,
            tool_config=tool_config,
            args=args,
            count=count,
            executions=executions,
            execution_id=execution_id,
            catalog_path=catalog_path,
        )
    # One line per command, "<command id> <execution id>": what `show`, `cancel` and
    # `retry` take.
    for cid, eid in zip(result.command_ids, result.command_executions, strict=True):
        click.echo(f"{cid} {eid}")
    click.echo(
        f"enqueued {len(result.command_ids)} {tool_kind} command(s) in"
        f" {len(result.execution_ids)} execution(s)",
        err=True,
    )


_STATUS_OPTIONS = (
    click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table."),
    click.option(
        "--watch",
        "watch",
        type=click.FloatRange(0.2),
        default=None,
        is_flag=False,
        flag_value=2.0,
        help="Refresh every N seconds (2 if no value) until Ctrl-C, with commands/s per worker.",
    ),
    click.option(
        "--lease",
        type=click.FloatRange(0.1),
        default=120.0,
        show_default=True,
        help="Claims older than this are reported as stuck.",
    ),
    click.option(
        "--exact",
        is_flag=True,
        help="Count finished commands (history) exactly: reads every row of noetl.command."
        "  [default: live commands exact, history estimated from statistics]",
    ),
    click.option(
        "--failed-hours",
        type=click.FloatRange(0.01, 24 * 366),
        default=24.0,
        show_default=True,
        help="FAILED and CANCELLED commands that ended in the last N hours are counted"
        " exactly (from their own index, whatever the history's size).",
    ),
)


@main.command(name="status")
@dsn_option
@options(*_STATUS_OPTIONS)
@log_options
@handle_errors
def status_cmd(
    dsn: str,
    as_json: bool,
    watch: float | None,
    lease: float,
    exact: bool,
    failed_hours: float,
    **_: Any,
) -> None:
    """Commands by status and tool kind, oldest pending age, commands stuck past the lease,
    failures of the last hours, paused kinds, workers with their in-flight counts and
    heartbeat ages. Live commands and recent failures are counted exactly; the rest of
    history is estimated (marked ~) unless --exact."""
    read = functools.partial(
        status_mod.read_status, lease=lease, exact=exact, recent_hours=failed_hours
    )
    if watch is None:
        with wrap_errors(dsn, "reading status"), connect(dsn) as conn:
            st = read(conn)
        if as_json:
            click.echo(json.dumps(st.as_dict(), indent=2, sort_keys=True))
        else:
            click.echo(status_mod.format_status(st))
        return
    rates = status_mod.RateTracker()
    # Ctrl-C (or SIGTERM) ends the watch after the reading in progress, never inside it: an
    # interrupt inside the driver's wait cancels the query and waits again, which once outlasted
    # its caller's patience.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with wrap_errors(dsn, "reading status"), connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                st = read(conn)
                per_worker = rates.update(time.monotonic(), st)
                if as_json:
                    click.echo(
                        json.dumps({**st.as_dict(), "commands_per_s": per_worker}, sort_keys=True)
                    )
                else:
                    click.clear()
                    click.echo(time.strftime("%Y-%m-%d %H:%M:%S") + f"  (every {watch:g} s)\n")
                    click.echo(status_mod.format_status(st, per_worker))
                stop.wait(watch)
    except KeyboardInterrupt:  # (before the handlers were in place)
        return


@main.command(name="tools")
def tools_cmd() -> None:
    """List the tool kinds this worker can run."""
    for kind in default_registry().kinds():
        click.echo(kind)


# Job control: show, retry, cancel, pause, resume (cli_control.py).
register_control(main, dsn_option, log_options, handle_errors)
