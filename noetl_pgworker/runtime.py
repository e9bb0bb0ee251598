"""Liveness: the worker's row in ``noetl.runtime`` (kind ``worker_pool``, name = worker id).

NoETL (and other pgworkers) read this row to decide whether a claim's owner is alive, so it is
refreshed every few seconds from its own thread, and marked ``offline`` on a clean stop.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from psycopg_pool import ConnectionPool

from . import threads
from .db import first_line
from .queries import query

logger = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        pool: ConnectionPool[Any],
        *,
        worker_id: str,
        capacity: int,
        tool_kinds: Sequence[str],
        interval: float = 5.0,
        stats: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._pool = pool
        self._worker_id = worker_id
        self._capacity = capacity
        self._tool_kinds = list(tool_kinds)
        self._interval = interval
        self._stats = stats
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="noetl-pgworker-heartbeat", daemon=True
        )
        self._healthy = True
        self.beats = 0
        #: monotonic time of the last successful beat (readiness: the database answers)
        self.last_ok: float | None = None

    def _runtime(self) -> dict[str, Any]:
        runtime: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "kind": "noetl-pgworker",
        }
        if self._stats is not None:
            runtime.update(self._stats())
        return runtime

    def beat(self) -> None:
        """Upsert the runtime row now (raises on database errors)."""
        runtime = self._runtime()
        with self._pool.connection(timeout=10) as conn:
            conn.execute(
                query("runtime_heartbeat"),
                {
                    "name": self._worker_id,
                    "labels": json.dumps({"worker": "noetl-pgworker"}),
                    "capabilities": json.dumps({"tool_kinds": self._tool_kinds}),
                    "capacity": self._capacity,
                    "runtime": json.dumps(runtime),
                },
            )
        self.beats += 1
        self.last_ok = time.monotonic()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
                if not self._healthy:
                    self._healthy = True
                    logger.warning("heartbeat resumed", extra={"action": "heartbeat_resumed"})
            except Exception as exc:  # keep beating; the database may come back
                if self._healthy:
                    self._healthy = False
                    logger.warning(
                        "heartbeat failed (%s); retrying every %.0f s",
                        first_line(exc),
                        self._interval,
                        extra={"action": "heartbeat_failed"},
                    )

    def _answering(self) -> bool:
        """The last beat succeeded within three intervals (else the offline write would wait
        on a database that does not answer)."""
        return self.last_ok is not None and time.monotonic() - self.last_ok < 3 * self._interval

    def stop(self, *, mark_offline: bool = True, timeout: float = 5.0) -> None:
        self._stop.set()
        threads.join(self._thread, timeout)
        if mark_offline and not self._answering():
            logger.warning(
                "not marking the worker offline: the database has not answered a heartbeat"
                " for %.0f s (a stale heartbeat says the same)",
                time.monotonic() - (self.last_ok or 0.0),
                extra={"action": "offline_skipped"},
            )
        elif mark_offline:
            try:
                with self._pool.connection(timeout=timeout) as conn:
                    conn.execute(
                        query("runtime_offline"),
                        {"name": self._worker_id, "runtime": json.dumps(self._runtime())},
                    )
            except Exception as exc:  # best effort: a stale heartbeat says the same thing
                logger.warning(
                    "could not mark the worker offline: %s",
                    first_line(exc),
                    extra={"action": "offline_failed"},
                )
