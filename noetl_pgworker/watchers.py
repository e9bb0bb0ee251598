"""A worker's two database watchers, each on a thread of its own: the cancellation requests of
the commands it runs, and the queue depth it exports for the fleet; and the pruning of gone
workers' runtime rows at start."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from .interrupt import Interrupts
from .metrics import NullMetrics
from .queries import query
from .redact import redact_text

logger = logging.getLogger(__name__)

#: A noetl-pgworker worker's runtime row with no heartbeat for this long (seconds) is removed
#: by the next worker that starts (the worker renamed or retired; the database allows no less
#: than an hour).
RUNTIME_PRUNE_AFTER = 24 * 3600.0
#: Seconds between two samples of the queue depth.
SAMPLE_EVERY = 15.0
LIVE_STATUSES = ("PENDING", "CLAIMED", "RUNNING")


class CancelWatcher:
    """Stops the running commands someone cancelled (``noetl-pgworker cancel``): looked up at
    once when ``wake`` is set (a NOTIFY 'cancel'), else every ``interval`` while commands
    run; until ``stop`` is set and nothing runs."""

    def __init__(
        self,
        pool: ConnectionPool[Any],
        interrupts: Interrupts,
        *,
        wake: threading.Event,
        stop: threading.Event,
        running: Callable[[], int],
        interval: float,
        metrics: NullMetrics,
    ) -> None:
        self._pool, self._interrupts = pool, interrupts
        self._wake, self._stop, self._running = wake, stop, running
        self._interval, self._metrics = interval, metrics

    def run(self) -> None:
        while not self._stop.is_set() or self._running():
            self._wake.wait(self._interval)
            self._wake.clear()
            running = self._interrupts.ids()
            if running:
                self._look(running)

    def _look(self, running: list[str]) -> None:
        try:
            with self._pool.connection(timeout=5) as conn:
                rows = conn.execute(
                    query("cancel_requests"), {"command_ids": [int(i) for i in running]}
                ).fetchall()
        except Exception:  # looked up again at the next interval
            self._metrics.db_error("cancel")
            return
        for command_id, by in rows:
            if self._interrupts.cancel(str(command_id), by or "an operator"):
                logger.info(
                    "command %s cancelled by %s: stopping it",
                    command_id,
                    by,
                    extra={"action": "cancel", "command_id": str(command_id)},
                )


class QueueSampler:
    """The queue depth for the metrics, every :data:`SAMPLE_EVERY` s (sampled, not per
    scrape). One worker of the fleet exports it (see ``queue_depth_leader``), one series per
    (status, kind) any live worker runs or the queue holds, 0 included; the others export
    none, so that a sum over the fleet counts the queue once."""

    def __init__(
        self,
        pool: ConnectionPool[Any],
        *,
        worker_id: str,
        tool_kinds: tuple[str, ...],
        lease: float,
        stale_after: float,
        stop: threading.Event,
        metrics: NullMetrics,
    ) -> None:
        self._pool, self._worker_id, self._lease = pool, worker_id, lease
        self._stale_after, self._stop, self._metrics = stale_after, stop, metrics
        self._seen: set[str] = set(tool_kinds)

    def run(self) -> None:
        while True:
            try:
                with self._pool.connection(timeout=5) as conn:
                    depth, stuck = self.read(conn)
                self._metrics.queue_depth(depth, stuck)
            except Exception:  # a sample missed is no harm
                self._metrics.db_error("sampler")
            if self._stop.wait(SAMPLE_EVERY):
                return

    def read(self, conn: psycopg.Connection[Any]) -> tuple[dict[tuple[str, str], int] | None, int]:
        """(depth by (status, kind) with zeros, or None when another worker exports it;
        claims stuck past the lease)."""
        stuck = conn.execute(query("status_stuck"), {"lease": self._lease}).fetchone()
        stuck_n = int(stuck[0]) if stuck else 0
        lead = conn.execute(
            query("queue_depth_leader"),
            {"name": self._worker_id, "stale_after": self._stale_after},
        ).fetchone()
        if not lead or not lead[0]:
            return None, stuck_n
        self._seen.update(str(k) for k in lead[1] or ())
        depth = {(st, kind): 0 for kind in self._seen for st in LIVE_STATUSES}
        for st, kind, n in conn.execute(query("queue_depth")).fetchall():
            self._seen.add(str(kind))
            depth[(str(st), str(kind))] = int(n)
        return depth, stuck_n


def prune_runtime(pool: ConnectionPool[Any], dsn: str) -> None:
    """Remove the runtime rows of noetl-pgworker workers gone for good (no heartbeat for
    :data:`RUNTIME_PRUNE_AFTER`); a failure is only logged (the rows are only clutter)."""
    try:
        with pool.connection(timeout=5) as conn:
            row = conn.execute(
                query("prune_runtime"), {"older_than": RUNTIME_PRUNE_AFTER}
            ).fetchone()
    except Exception as exc:
        logger.debug("runtime rows not pruned: %s", redact_text(str(exc), dsn))
        return
    if row and row[0]:
        logger.info(
            "removed %d runtime row(s) of workers gone for %.0f h or more",
            row[0],
            RUNTIME_PRUNE_AFTER / 3600,
            extra={"action": "runtime_pruned"},
        )
