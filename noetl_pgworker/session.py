"""The claim session: one connection of the claim path's own that holds session-level locks.

NoETL's server claims a command over HTTP by reading its status, *then* taking
``pg_try_advisory_xact_lock(command_id)`` and updating the row without a status guard. A lock
that ends with our claim transaction leaves a window: a server claim that read ``PENDING`` just
before our commit takes the lock just after it, and the command runs twice. So every command
this worker claims stays locked at session level, on this connection, until its outcome is
written; the server's claim answers 409 meanwhile. If the connection dies, PostgreSQL frees the
locks (the rows are ``CLAIMED`` by then, which the server's claim respects), and they are taken
again on the new connection.

The same session holds a lock on the worker id, so that a second process started with the same
``--worker-id`` refuses to run instead of taking back the first one's claims.

Through a transaction-pooling proxy (PgBouncer ``pool_mode = transaction``) without a session
DSN there is no session to hold a lock in: a session lock would stay on whichever server
connection ran the claim, held for no one. Such a claim session (``session_locks=False``) takes
transaction-level locks only, and nothing of its work depends on state between transactions.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.rows import dict_row

from .config import Settings
from .connections import log_pool_mode
from .db import PoolMode, apply_session_settings, connect_kwargs, worker_session_kwargs, wrap_errors
from .incarnation import (
    WORKER_LOCK_CLASS,
    WorkerIdInUse,
    application_name,
    new_token,
    take_worker_id,
)
from .netguard import DEFAULT_NETWORK_TIMEOUT
from .queries import query

__all__ = ["WORKER_LOCK_CLASS", "ClaimSession", "SessionGuard", "WorkerIdInUse", "open_session"]

logger = logging.getLogger(__name__)


def _usable(conn: psycopg.Connection[Any] | None) -> bool:
    """Open, not broken, and idle: a statement cut off midway (a silent network that timed
    out while a result was awaited) can leave a connection neither broken nor usable ("another
    command is already in progress"); it is replaced."""
    if conn is None or conn.closed or conn.broken:
        return False
    return conn.info.transaction_status == pq.TransactionStatus.IDLE


@dataclass(frozen=True, slots=True)
class SessionGuard:
    """How the claim session keeps its worker id and notices a dead network."""

    #: This process's incarnation token (``incarnation.py``); None: a fresh one.
    incarnation: str | None = None
    #: An earlier process holding the worker id is dead once its heartbeat is this old.
    stale_after: float = 30.0
    #: ``--network-timeout`` (``netguard.py``).
    network_timeout: float = DEFAULT_NETWORK_TIMEOUT


class ClaimSession:
    """A connection for claims, holding a session advisory lock per claimed command."""

    def __init__(
        self,
        dsn: str,
        *,
        worker_id: str | None = None,
        application_name: str = "noetl-pgworker-claim",
        connect_timeout: float = 10.0,
        held: Callable[[], Iterable[int]] = tuple,
        connect_options: dict[str, Any] | None = None,
        pool_mode: PoolMode = "direct",
        guard: SessionGuard | None = None,
    ) -> None:
        guard = guard or SessionGuard()
        self._dsn = dsn
        #: This process's token (``incarnation.py``): a lock held by a session carrying it is
        #: one this session abandoned; an earlier process's is taken over only once dead.
        self._incarnation = guard.incarnation or new_token()
        self._stale_after = guard.stale_after
        self._opened = False
        self.id_taken = False
        #: Session-level locks (per claimed command, and on the worker id) are taken only on a
        #: real session: not through transaction pooling.
        self.session_locks = pool_mode != "transaction"
        self._pool_mode: PoolMode = pool_mode
        self._worker_id = worker_id if self.session_locks else None
        self._kwargs = {
            **connect_kwargs(
                application_name,
                connect_timeout,
                pool_mode,
                dsn=dsn,
                network_timeout=guard.network_timeout,
            ),
            **(connect_options or {}),
        }
        self._held = held
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()  # the connection is used from the claim loop only,
        self._done: set[int] = set()  # but ``done`` is called from the writer thread
        self._done_lock = threading.Lock()
        self.reconnects = 0

    # -- the connection ----------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if _usable(conn):
            assert conn is not None
            return conn
        if conn is not None:
            self.reconnects += 1
            with contextlib.suppress(Exception):
                conn.close()
        self._conn = None
        conn = psycopg.connect(self._dsn, autocommit=True, **self._kwargs)
        try:
            apply_session_settings(conn, self._pool_mode)
            if self._worker_id is not None:
                self._lock_worker_id(conn, self._worker_id)
            if self.reconnects and self.session_locks:
                # The old connection's locks died with it: take them again for what is held.
                ids = sorted(set(self._held()))
                if ids:
                    conn.execute(query("session_relock"), {"ids": ids})
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _lock_worker_id(self, conn: psycopg.Connection[Any], worker_id: str) -> None:
        try:
            take_worker_id(
                conn,
                worker_id,
                self._incarnation,
                stale_after=self._stale_after,
                running=self._opened,
            )
        except WorkerIdInUse:
            #: Another process took this worker id over while this one ran (it was taken for
            #: dead): the id's runtime row is that process's now.
            self.id_taken = self._opened
            raise

    def open(self) -> None:
        """Connect now (and take the worker id's lock); raises if either fails."""
        with self._lock:
            self._connection()
            self._opened = True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A transaction on the session; pending unlocks go first.

        If the transaction fails, locks it took for rows it did not claim are given back.
        """
        with self._lock:
            conn = self._connection()
            self._flush_unlocks(conn)
            try:
                with conn.transaction():
                    yield conn
            except BaseException:
                self._after_failure(conn)
                raise

    def fetch(self, statement: sql.SQL, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run one statement, atomic on its own (no BEGIN/COMMIT round trips), and return its
        rows as dicts. Pending unlocks go in the same round trip: both are sent in a pipeline
        with one Sync, and nothing is read before the pipeline ends (reading inside it would
        cost a second round trip).

        If the statement fails, locks it took for rows it did not claim are given back."""
        with self._lock:
            conn = self._connection()
            with self._done_lock:
                ids, self._done = sorted(self._done), set()
            try:
                with conn.cursor(row_factory=dict_row) as cur:
                    if ids:
                        with conn.pipeline():
                            conn.execute(query("session_unlock"), {"ids": ids})
                            cur.execute(statement, params)
                    else:  # (a pipeline costs an idle worker's claim a little latency)
                        cur.execute(statement, params)
                    return cur.fetchall()
            except BaseException:
                with self._done_lock:  # unlocking twice only warns; never unlocking leaks
                    self._done.update(ids)
                self._after_failure(conn)
                raise

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """The session's connection, for a statement that takes no lock (tests, checks)."""
        with self._lock:
            yield self._connection()

    def _after_failure(self, conn: psycopg.Connection[Any]) -> None:
        """After a failed claim: give back the locks taken for rows it did not claim."""
        if self.session_locks and not conn.closed and not conn.broken:
            with contextlib.suppress(psycopg.Error):
                self._reconcile(conn)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    # -- the locks ------------------------------------------------------------------------------

    def done(self, command_ids: Iterable[int]) -> None:
        """These commands' outcomes are written (or given up): unlock them soon."""
        if not self.session_locks:
            return
        with self._done_lock:
            self._done.update(command_ids)

    def unlock_pending(self) -> None:
        """Give back the locks of finished commands now (the claim loop calls it when idle)."""
        with self._done_lock:
            if not self._done:
                return
        with self._lock:
            conn = self._conn
            if not _usable(conn):
                return  # the next claim connects again (and takes the locks back)
            assert conn is not None
            with contextlib.suppress(psycopg.Error):
                self._flush_unlocks(conn)

    def _flush_unlocks(self, conn: psycopg.Connection[Any]) -> None:
        with self._done_lock:
            ids, self._done = sorted(self._done), set()
        if not ids:
            return
        try:
            conn.execute(query("session_unlock"), {"ids": ids})
        except BaseException:
            with self._done_lock:
                self._done.update(ids)
            raise

    def _reconcile(self, conn: psycopg.Connection[Any]) -> None:
        """Unlock what this session holds but no longer claims (after a failed claim)."""
        held = set(self._held())
        rows = conn.execute(query("session_held_locks")).fetchall()
        stray = sorted(int(r[0]) for r in rows if int(r[0]) not in held)
        if stray:
            conn.execute(query("session_unlock"), {"ids": stray})

    def held_locks(self) -> set[int]:
        """The command ids this session holds a lock on (for tests and diagnostics)."""
        if not self.session_locks:
            return set()
        with self._lock:
            conn = self._connection()
            return {int(r[0]) for r in conn.execute(query("session_held_locks")).fetchall()}


def session_mode(settings: Settings) -> PoolMode:
    """How the sessions (claim session, listener) reach PostgreSQL: a session DSN is a
    session (direct, or a session-pooling proxy); else they go where --dsn goes, and through
    transaction pooling the claim session holds no session lock."""
    if settings.session_dsn and settings.pool_mode == "transaction":
        return "session"
    return settings.pool_mode


def open_session(
    settings: Settings,
    held: Callable[[], Iterable[int]],
    closing: contextlib.ExitStack,
    *,
    listens: bool,
    incarnation: str | None = None,
) -> ClaimSession:
    """The claim session, connected (closed by ``closing``); it refuses to open while another
    process runs with this worker id."""
    s = settings
    token = incarnation or new_token()
    session_dsn = s.session_dsn or s.dsn
    mode = session_mode(s)
    session = ClaimSession(
        session_dsn,
        worker_id=s.worker_id,
        application_name=application_name("claim", s.worker_id, token),
        connect_timeout=s.connect_timeout,
        held=held,
        pool_mode=mode,
        connect_options=worker_session_kwargs(session_dsn, mode, s.network_timeout),
        guard=SessionGuard(token, s.stale_after, s.network_timeout),
    )
    log_pool_mode(s, listens=listens, session_locks=session.session_locks)
    with wrap_errors(session_dsn, "opening the claim session"):
        session.open()
    closing.callback(session.close)
    return session
