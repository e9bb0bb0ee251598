"""One process per worker id, and the worker id back after a partition.

The claim session holds a session-level advisory lock on the worker id. A session the worker
lost to a silent partition lives on in the server until the server notices (its keepalives;
``netguard.py`` makes that seconds, not hours), and keeps the lock meanwhile. So every process
has an **incarnation token** (random, per :class:`~noetl_pgworker.Worker`), carried in the
``application_name`` of each of its connections (``noetl-pgworker-claim@<token>:<worker id>``),
and when the lock is held:

- by a session of **this** incarnation: that session is one this process has given up (a
  process holds the lock on one connection only, and reconnects only once that one is
  broken): it is terminated and the lock taken;
- by **another** incarnation, at start: the holder is taken over only when it is dead by the
  same rule other workers apply to reclaim its commands: the worker id's heartbeat in
  ``noetl.runtime`` is older than ``--stale-after``, or says ``offline``. A heartbeat that
  advances while we wait means a live process: the start is refused (two processes never
  share an id), and so is one while the id has no runtime row at all. Waiting is bounded by
  ``--stale-after`` (plus a second or two).
- by another incarnation, while running: this process was taken for dead and its id taken
  over; it refuses (and stops) rather than take the id back.

Terminating sessions of one's own role needs nothing beyond membership in that role; sessions
of another role need ``pg_signal_backend``.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import psycopg

from .errors import PgWorkerError
from .queries import query

logger = logging.getLogger(__name__)

#: The first key of the two-key advisory lock on a worker id (two int4 keys never collide with
#: the one-bigint keys of command ids).
WORKER_LOCK_CLASS = 0x70677772  # "pgwr"
#: How long terminated sessions get to end (their locks go when they have).
GONE_TIMEOUT = 5.0


class WorkerIdInUse(PgWorkerError):
    """Another process is running with this worker id."""


def new_token() -> str:
    """A fresh incarnation token (8 hex digits)."""
    return secrets.token_hex(4)


def application_name(role: str, worker_id: str, token: str) -> str:
    """``noetl-pgworker-<role>@<token>:<worker id>``, at most 63 bytes (the token is never
    cut: a long worker id is)."""
    prefix = f"noetl-pgworker{'-' + role if role else ''}@{token}:"
    room = 63 - len(prefix.encode())
    return prefix + worker_id.encode()[:room].decode(errors="ignore")


def marker(token: str) -> str:
    return f"@{token}:"


def token_of(name: str | None) -> str | None:
    """The incarnation token an application_name carries, if any."""
    if not name or "@" not in name:
        return None
    tail = name.split("@", 1)[1]
    token = tail.split(":", 1)[0]
    return token if len(token) == 8 and ":" in tail else None


def take_worker_id(
    conn: psycopg.Connection[Any],
    worker_id: str,
    token: str,
    *,
    stale_after: float,
    running: bool,
) -> None:
    """Take the worker id's lock on ``conn`` (autocommit), freeing it from this incarnation's
    own abandoned session, or from a dead earlier incarnation at start; raise
    :class:`WorkerIdInUse` when a live process holds it."""
    deadline = time.monotonic() + stale_after + 2.0
    seen_beat: Any = None
    own_tries = 0
    while True:
        locked, holder, holder_pid = _try_lock(conn, worker_id)
        if locked:
            return
        holder_token = token_of(holder)
        if holder_pid is not None and holder_token == token and own_tries < 3:
            own_tries += 1
            logger.warning(
                "the worker id's lock is held by this process's own abandoned session"
                " (server pid %s); ending it",
                holder_pid,
                extra={"action": "own_session_ended"},
            )
            _end_sessions(conn, token, holder_pid)
            continue
        if running:
            raise WorkerIdInUse(
                f"worker id {worker_id!r} was taken over by another process"
                + (f" ({holder})" if holder else "")
                + " while this one could not reach the database; stopping"
            )
        if holder_pid is None:
            raise _in_use(worker_id, holder, "")
        dead, seen_beat, why = _holder_dead(conn, worker_id, stale_after, seen_beat)
        if dead or time.monotonic() > deadline:
            if not dead:
                raise _in_use(worker_id, holder, "")
            logger.warning(
                "taking over worker id %r from an earlier process (%s; %s): ending its sessions",
                worker_id,
                holder,
                why,
                extra={"action": "worker_id_taken_over"},
            )
            _end_sessions(conn, holder_token, holder_pid)
            deadline = time.monotonic() + GONE_TIMEOUT + 1.0
            continue
        if why == "alive":
            raise _in_use(worker_id, holder, " (its heartbeat advances)")
        time.sleep(0.5)


def _try_lock(conn: psycopg.Connection[Any], worker_id: str) -> tuple[bool, str | None, Any]:
    row = conn.execute(
        query("lock_worker_id"), {"cls": WORKER_LOCK_CLASS, "worker_id": worker_id}
    ).fetchone()
    if not row:
        return False, None, None
    return bool(row[0]), row[1], row[2]


def _holder_dead(
    conn: psycopg.Connection[Any], worker_id: str, stale_after: float, seen_beat: Any
) -> tuple[bool, Any, str]:
    """(dead?, the heartbeat seen, why): dead when the id's heartbeat is older than
    ``stale_after`` or offline; "alive" when it advanced since ``seen_beat``."""
    row = conn.execute(query("worker_id_heartbeat"), {"worker_id": worker_id}).fetchone()
    if row is None:  # a holder that never beat: starting, or not a worker; not ours to end
        return False, seen_beat, "alive"
    status, age, beat = row
    if status == "offline":
        return True, beat, "offline"
    if age is not None and age > stale_after:
        return True, beat, f"last heartbeat {age:.0f} s ago"
    if seen_beat is not None and beat != seen_beat:
        return False, beat, "alive"
    return False, beat, f"last heartbeat {age:.1f} s ago"


def _end_sessions(conn: psycopg.Connection[Any], token: str | None, pid: int) -> None:
    """Terminate an incarnation's sessions (and ``pid``); wait (bounded) until they are gone."""
    params = {"marker": marker(token) if token else None, "pid": pid}
    try:
        conn.execute(query("terminate_incarnation"), params)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise WorkerIdInUse(
            f"cannot end the earlier sessions holding this worker id ({exc}); the worker's role"
            " must be a member of theirs, or have pg_signal_backend"
        ) from exc
    end = time.monotonic() + GONE_TIMEOUT
    while time.monotonic() < end:
        row = conn.execute(query("incarnation_sessions"), params).fetchone()
        if not row or not row[0]:
            return
        time.sleep(0.05)


def _in_use(worker_id: str, holder: str | None, more: str) -> WorkerIdInUse:
    return WorkerIdInUse(
        f"another process is already running as worker id {worker_id!r}"
        + (f" ({holder})" if holder else "")
        + more
        + "; give each process its own --worker-id"
    )
