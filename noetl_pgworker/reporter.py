"""The reporter: one writer thread that turns outcomes into few, fenced transactions.

Tool threads hand over "started" and "finished" notes; the writer gathers them for a few
milliseconds (or until ``flush_max``), folds a command's start and finish into one row update
when both are waiting, and writes the batch through a :class:`Sink` in one transaction.
A batch that cannot be written because the database is away is kept and retried with
exponential backoff; nothing is dropped. A write that the fence rejects (the claim was taken
over, or the row is already terminal) changes nothing and is logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import psycopg
from psycopg_pool import ConnectionPool

from . import events
from .db import first_line, is_retryable
from .jsontext import NotSerialisable, clean_text, dumps
from .metrics import NullMetrics
from .models import CommandRef, CommandStatus, Outcome
from .queries import query
from .spool import Spool, Spooled

logger = logging.getLogger(__name__)

Key = tuple[int, int]  # (execution_id, command_id)


@dataclass(frozen=True, slots=True)
class WriteItem:
    """One command's row update and the events that go with it."""

    ref: CommandRef
    status: str
    started_at: datetime | None
    result: dict[str, Any] | None
    error: str | None
    events: list[dict[str, Any]]
    #: The raw materials, for sinks that shape events their own way (server mode).
    outcome: Outcome | None = None
    started: bool = False
    loop_event_id: str | None = None
    iter_index: int | None = None
    #: Already made terminal by this worker in SQL (a poison command): report it, do not fence.
    unfenced: bool = False

    @property
    def key(self) -> Key:
        return (self.ref.execution_id, self.ref.command_id)


class RetryLater(Exception):
    """A sink could not write everything now; ``written`` did go through."""

    def __init__(
        self, message: str, *, written: set[Key] | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.written = written or set()
        self.retry_after = retry_after


class Sink(Protocol):
    """Where outcomes go. ``write`` returns the keys of the commands it changed."""

    def write(self, items: list[WriteItem]) -> set[Key]: ...


class PgSink:
    """Direct mode: row status and events written to PostgreSQL, fenced on the worker id."""

    def __init__(self, pool: ConnectionPool[Any], worker_id: str) -> None:
        self._pool = pool
        self._worker_id = worker_id

    def write(self, items: list[WriteItem]) -> set[Key]:
        with self._pool.connection(timeout=10) as conn, conn.cursor() as cur:
            cur.execute(query("write_back"), write_back_params(items, self._worker_id))
            return {(int(r[0]), int(r[1])) for r in cur.fetchall()}


def write_back_params(items: list[WriteItem], worker_id: str) -> dict[str, Any]:
    """The parameters of the ``write_back`` statement for a batch."""
    return {
        "items": dumps(
            [
                {
                    "execution_id": i.ref.execution_id,
                    "command_id": i.ref.command_id,
                    "status": i.status,
                    "started_at": i.started_at.isoformat() if i.started_at else None,
                    "result": i.result,
                    "error": i.error,
                }
                for i in items
            ]
        ),
        "events": dumps([e for i in items for e in i.events]),
        "worker_id": worker_id,
        "execution_ids": sorted({i.ref.execution_id for i in items}),
        "command_ids": [i.ref.command_id for i in items],
    }


@dataclass(slots=True)
class _Entry:
    ref: CommandRef
    loop_event_id: str | None = None
    iter_index: int | None = None
    started_at: datetime | None = None
    start_written: bool = False
    outcome: Outcome | None = None
    unfenced: bool = False


@dataclass(slots=True)
class ReporterStats:
    written: int = 0
    fenced: int = 0
    flushes: int = 0
    write_errors: int = 0
    failed_outcomes: int = field(default=0)


class Reporter:
    """Batches outcomes into a :class:`Sink` from one named thread."""

    def __init__(
        self,
        sink: Sink,
        worker_id: str,
        *,
        flush_interval: float = 0.005,
        flush_max: int = 500,
        max_result_bytes: int = 1024 * 1024,
        on_fenced: Callable[[CommandRef], None] | None = None,
        on_done: Callable[[CommandRef], None] | None = None,
        metrics: NullMetrics | None = None,
    ) -> None:
        self._sink = sink
        self._worker_id = worker_id
        self._flush_interval = flush_interval
        self._flush_max = flush_max
        self._max_result_bytes = max_result_bytes
        self._on_fenced = on_fenced
        self._on_done = on_done
        self._metrics = metrics or NullMetrics()
        self._entries: dict[Key, _Entry] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="noetl-pgworker-reporter", daemon=True
        )
        self._healthy = True
        self.stats = ReporterStats()

    # -- called from tool threads ------------------------------------------------------------

    def started(
        self,
        ref: CommandRef,
        at: datetime,
        *,
        loop_event_id: str | None = None,
        iter_index: int | None = None,
    ) -> None:
        with self._cond:
            entry = self._entries.setdefault(
                (ref.execution_id, ref.command_id), _Entry(ref, loop_event_id, iter_index)
            )
            entry.started_at = at
            self._cond.notify()

    def finished(
        self,
        ref: CommandRef,
        outcome: Outcome,
        *,
        loop_event_id: str | None = None,
        iter_index: int | None = None,
        unfenced: bool = False,
    ) -> None:
        with self._cond:
            entry = self._entries.setdefault(
                (ref.execution_id, ref.command_id), _Entry(ref, loop_event_id, iter_index)
            )
            entry.outcome = outcome
            entry.unfenced = unfenced
            self._cond.notify()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def pending(self) -> int:
        """Commands whose state is not yet written."""
        with self._cond:
            return len(self._entries)

    def pending_ids(self) -> list[int]:
        with self._cond:
            return [cid for _, cid in self._entries]

    def flush(self, timeout: float) -> bool:
        """Wait until everything handed over is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify()
            while self._entries:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def close(self, timeout: float, spool: Spool | None = None) -> bool:
        """Flush (up to ``timeout``), then stop the thread. True if nothing was left unwritten.

        What could not be written is kept in ``spool`` when there is one (the next start under
        this worker id writes it), else its claims are recovered after the lease."""
        flushed = self.flush(timeout)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            # A write under way ends within its statement timeout; do not wait longer.
            self._thread.join(timeout=min(5.0, max(1.0, timeout)))
            if self._thread.is_alive():
                logger.error("the reporter thread did not stop", extra={"action": "stop"})
        if not flushed:
            left = self.unwritten()
            kept = spool.save(left) if spool is not None else 0
            if kept:
                logger.warning(
                    "%d command outcome(s) could not be written before shutdown; kept in %s for"
                    " the next start under this worker id",
                    kept,
                    spool.path if spool is not None else "",
                    extra={"action": "outcomes_spooled"},
                )
            else:
                logger.error(
                    "%d command outcome(s) could not be written before shutdown; their claims"
                    " will be recovered after the lease (give --spool-dir to keep them)",
                    self.pending(),
                    extra={"action": "unwritten_outcomes"},
                )
        return flushed

    def unwritten(self) -> list[Spooled]:
        """Finished commands whose outcome is not written yet."""
        with self._cond:
            return [
                Spooled(
                    e.ref,
                    e.outcome,
                    e.started_at,
                    e.loop_event_id,
                    e.iter_index,
                    e.unfenced,
                    e.start_written,
                )
                for e in self._entries.values()
                if e.outcome is not None
            ]

    def restore(self, items: list[Spooled]) -> None:
        """Outcomes an earlier run kept on disk: written like fresh ones (and fenced)."""
        with self._cond:
            for item in items:
                self._entries[(item.ref.execution_id, item.ref.command_id)] = _Entry(
                    item.ref,
                    item.loop_event_id,
                    item.iter_index,
                    item.started_at,
                    item.start_written,
                    item.outcome,
                    item.unfenced,
                )
            self._cond.notify()

    # -- the writer ----------------------------------------------------------------------------

    def _loop(self) -> None:
        backoff = 0.0
        while True:
            with self._cond:
                while not self._writable() and not self._stop.is_set():
                    self._cond.wait(timeout=0.5)
                if self._stop.is_set() and not self._writable():
                    return
                if len(self._entries) < self._flush_max and self._flush_interval > 0:
                    # Gather more for a moment: one transaction for many commands.
                    self._cond.wait(timeout=self._flush_interval)
            try:
                with self._cond:
                    batch = self._take_batch()
                if not batch:
                    continue
                self._write(batch)
            except Exception as exc:  # one bad batch must not kill the writer
                self.stats.write_errors += 1
                self._metrics.db_error("write")
                backoff = min(5.0, max(0.05, backoff * 2))
                if self._healthy:
                    self._healthy = False
                    logger.warning(
                        "cannot write outcomes (%s); %d kept in memory, retrying with backoff",
                        first_line(exc),
                        self.pending(),
                        extra={"action": "write_paused"},
                    )
                if self._stop.is_set():
                    return  # stopping: what is left goes to the spool, not another retry
                retry_after = getattr(exc, "retry_after", None)
                self._stop.wait(max(backoff, min(60.0, retry_after or 0.0)))
                continue
            if not self._healthy:
                self._healthy = True
                logger.warning("writing outcomes again", extra={"action": "write_resumed"})
            backoff = 0.0

    def _writable(self) -> bool:
        return any(
            e.outcome is not None or (e.started_at is not None and not e.start_written)
            for e in self._entries.values()
        )

    def _take_batch(self) -> list[tuple[_Entry, WriteItem]]:
        batch: list[tuple[_Entry, WriteItem]] = []
        for entry in self._entries.values():
            if len(batch) >= self._flush_max:
                break
            try:
                item = self._item(entry)
            except Exception as exc:  # one outcome that cannot be shaped fails alone
                logger.warning(
                    "command %s: its outcome cannot be stored (%s); storing the failure instead",
                    entry.ref.command_id,
                    clean_text(f"{type(exc).__name__}: {exc}", 300),
                    extra={"action": "unstorable", "command_id": str(entry.ref.command_id)},
                )
                entry.outcome = Outcome.failure(
                    clean_text(f"the outcome could not be stored: {type(exc).__name__}: {exc}")
                    or "the outcome could not be stored",
                    error_type="serialisation",
                    duration=entry.outcome.duration if entry.outcome else 0.0,
                )
                item = self._item(entry)
            if item is not None:
                batch.append((entry, item))
        return batch

    def _item(self, entry: _Entry) -> WriteItem | None:
        ref = entry.ref
        evs: list[dict[str, Any]] = []
        if entry.started_at is not None and not entry.start_written:
            evs.append(events.started_event(ref, self._worker_id))
        if entry.outcome is None:
            if not evs:
                return None
            return WriteItem(
                ref,
                CommandStatus.RUNNING,
                entry.started_at,
                None,
                None,
                evs,
                None,
                True,
                entry.loop_event_id,
                entry.iter_index,
            )
        outcome = entry.outcome
        try:
            result = events.row_result(ref, outcome, self._worker_id, self._max_result_bytes)
            evs += events.finished_events(
                ref,
                outcome,
                self._worker_id,
                loop_event_id=entry.loop_event_id,
                iter_index=entry.iter_index,
                row_limit=self._max_result_bytes,
            )
        except NotSerialisable as exc:
            outcome = entry.outcome = Outcome.failure(
                str(exc), error_type="serialisation", duration=outcome.duration
            )
            result = events.row_result(ref, outcome, self._worker_id, self._max_result_bytes)
            evs = [e for e in evs if e["event_type"] == "command.started"]
            evs += events.finished_events(
                ref, outcome, self._worker_id, row_limit=self._max_result_bytes
            )
        status = CommandStatus.COMPLETED if outcome.ok else CommandStatus.FAILED
        return WriteItem(
            ref,
            status,
            entry.started_at,
            result,
            clean_text(outcome.error),
            evs,
            outcome,
            entry.started_at is not None and not entry.start_written,
            entry.loop_event_id,
            entry.iter_index,
            entry.unfenced,
        )

    def _write(self, batch: list[tuple[_Entry, WriteItem]]) -> None:
        items = [item for _, item in batch]
        try:
            written = self._sink.write(items)
        except RetryLater as exc:
            self._apply([p for p in batch if p[1].key in exc.written], exc.written)
            raise
        except psycopg.Error as exc:
            if is_retryable(exc):
                # Connection, read-only (a failover), serialization, resources, lock timeout…:
                # nothing against these items; keep them and retry.
                raise
            if len(batch) == 1:
                written = self._write_poisoned(batch[0], exc)
            else:
                # One bad item must not hold the others back: write them one by one.
                logger.warning(
                    "a batch of %d outcomes was refused (%s); writing them one by one",
                    len(batch),
                    first_line(exc),
                    extra={"action": "batch_split"},
                )
                for pair in batch:
                    self._write([pair])
                return
        self._apply(batch, written)

    def _apply(self, batch: list[tuple[_Entry, WriteItem]], written: set[Key]) -> None:
        """Bookkeeping after a write: what went through, what the fence refused."""
        self.stats.flushes += 1
        done: list[CommandRef] = []
        with self._cond:
            for entry, item in batch:
                key = item.key
                if key not in written:
                    self.stats.fenced += 1
                    self._metrics.fenced()
                    logger.warning(
                        "claim on command %s was lost (taken over or already terminal);"
                        " its %s write changed nothing",
                        item.ref.command_id,
                        item.status,
                        extra={
                            "action": "fenced",
                            "command_id": str(item.ref.command_id),
                            "execution_id": str(item.ref.execution_id),
                            "step": item.ref.step,
                        },
                    )
                    if self._on_fenced is not None:
                        self._on_fenced(item.ref)
                    if entry.outcome is None:
                        entry.start_written = True  # nothing more to say until it finishes
                        continue
                    self._entries.pop(key, None)
                    done.append(item.ref)
                    continue
                if item.status in (CommandStatus.COMPLETED, CommandStatus.FAILED):
                    self.stats.written += 1
                    out = entry.outcome
                    self._metrics.finished(
                        item.ref.tool_kind or "(none)",
                        item.status == CommandStatus.COMPLETED,
                        out.duration if out is not None else 0.0,
                    )
                    if item.status == CommandStatus.FAILED:
                        self.stats.failed_outcomes += 1
                    self._entries.pop(key, None)
                    done.append(item.ref)
                else:
                    entry.start_written = True
            self._cond.notify_all()
        if self._on_done is not None:
            for ref in done:
                self._on_done(ref)

    def _write_poisoned(self, pair: tuple[_Entry, WriteItem], exc: psycopg.Error) -> set[Key]:
        """A single item the database refuses: store a failure that says why instead."""
        entry, item = pair
        reason = f"outcome could not be stored: {first_line(exc)}"
        logger.error(
            "command %s: %s",
            item.ref.command_id,
            reason,
            extra={"action": "outcome_refused", "command_id": str(item.ref.command_id)},
        )
        duration = entry.outcome.duration if entry.outcome else 0.0
        entry.outcome = Outcome.failure(reason, error_type="storage", duration=duration)
        replacement = self._item(entry)
        assert replacement is not None
        return self._sink.write([replacement])
