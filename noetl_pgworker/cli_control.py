"""The job-control commands of the CLI (``show``, ``retry``, ``cancel``, ``pause``,
``resume``): thin wrappers of :mod:`noetl_pgworker.control`. Each prints one result line on
stdout and exits 0 when it did what was asked; otherwise one line on stderr and exit 1.

Registered on the CLI's group by :func:`register`, with the CLI's own option decorators (this
module does not import the CLI).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from . import control
from .db import connect, wrap_errors

Decorator = Callable[[Any], Any]


def _done(result: control.Result, as_json: bool = False) -> None:
    if as_json:
        click.echo(json.dumps({"ok": result.ok, "message": result.message, **result.data}))
    elif result.ok:
        click.echo(result.message)
    if not result.ok:
        if not as_json:
            click.echo(f"noetl-pgworker: {result.message}", err=True)
        sys.exit(1)


def _show(dsn: str, ident: int, as_json: bool, **_: Any) -> None:
    """A command (its row, attempts and events) or, by an execution's id, the execution (its
    commands and its own events)."""
    with wrap_errors(dsn, "reading the command"), connect(dsn, autocommit=True) as conn:
        found = control.show(conn, ident)
    if found is None:
        click.echo(f"noetl-pgworker: no command or execution {ident}", err=True)
        sys.exit(1)
    click.echo(json.dumps(found, indent=2) if as_json else control.format_show(found))


def _retry(dsn: str, command_id: int, as_json: bool, **_: Any) -> None:
    """FAILED -> PENDING: the command runs again (attempt + 1, earlier attempts' events kept),
    at once: a worker is woken. Refused for a command that is not FAILED, or whose execution
    has ended."""
    with wrap_errors(dsn, "retrying"), connect(dsn, autocommit=True) as conn:
        _done(control.retry(conn, command_id), as_json)


def _cancel(
    dsn: str,
    command_id: int | None,
    execution: int | None,
    wait: float,
    server_url: str | None,
    as_json: bool,
    **_: Any,
) -> None:
    """Cancel a command (PENDING: at once; CLAIMED or RUNNING: the worker holding it stops it
    and writes it CANCELLED, waited for up to --wait seconds), or every command of an
    execution (--execution; with --server-url first through NoETL's API)."""
    if (command_id is None) == (execution is None):
        raise click.UsageError("give a COMMAND_ID or --execution ID (one of them)")
    with wrap_errors(dsn, "cancelling"), connect(dsn, autocommit=True) as conn:
        if execution is not None:
            result = control.cancel_execution(conn, execution, wait=wait, server_url=server_url)
        else:
            assert command_id is not None
            result = control.cancel(conn, command_id, wait=wait)
    _done(result, as_json)


def _pause(dsn: str, tool_kind: str, as_json: bool, **_: Any) -> None:
    """Stop every worker from claiming TOOL_KIND (running commands finish) until `resume`."""
    with wrap_errors(dsn, "pausing"), connect(dsn, autocommit=True) as conn:
        _done(control.pause(conn, tool_kind), as_json)


def _resume(dsn: str, tool_kind: str, as_json: bool, **_: Any) -> None:
    """Let workers claim TOOL_KIND again (they are woken at once)."""
    with wrap_errors(dsn, "resuming"), connect(dsn, autocommit=True) as conn:
        _done(control.resume(conn, tool_kind), as_json)


JSON = click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
KIND = click.argument("tool_kind")
OPTIONAL_ID = click.argument("command_id", type=int, required=False)
WAIT = click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the worker holding a running command to stop it.",
)
EXECUTION = click.option(
    "--execution", type=int, default=None, help="Cancel every command of this execution."
)
SERVER_URL = click.option(
    "--server-url",
    envvar=["NOETL_PGWORKER_SERVER_URL", "NOETL_SERVER_URL"],
    show_envvar=True,
    default=None,
    help="With --execution: cancel the execution through this NoETL server's API first.",
)


def register(
    group: click.Group, dsn_option: Decorator, log_options: Decorator, handle_errors: Decorator
) -> None:
    """Add the job-control commands to ``group``."""
    table: list[tuple[str, Callable[..., None], list[Decorator]]] = [
        ("show", _show, [click.argument("ident", type=int), JSON]),
        ("retry", _retry, [click.argument("command_id", type=int), JSON]),
        ("cancel", _cancel, [OPTIONAL_ID, EXECUTION, WAIT, SERVER_URL, JSON]),
        ("pause", _pause, [KIND, JSON]),
        ("resume", _resume, [KIND, JSON]),
    ]
    for name, func, options in table:
        command: Any = handle_errors(func)
        for decorator in reversed([dsn_option, *options, log_options]):
            command = decorator(command)
        group.command(name=name, help=func.__doc__)(command)
