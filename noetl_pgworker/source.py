"""Where commands come from.

:class:`CommandSource` mirrors the ``CommandSource`` trait of NoETL's Rust worker: ``next()``
returns a command to dispatch, or ``None`` when the source is exhausted (drain and exit). A
long-running source never returns ``None`` while it runs; it returns ``None`` only once it was
asked to stop (or, in drain mode, when nothing is left for it).

The protocol lists everything the worker calls; the worker gives a source its
:class:`SourceHooks` (its stop event, free slots, …). :class:`PgCommandSource` claims from
PostgreSQL; ``memory.InMemorySource`` (in ``noetl_pgworker.testing``) from a list.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from .db import RETRYABLE_ERRORS, first_line, pooler_hint
from .errors import MalformedCommand
from .jsontext import dumps
from .metrics import NullMetrics
from .models import Command, CommandRef
from .queries import query
from .session import ClaimSession

logger = logging.getLogger(__name__)

#: Every database error pauses claiming, none ends it (see ``PgCommandSource.next``).
_CLAIM_PAUSING: tuple[type[BaseException], ...] = (*RETRYABLE_ERRORS, psycopg.Error)


MalformedHandler = Callable[[CommandRef, str], None]


@dataclass(slots=True)
class SourceCounts:
    """What a source did, for the run's summary."""

    claimed: int = 0
    #: Commands of executions that had already ended, marked CANCELLED instead of claimed.
    cancelled: int = 0
    #: Commands taken back from workers that died.
    reclaimed: int = 0
    #: Commands abandoned ``max_attempts`` times, marked FAILED.
    poisoned: int = 0


def _no_free_slots() -> int:
    return 0


def _none_ahead(seconds: float) -> int:
    return 0


def _nothing() -> None:
    return None


def _never() -> float | None:
    return None


@dataclass(frozen=True, slots=True)
class SourceHooks:
    """What the worker that runs a source gives it (``Worker(source=factory)`` calls
    ``factory(hooks)``)."""

    #: Set when the worker stops: ``next()`` returns None (after the buffer) from then on.
    stop: threading.Event = field(default_factory=threading.Event)
    #: Set by the listener (a NOTIFY) or :meth:`Worker.stop`: look for work now.
    wake: threading.Event = field(default_factory=threading.Event)
    #: Threads free besides the one reserved for the ``next()`` under way.
    free_slots: Callable[[], int] = _no_free_slots
    #: Claims worth taking beyond the free slots: commands likely to finish within the given
    #: seconds (a claim's round trip).
    ahead: Callable[[float], int] = _none_ahead
    #: Command ids this process holds (running, or their outcome not yet written).
    held: Callable[[], Iterable[int]] = tuple
    #: Called while ``next()`` waits: the claim loop shows progress (the watchdog's test).
    tick: Callable[[], None] = _nothing
    #: A claimed row that is not a command: report it failed (claimed, and claim held).
    on_malformed: MalformedHandler | None = None
    #: A command failed as poison in SQL, to be reported elsewhere (server mode).
    on_poisoned: MalformedHandler | None = None
    #: When the last NOTIFY arrived (monotonic), for the wake-up latency metric.
    woken_at: Callable[[], float | None] = _never


@runtime_checkable
class CommandSource(Protocol):
    """Where the worker's commands come from; what :class:`~noetl_pgworker.Worker` calls."""

    #: Set once the source has claimed for the first time (the worker is really working).
    first_claim: threading.Event
    counts: SourceCounts

    def next(self) -> Command | None:
        """The next command to run; ``None`` means exhausted or stopped: drain and exit."""
        ...

    def unread(self, command: Command) -> None:
        """Take back a command ``next()`` returned that the caller could not start."""
        ...

    def buffered(self) -> int:
        """Commands claimed but not handed out yet."""
        ...

    def release_unstarted(self, timeout: float = 10.0) -> int:
        """Put the commands claimed but not handed out back to PENDING; how many."""
        ...

    def done(self, command_ids: Iterable[int]) -> None:
        """These commands' outcomes are written (or given up): their claims may go."""
        ...

    def close(self) -> None:
        """Let go of everything the source holds (idempotent)."""
        ...


SourceFactory = Callable[[SourceHooks], CommandSource]


@dataclass(frozen=True, slots=True)
class ClaimOptions:
    """How a :class:`PgCommandSource` claims (the worker's settings of the same names)."""

    #: Seconds between claims when no NOTIFY arrives.
    poll_interval: float = 2.0
    #: ``next()`` returns None once nothing is left to claim.
    drain: bool = False
    #: Seconds after which a dead worker's claim may be taken back.
    lease: float = 120.0
    #: A worker whose heartbeat is older than this many seconds is dead.
    stale_after: float = 30.0
    #: A command abandoned this many times ends FAILED (poison).
    max_attempts: int = 3
    #: Seconds between recoveries of dead workers' claims.  [default: min(lease, stale_after)/4]
    reclaim_every: float | None = None


def _queue_wait(row: dict[str, Any]) -> float:
    """Seconds from the command's creation to this claim (both the database's clock)."""
    created, claimed = row.get("created_at"), row.get("claimed_at")
    if created is None or claimed is None:
        return 0.0
    return max(0.0, float((claimed - created).total_seconds()))


class PgCommandSource:
    """Claims commands from ``noetl.command`` in batches as large as the free thread slots.

    ``hooks.free_slots`` tells how many threads are free *besides* the one the caller of
    ``next()`` already holds; a claim takes at most ``1 + free_slots()`` rows. The claimed rows
    wait in a small local buffer only until the claim loop hands them to those free threads.
    """

    def __init__(
        self,
        pool: ConnectionPool[Any],
        *,
        worker_id: str,
        tool_kinds: Iterable[str],
        hooks: SourceHooks | None = None,
        options: ClaimOptions | None = None,
        metrics: NullMetrics | None = None,
        session: ClaimSession | None = None,
    ) -> None:
        self._pool = pool
        #: Claims run here; it holds a session-level lock on each claimed command.
        self.session = session if session is not None else self._own_session(pool)
        self._worker_id = worker_id
        self._tool_kinds = sorted(set(tool_kinds))
        hooks = hooks or SourceHooks()
        self._free_slots = hooks.free_slots
        self._ahead = hooks.ahead
        #: How long a claim statement takes to answer (seconds, a moving average).
        self.round_trip = 0.0
        self._wake = hooks.wake
        self._stop = hooks.stop
        self._on_malformed = hooks.on_malformed
        #: Called for each command failed as poison (already FAILED in the database).
        self._on_poisoned = hooks.on_poisoned
        self._held = hooks.held
        self._tick = hooks.tick
        self._woken_at = hooks.woken_at
        o = self.options = options or ClaimOptions()
        # Recovery runs inside the claim transaction, but only this often: it reads claims, not
        # the PENDING index, and the hot path should not pay for it on every claim.
        self._reclaim_every = (
            o.reclaim_every
            if o.reclaim_every is not None
            else max(0.1, min(o.lease, o.stale_after) / 4)
        )
        self._next_reclaim = 0.0  # the first claim also recovers this worker's own old claims
        self._buffer: collections.deque[Command] = collections.deque()
        self._healthy = True
        self._metrics = metrics or NullMetrics()
        self._wake_pending: float | None = None
        #: Set after the first claim statement succeeded (the worker is really working).
        self.first_claim = threading.Event()
        self.counts = SourceCounts()

    def _own_session(self, pool: ConnectionPool[Any]) -> ClaimSession:
        """A session of its own (tests, tools): closed with the source."""
        me = weakref.ref(self)
        conninfo = pool.conninfo if isinstance(pool.conninfo, str) else pool.conninfo()
        kwargs = pool.kwargs if isinstance(pool.kwargs, dict) or pool.kwargs is None else {}
        session = ClaimSession(
            conninfo,
            held=lambda: me()._held_now() if me() is not None else (),  # type: ignore[union-attr]
            connect_options=dict(kwargs or {}),
        )
        weakref.finalize(self, session.close)
        return session

    def next(self) -> Command | None:
        backoff = 0.0
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._stop.is_set():
                return None
            self._tick()
            # Clear before claiming: a NOTIFY that lands during the claim wakes the next wait.
            self._wake.clear()
            try:
                free = max(0, self._free_slots())
                got_rows = self._claim(1 + free + max(0, self._ahead(self.round_trip)))
            except _CLAIM_PAUSING as exc:
                # Every database error pauses claiming, none ends it: an outage, a read-only
                # primary during a failover, a lock or statement timeout, even a refused row.
                self._metrics.db_error("claim")
                backoff = min(5.0, max(0.1, backoff * 2))
                if self._healthy:
                    self._healthy = False
                    logger.warning(
                        "claiming paused: database unavailable (%s); retrying with backoff%s",
                        first_line(exc),
                        pooler_hint(exc),
                        extra={"action": "claim_paused"},
                    )
                self._stop.wait(backoff)
                continue
            if not self._healthy:
                self._healthy = True
                logger.warning("claiming resumed", extra={"action": "claim_resumed"})
            backoff = 0.0
            if got_rows:
                continue  # claimed, or cancelled/malformed rows: look again at once
            if self.options.drain:
                return None
            self._wait_for_work()

    def _wait_for_work(self) -> None:
        """Until a NOTIFY or the poll timer; in short steps, so that the loop shows progress."""
        deadline = time.monotonic() + self.options.poll_interval
        while not self._stop.is_set():
            self._tick()
            self.session.unlock_pending()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._wake.wait(min(1.0, remaining)):
                self._wake_pending = self._woken_at()
                return

    def claim(self, limit: int) -> list[Command]:
        """Claim up to ``limit`` commands now (no waiting); malformed rows are reported."""
        self._claim(limit)
        out = list(self._buffer)
        self._buffer.clear()
        return out

    def _claim(self, limit: int) -> bool:
        """Claim into the buffer; True if any row was claimed, reclaimed or cancelled."""
        t0 = time.perf_counter()
        found: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        # Recovery and the claim in one transaction; the claim alone is one statement, atomic
        # by itself, sent with the pending unlocks in one round trip.
        recover = time.monotonic() >= self._next_reclaim
        if recover:
            with self.session.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
                found = self._reclaim_rows(cur, limit)
                limit -= sum(1 for r in found if r["command_id"] is not None)
                if limit > 0:
                    cur.execute(query("claim_commands"), self._claim_params(limit))
                    rows = cur.fetchall()
        else:
            rows = self.session.fetch(query("claim_commands"), self._claim_params(limit))
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + self._reclaim_every
        reclaimed, poisoned = self._recovered(found)
        cancelled = int(rows[0]["cancelled_count"]) if rows else 0
        claimed = reclaimed + [r for r in rows if r["command_id"] is not None]
        if cancelled:
            self.counts.cancelled += cancelled
            logger.info(
                "cancelled %d command(s) of executions that already ended",
                cancelled,
                extra={"action": "cancelled_ended"},
            )
        if not recover:
            took = time.perf_counter() - t0
            self.round_trip += 0.2 * (took - self.round_trip) if self.round_trip else took
        self._take(claimed)
        self._count_claim(claimed, len(reclaimed), t0)
        return bool(claimed) or cancelled > 0 or poisoned > 0

    def _claim_params(self, limit: int) -> dict[str, Any]:
        return {
            "limit": limit,
            "tool_kinds": self._tool_kinds,
            "worker_id": self._worker_id,
            "session_locks": self.session.session_locks,
        }

    def _reclaim_rows(
        self, cur: psycopg.Cursor[dict[str, Any]], limit: int
    ) -> list[dict[str, Any]]:
        """Take back dead workers' claims (and fail poison): the statement's rows."""
        cur.execute(
            query("reclaim_commands"),
            {
                "limit": limit,
                "tool_kinds": self._tool_kinds,
                "worker_id": self._worker_id,
                "known": sorted({*self._held(), *(int(c.command_id) for c in self._buffer)}),
                "lease": self.options.lease,
                "stale_after": self.options.stale_after,
                "max_attempts": self.options.max_attempts,
                "session_locks": self.session.session_locks,
            },
        )
        return cur.fetchall()

    def _recovered(self, found: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """After the commit: log and report what recovery did; (reclaimed rows, poisoned)."""
        poisoned = int(found[0]["poisoned_count"]) if found else 0
        poisoned_rows = (found[0]["poisoned"] or []) if poisoned else []
        reclaimed = [r for r in found if r["command_id"] is not None]
        if reclaimed or poisoned:
            self._log_recovery(reclaimed, poisoned)
        if self._on_poisoned is not None:  # committed: now it may be told elsewhere
            for row in poisoned_rows:
                self._on_poisoned(CommandRef.from_row(row), str(row.get("error")))
        return reclaimed, poisoned

    def _take(self, claimed: list[dict[str, Any]]) -> None:
        """Claimed rows into the buffer; a malformed one is logged and reported instead."""
        for row in claimed:
            try:
                self._buffer.append(Command.from_row(row))
            except MalformedCommand as exc:
                logger.warning(
                    "command %s: %s",
                    row["command_id"],
                    exc.message,
                    extra={
                        "action": "malformed",
                        "command_id": str(row["command_id"]),
                        "execution_id": str(row["execution_id"]),
                        "step": row.get("step_name"),
                    },
                )
                if self._on_malformed is not None:
                    self._on_malformed(CommandRef.from_row(row), exc.message)

    def _count_claim(self, claimed: list[dict[str, Any]], reclaimed: int, t0: float) -> None:
        self.counts.claimed += len(claimed)
        self.first_claim.set()
        wake, self._wake_pending = self._wake_pending, None
        self._metrics.claimed(
            [str(r.get("tool_kind")) for r in claimed],
            reclaimed=reclaimed,
            wake_latency=(time.monotonic() - wake) if wake is not None and claimed else None,
            waits=[_queue_wait(r) for r in claimed],
        )
        if claimed:
            logger.debug(
                "claimed %d command(s) in %.1f ms",
                len(claimed),
                (time.perf_counter() - t0) * 1000,
                extra={"action": "claimed"},
            )

    def _log_recovery(self, reclaimed: list[dict[str, Any]], poisoned: int) -> None:
        self.counts.reclaimed += len(reclaimed)
        self.counts.poisoned += poisoned
        by_worker: dict[str, int] = {}
        for row in reclaimed:
            key = f"{row['old_worker']} ({row['reason']})"
            by_worker[key] = by_worker.get(key, 0) + 1
        if reclaimed:
            logger.warning(
                "took back %d command(s) from %s",
                len(reclaimed),
                ", ".join(f"{w}: {n}" for w, n in sorted(by_worker.items())),
                extra={"action": "reclaimed", "count": len(reclaimed)},
            )
        if poisoned:
            logger.warning(
                "failed %d command(s) abandoned by %d workers in a row (poison)",
                poisoned,
                self.options.max_attempts,
                extra={"action": "poisoned", "count": poisoned},
            )

    def _held_now(self) -> list[int]:
        return [*self._held(), *(int(c.command_id) for c in list(self._buffer))]

    def done(self, command_ids: Iterable[int]) -> None:
        """These commands' outcomes are written: their session locks may go."""
        self.session.done(command_ids)

    def close(self) -> None:
        """Close the claim session (its locks go with it)."""
        self.session.close()

    def release_unstarted(self, timeout: float = 10.0) -> int:
        """Put commands claimed but never handed out back to PENDING; returns how many."""
        if not self._buffer:
            return 0
        items = [
            {"execution_id": c.execution_id, "command_id": int(c.command_id)} for c in self._buffer
        ]
        with self._pool.connection(timeout=timeout) as conn, conn.cursor() as cur:
            cur.execute(
                query("release_commands"),
                {
                    "items": dumps(items),
                    "worker_id": self._worker_id,
                    "execution_ids": sorted({i["execution_id"] for i in items}),
                    "command_ids": [i["command_id"] for i in items],
                },
            )
            row = cur.fetchone()
        self.session.done(i["command_id"] for i in items)
        self.session.unlock_pending()
        self._buffer.clear()
        return int(row[0]) if row else 0

    def unread(self, command: Command) -> None:
        """Give back a command ``next()`` returned but the caller could not start."""
        self._buffer.appendleft(command)

    def buffered(self) -> int:
        return len(self._buffer)
