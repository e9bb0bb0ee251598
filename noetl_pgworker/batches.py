"""Following the batches a NoETL server accepted, until it says how they ended.

``POST /api/events/batch`` answers 202 *before* the server applies the events: it may still
fail (observed on NoETL 4.26: a CHECK violation while writing the ``workflow.completed`` event
rolled the batch back and left a ``batch.failed`` event; the worker had only seen the 202).
``GET /api/events/batch/{request_id}/status`` says ``accepted|processing|completed|failed``
(both 2.103.4 and 4.26). This checker asks, off the hot path, from one named thread, a bounded
number of times per batch, for a bounded number of batches; a failure is logged once with the
server's message, counted in ``noetl_pgworker_server_batches_failed_total`` and published in
the worker's ``noetl.runtime`` row, which ``noetl-pgworker status`` shows.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import threads
from .metrics import NullMetrics

logger = logging.getLogger(__name__)

#: Seconds between asks about one batch (then the last value repeats until the deadline).
_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)


class BatchStatus(Protocol):
    """What the checker asks of the server (``server.NoetlServer`` is one)."""

    def batch_status(self, request_id: str) -> dict[str, Any]:
        """``{"state": …, "message": …}`` of the batch sent as ``request_id``."""
        ...


@dataclass(order=True, slots=True)
class _Tracked:
    due: float
    request_id: str = field(compare=False)
    execution_id: int = field(compare=False)
    command_ids: list[int] = field(compare=False)
    since: float = field(compare=False)
    asks: int = field(default=0, compare=False)


class BatchChecker:
    """Asks the server how each accepted batch ended; reports the failed ones."""

    def __init__(
        self,
        server: BatchStatus,
        *,
        metrics: NullMetrics | None = None,
        deadline: float = 120.0,
        max_tracked: int = 2000,
    ) -> None:
        self._server = server
        self._metrics = metrics or NullMetrics()
        self._deadline = deadline
        self._max_tracked = max_tracked
        self._heap: list[_Tracked] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="noetl-pgworker-batch-checker", daemon=True
        )
        self.failed_total = 0
        self._failing = False
        self.completed_total = 0
        self.unknown_total = 0

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        threads.join(self._thread, timeout)

    def track(self, request_id: str, execution_id: int, command_ids: list[int]) -> None:
        """Follow a batch the server accepted with ``request_id``."""
        now = time.monotonic()
        with self._cond:
            if len(self._heap) >= self._max_tracked:
                # Bounded: the oldest is let go (counted, not silently).
                oldest = min(self._heap, key=lambda t: t.since)
                self._heap.remove(oldest)
                heapq.heapify(self._heap)
                self.unknown_total += 1
            heapq.heappush(
                self._heap, _Tracked(now + _DELAYS[0], request_id, execution_id, command_ids, now)
            )
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def drain(self, timeout: float) -> bool:
        """Wait (bounded) until every tracked batch has a final state; True if none is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pending():
                return True
            time.sleep(0.05)
        return not self.pending()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._heap and not self._stop.is_set():
                    self._cond.wait(1.0)
                if self._stop.is_set():
                    return
                wait = self._heap[0].due - time.monotonic()
                if wait > 0:
                    self._cond.wait(min(wait, 1.0))
                    continue
                item = heapq.heappop(self._heap)
            try:
                self._ask(item)
            except Exception as exc:  # one odd answer must not stop the checker
                if not self._failing:  # once per outage, not once per batch and retry
                    self._failing = True
                    logger.warning(
                        "cannot check how the NoETL server ended its batches (%s); %d waiting,"
                        " retrying",
                        exc,
                        self.pending() + 1,
                        extra={"action": "batch_check_paused"},
                    )
                self._again(item)
            else:
                if self._failing:
                    self._failing = False
                    logger.warning(
                        "checking batches again", extra={"action": "batch_check_resumed"}
                    )

    def _ask(self, item: _Tracked) -> None:
        item.asks += 1
        answer = self._server.batch_status(item.request_id)
        state = str((answer or {}).get("state") or "")
        if state == "completed":
            self.completed_total += 1
            return
        if state == "failed":
            self._failed(item, answer or {})
            return
        self._again(item)

    def _again(self, item: _Tracked) -> None:
        now = time.monotonic()
        if now - item.since >= self._deadline:
            self.unknown_total += 1
            logger.warning(
                "the NoETL server gave no final state for batch %s (execution %s) within %.0f s",
                item.request_id,
                item.execution_id,
                self._deadline,
                extra={"action": "batch_unknown", "execution_id": str(item.execution_id)},
            )
            return
        item.due = now + _DELAYS[min(item.asks, len(_DELAYS) - 1)]
        with self._cond:
            heapq.heappush(self._heap, item)

    def _failed(self, item: _Tracked, answer: dict[str, Any]) -> None:
        message = str(answer.get("message") or answer.get("error_code") or "no reason given")
        logger.error(
            "the NoETL server failed batch %s of execution %s (commands %s) after accepting"
            " it: %s%s",
            item.request_id,
            item.execution_id,
            ", ".join(str(c) for c in item.command_ids[:10])
            + (" …" if len(item.command_ids) > 10 else ""),
            message[:2000],
            f" [{answer['error_code']}]" if answer.get("error_code") else "",
            extra={
                "action": "server_batch_failed",
                "execution_id": str(item.execution_id),
                "request_id": item.request_id,
            },
        )
        # Counted after the log line: whoever sees the count can also see why.
        self.failed_total += 1
        self._metrics.server_batch_failed()
