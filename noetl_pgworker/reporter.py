"""The reporter: one writer thread that turns outcomes into few, fenced writes.

Tool threads hand over "started" and "finished" notes; the writer gathers them for a few
milliseconds (or until ``flush_max``), and while other commands are still running for up to
``gather`` more, folds a command's start and finish into one item when both are waiting (a
start alone is written only once the command has run for ``start_delay``: a short command's
start and finish cost one write, not two), and hands the batch to a
:class:`~noetl_pgworker.sink.Sink`, which shapes and writes it. A batch the sink cannot write
now (:class:`RetryLater`: the database or the server is away) is kept and retried with
exponential backoff; nothing is dropped. An outcome the sink
refuses (:class:`ItemRefused`) is replaced by a failure saying why, without holding back its
batch. A write that the fence rejects (the claim was taken over, or the row is already
terminal) changes nothing and is logged. The reporter knows neither the database nor the
shapes of NoETL's events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from . import threads
from .errors import ItemRefused, RetryLater
from .metrics import NullMetrics
from .models import CommandRef, CommandStatus, Outcome
from .sink import Key, Sink, WriteItem
from .spool import Spool, Spooled

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    ref: CommandRef
    loop_event_id: str | None = None
    iter_index: int | None = None
    started_at: datetime | None = None
    start_written: bool = False
    outcome: Outcome | None = None
    unfenced: bool = False
    #: When the start may be written alone (monotonic), if the outcome has not come by then.
    start_due: float = 0.0


@dataclass(slots=True)
class ReporterStats:
    written: int = 0
    fenced: int = 0
    flushes: int = 0
    write_errors: int = 0
    failed_outcomes: int = field(default=0)
    #: written CANCELLED (``noetl-pgworker cancel``): not in ``written``
    cancelled: int = 0
    #: interrupted by the worker's stop and put back to PENDING: not in ``written``
    given_back: int = 0


class Reporter:
    """Batches outcomes into a :class:`Sink` from one named thread."""

    def __init__(  # noqa: PLR0913 — keyword-only settings, each with a default
        self,
        sink: Sink,
        *,
        flush_interval: float = 0.005,
        flush_max: int = 500,
        start_delay: float = 0.2,
        gather: float = 0.0,
        busy: Callable[[], bool] | None = None,
        enough: int | None = None,
        on_fenced: Callable[[CommandRef], None] | None = None,
        on_done: Callable[[CommandRef], None] | None = None,
        metrics: NullMetrics | None = None,
    ) -> None:
        self._sink = sink
        self._flush_interval = flush_interval
        self._flush_max = flush_max
        self._start_delay = start_delay
        self._gather = gather
        #: Whether other outcomes are likely to come within ``gather``.
        self._busy = busy or (lambda: False)
        #: Outcomes that make a batch worth writing without gathering more.
        self._enough = min(enough or flush_max, flush_max)
        self._on_fenced = on_fenced
        self._on_done = on_done
        self._metrics = metrics or NullMetrics()
        self._entries: dict[Key, _Entry] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._keep_lock = threading.RLock()
        self._kept: int | None = None
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
            entry.start_due = time.monotonic() + self._start_delay
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

    @property
    def thread(self) -> threading.Thread:
        return self._thread

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
        # A write under way ends within its statement timeout; do not wait longer.
        threads.join(self._thread, min(5.0, max(1.0, timeout)))
        if not flushed:
            kept = self.keep(spool) if spool is not None else 0
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

    def keep(self, spool: Spool) -> int:
        """Save the outcomes not written yet in ``spool``, once (a stop that runs out of time
        and the end of a graceful one may both ask); how many were kept."""
        with self._keep_lock:
            if self._kept is not None:
                return self._kept
            self._kept = spool.save(self.unwritten())
            return self._kept

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
                    loop_event_id=item.loop_event_id,
                    iter_index=item.iter_index,
                    started_at=item.started_at,
                    start_written=item.start_written,
                    outcome=item.outcome,
                    unfenced=item.unfenced,
                )
            self._cond.notify()

    # -- the writer ----------------------------------------------------------------------------

    def _loop(self) -> None:
        backoff = 0.0
        while True:
            with self._cond:
                while not self._stop.is_set():
                    wait = self._until_writable()
                    if wait <= 0:
                        break
                    self._cond.wait(timeout=min(0.5, wait))
                if self._stop.is_set() and self._until_writable() > 0:
                    return
                if len(self._entries) < self._flush_max and self._flush_interval > 0:
                    # Gather more for a moment: one transaction for many commands.
                    self._cond.wait(timeout=self._flush_interval)
                if self._gather > 0:
                    self._gather_while_busy()
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
                        _first_line(exc),
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

    def _gather_while_busy(self) -> None:
        """While other commands are running and finishing fast, wait up to ``gather`` seconds
        for their outcomes too: under load, one write for several commands; alone, or beside
        long commands, no wait at all; with ``enough`` outcomes waiting, no wait either (a deep
        queue forms its batches while the previous write is under way)."""
        deadline = time.monotonic() + self._gather
        while not self._stop.is_set() and self._busy():
            if sum(e.outcome is not None for e in self._entries.values()) >= self._enough:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(timeout=left)

    def _until_writable(self) -> float:
        """Seconds until there is something to write (0: now; inf: nothing is coming)."""
        now = time.monotonic()
        soonest = float("inf")
        stopping = self._stop.is_set()
        for e in self._entries.values():
            if e.outcome is not None:
                return 0.0
            if e.started_at is not None and not e.start_written:
                if stopping or e.start_due <= now:
                    return 0.0
                soonest = min(soonest, e.start_due - now)
        return soonest

    def _take_batch(self) -> list[tuple[_Entry, WriteItem]]:
        batch: list[tuple[_Entry, WriteItem]] = []
        now = time.monotonic()
        for entry in self._entries.values():
            if len(batch) >= self._flush_max:
                break
            if entry.outcome is None and entry.start_due > now and not self._stop.is_set():
                continue  # a start not due yet: it may still be folded into its outcome
            item = self._item(entry)
            if item is not None:
                batch.append((entry, item))
        return batch

    @staticmethod
    def _item(entry: _Entry) -> WriteItem | None:
        """What there is to say about ``entry`` now: its start, its outcome, or nothing."""
        start = entry.started_at is not None and not entry.start_written
        if entry.outcome is None and not start:
            return None
        return WriteItem(
            entry.ref,
            started_at=entry.started_at,
            started=start,
            outcome=entry.outcome,
            loop_event_id=entry.loop_event_id,
            iter_index=entry.iter_index,
            unfenced=entry.unfenced,
        )

    def _write(self, batch: list[tuple[_Entry, WriteItem]]) -> None:
        replaced: set[Key] = set()
        while True:
            try:
                written = self._sink.write([item for _, item in batch])
            except RetryLater as exc:
                self._apply([p for p in batch if p[1].key in exc.written], exc.written)
                raise
            except ItemRefused as exc:
                if exc.key is not None and exc.key not in replaced:
                    # The sink named the item it cannot store: store a failure instead of it,
                    # and write the batch again.
                    replaced.add(exc.key)
                    batch = [self._refused(p, exc) if p[1].key == exc.key else p for p in batch]
                    continue
                if len(batch) == 1 and exc.key is None:
                    written = self._write_refused(batch[0], exc)
                    break
                if exc.key is not None:
                    raise  # refused again after the replacement: retried with backoff
                # One bad item must not hold the others back: write them one by one.
                logger.warning(
                    "a batch of %d outcomes was refused (%s); writing them one by one",
                    len(batch),
                    exc.message,
                    extra={"action": "batch_split"},
                )
                for pair in batch:
                    self._write([pair])
                return
            break
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
                if item.outcome is not None:  # ended, or given back to the queue
                    self._count(item)
                    self._entries.pop(key, None)
                    done.append(item.ref)
                else:
                    entry.start_written = True
            self._cond.notify_all()
        if self._on_done is not None:
            for ref in done:
                self._on_done(ref)

    def _count(self, item: WriteItem) -> None:
        out = item.outcome
        kind = item.ref.tool_kind or "(none)"
        if item.status == CommandStatus.PENDING:
            self.stats.given_back += 1
            return
        if item.status == CommandStatus.CANCELLED:
            self.stats.cancelled += 1
            self._metrics.cancelled(kind)
            return
        self.stats.written += 1
        self._metrics.finished(
            kind, item.status == CommandStatus.COMPLETED, out.duration if out is not None else 0.0
        )
        if item.status == CommandStatus.FAILED:
            self.stats.failed_outcomes += 1

    def _refused(
        self, pair: tuple[_Entry, WriteItem], exc: ItemRefused
    ) -> tuple[_Entry, WriteItem]:
        """The pair with its outcome replaced by a failure saying why it cannot be stored."""
        entry, item = pair
        logger.warning(
            "command %s: its outcome cannot be stored (%s); storing the failure instead",
            item.ref.command_id,
            exc.message[:300],
            extra={"action": "unstorable", "command_id": str(item.ref.command_id)},
        )
        duration = entry.outcome.duration if entry.outcome else 0.0
        entry.outcome = Outcome.failure(exc.message, error_type=exc.error_type, duration=duration)
        replacement = self._item(entry)
        assert replacement is not None
        return entry, replacement

    def _write_refused(self, pair: tuple[_Entry, WriteItem], exc: ItemRefused) -> set[Key]:
        """A single item the database refuses: store a failure that says why instead."""
        entry, item = pair
        logger.error(
            "command %s: %s",
            item.ref.command_id,
            exc.message,
            extra={"action": "outcome_refused", "command_id": str(item.ref.command_id)},
        )
        duration = entry.outcome.duration if entry.outcome else 0.0
        entry.outcome = Outcome.failure(exc.message, error_type=exc.error_type, duration=duration)
        replacement = self._item(entry)
        assert replacement is not None
        return self._sink.write([replacement])


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]
