"""Job control: look at a command or an execution, retry a failed command, cancel one (or an
execution), pause and resume a tool kind for every worker at once.

Each action is one short transaction, safe beside running workers and NoETL's server: rows
are locked as a claim locks them, terminal rows change only by ``retry`` (FAILED, and only
while its execution has not ended), and a worker learns of a cancellation or a resume by the
doorbell's NOTIFY (``cancel`` or an empty payload), with its poll as the fallback.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from .errors import PgWorkerError
from .queries import query

#: Commands of an execution `show` lists, at most.
SHOW_LIMIT = 1000
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


class ControlError(PgWorkerError):
    """A job-control action could not be done."""


@dataclass(frozen=True, slots=True)
class Result:
    """What an action did: ``ok`` decides the exit code, ``message`` is the result line."""

    ok: bool
    message: str
    data: dict[str, Any] = field(default_factory=dict)


def operator() -> str:
    """Who is acting, for the trail: ``user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if hasattr(value, "isoformat"):
            out[key] = value.isoformat()
        elif isinstance(value, int) and key.endswith("_id"):
            out[key] = str(value)
        else:
            out[key] = value
    return out


# -- show ----------------------------------------------------------------------------------------


def show(conn: psycopg.Connection[Any], ident: int) -> dict[str, Any] | None:
    """A command (its row and its events) or, when no command has this id, an execution (its
    commands and its own events). None: neither exists."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query("control_command"), {"command_id": ident})
        row = cur.fetchone()
        if row is not None:
            cur.execute(
                query("control_command_events"),
                {"execution_id": row["execution_id"], "command_id": ident},
            )
            events = [_jsonable(e) for e in cur.fetchall()]
            return {"command": _jsonable(row), "events": events}
        cur.execute(
            query("control_execution_commands"), {"execution_id": ident, "limit": SHOW_LIMIT}
        )
        commands = [_jsonable(c) for c in cur.fetchall()]
        cur.execute(query("control_execution_events"), {"execution_id": ident, "limit": 200})
        events = [_jsonable(e) for e in cur.fetchall()]
    if not commands and not events:
        return None
    return {"execution_id": str(ident), "commands": commands, "events": events}


def format_show(found: dict[str, Any]) -> str:
    """``show``'s text: the row, then one line per event (or per command of an execution)."""
    lines: list[str] = []
    if "command" in found:
        c = found["command"]
        lines.append(
            f"command {c['command_id']}  execution {c['execution_id']}  step {c['step_name']}"
            f"  kind {c['tool_kind']}  {c['status']}  attempt {c['attempt']}"
            f"  worker {c['worker_id'] or '-'}"
        )
        for key in ("created_at", "claimed_at", "started_at", "completed_at"):
            lines.append(f"  {key:<13} {c[key] or '-'}")
        if c["error"]:
            lines.append(f"  error         {c['error']}")
    else:
        lines.append(f"execution {found['execution_id']}: {len(found['commands'])} command(s)")
        for c in found["commands"]:
            lines.append(
                f"  {c['command_id']}  {c['step_name']:<20} {c['tool_kind'] or '-':<14}"
                f" {c['status']:<10} attempt {c['attempt']}  {c['worker_id'] or '-'}"
            )
    lines.append("events:" if found["events"] else "events: none")
    for e in found["events"]:
        attempt = f"  attempt {e['attempt']}" if e.get("attempt") else ""
        error = f"  {e['error']}" if e.get("error") else ""
        lines.append(
            f"  {e['created_at']}  {e['event_type']:<18} {e['status'] or '-':<10}"
            f" {e['worker_id'] or '-'}{attempt}{error}"
        )
    return "\n".join(lines)


# -- retry ---------------------------------------------------------------------------------------


def retry(conn: psycopg.Connection[Any], command_id: int) -> Result:
    """FAILED -> PENDING with the attempt counted up; a worker is woken at once."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(query("control_retry"), {"command_id": command_id})
        row = cur.fetchone()
    if row is None:
        return Result(False, f"no command {command_id}")
    status, ended_by, attempt, _notified = row
    if attempt is not None:
        return Result(
            True, f"retried {command_id}: PENDING, attempt {attempt}", {"attempt": attempt}
        )
    if status != "FAILED":
        return Result(False, f"{command_id} is {status}, not FAILED: nothing to retry")
    return Result(
        False,
        f"{command_id} not retried: its execution has ended ({ended_by}); start the"
        " execution again instead",
    )


# -- cancel --------------------------------------------------------------------------------------


def _wait_terminal(
    conn: psycopg.Connection[Any], command_id: int, wait: float
) -> tuple[str | None, float]:
    """Poll the command's status until it is terminal or ``wait`` passed: (status, seconds)."""
    t0 = time.monotonic()
    status: str | None = None
    while True:
        row = conn.execute(query("control_status_of"), {"command_id": command_id}).fetchone()
        status = None if row is None else row[0]
        if status in TERMINAL or time.monotonic() - t0 >= wait:
            return status, time.monotonic() - t0
        time.sleep(0.05)


def cancel(
    conn: psycopg.Connection[Any],
    command_id: int,
    *,
    wait: float = 10.0,
    by: str = "",
    stopped_is_done: bool = False,
) -> Result:
    """PENDING -> CANCELLED; CLAIMED/RUNNING -> the worker that holds it stops it and writes
    CANCELLED (waited for up to ``wait`` seconds). ``stopped_is_done``: any end counts (in
    server mode NoETL's server writes the row: the stopped command's report is a failure)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(query("control_cancel"), {"command_id": command_id, "by": by or operator()})
        row = cur.fetchone()
    if row is None:
        return Result(False, f"no command {command_id}")
    status, worker, _execution, cancelled, requested = row
    if cancelled:
        return Result(True, f"cancelled {command_id} (was PENDING)", {"was": status})
    if not requested:
        return Result(False, f"{command_id} is already {status}: nothing to cancel")
    final, seconds = _wait_terminal(conn, command_id, wait)
    data = {"was": status, "worker_id": worker, "status": final, "seconds": round(seconds, 3)}
    if final == "CANCELLED" or (stopped_is_done and final in TERMINAL):
        return Result(
            True,
            f"cancelled {command_id} (was {status} on {worker}, {final} after {seconds:.1f} s)",
            data,
        )
    if final in TERMINAL:
        return Result(False, f"{command_id} ended {final} before it could be cancelled", data)
    return Result(
        False,
        f"cancel of {command_id} requested; {worker} has not stopped it within {wait:g} s"
        " (it will when it next looks, or the command is taken back from a dead worker)",
        data,
    )


def cancel_execution(
    conn: psycopg.Connection[Any],
    execution_id: int,
    *,
    wait: float = 10.0,
    by: str = "",
    server_url: str | None = None,
) -> Result:
    """Cancel every command of an execution that has not ended; with ``server_url`` first
    through NoETL's API (``POST /api/executions/{id}/cancel``), so that NoETL's engine ends
    the execution and issues nothing more."""
    server_note = ""
    if server_url:
        server_note = _cancel_on_server(server_url, execution_id, by or operator()) + "; "
    ids = [
        r[0] for r in conn.execute(query("control_live_commands"), {"execution_id": execution_id})
    ]
    results = [cancel(conn, cid, wait=wait, by=by, stopped_is_done=bool(server_url)) for cid in ids]
    done = sum(r.ok for r in results)
    message = f"{server_note}execution {execution_id}: {done} of {len(ids)} command(s) cancelled"
    failures = [r.message for r in results if not r.ok]
    if failures:
        message += "; " + "; ".join(failures)
    return Result(not failures, message, {"commands": [r.data for r in results]})


def _cancel_on_server(server_url: str, execution_id: int, by: str) -> str:
    url = f"{server_url.rstrip('/')}/api/executions/{execution_id}/cancel"
    try:
        r = httpx.post(url, json={"reason": f"cancelled by {by}"}, timeout=30)
    except httpx.HTTPError as exc:
        raise ControlError(f"NoETL server at {server_url}: {type(exc).__name__}: {exc}") from exc
    if r.status_code >= 300:
        raise ControlError(
            f"NoETL server refused the cancel of {execution_id}: HTTP {r.status_code}"
            f" {r.text[:300]}"
        )
    try:
        answer = r.json()
    except json.JSONDecodeError:
        answer = {}
    status = answer.get("status", "?") if isinstance(answer, dict) else "?"
    return f"NoETL server: execution {execution_id} {status}"


# -- pause / resume ------------------------------------------------------------------------------


def pause(conn: psycopg.Connection[Any], tool_kind: str, *, by: str = "") -> Result:
    """No worker claims ``tool_kind`` until it is resumed; running commands finish."""
    with conn.transaction():
        row = conn.execute(
            query("control_pause"), {"tool_kind": tool_kind, "by": by or operator()}
        ).fetchone()
    if row is None:
        return Result(True, f"{tool_kind} was already paused", {"changed": False})
    return Result(
        True,
        f"paused {tool_kind} for every worker (running commands finish; PENDING ones wait)",
        {"changed": True},
    )


def resume(conn: psycopg.Connection[Any], tool_kind: str) -> Result:
    with conn.transaction():
        row = conn.execute(query("control_resume"), {"tool_kind": tool_kind}).fetchone()
    if row is None:
        return Result(True, f"{tool_kind} was not paused", {"changed": False})
    return Result(True, f"resumed {tool_kind}: workers claim it again", {"changed": True})


def paused_kinds(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query("control_paused_kinds"))
        return [_jsonable(r) for r in cur.fetchall()]
