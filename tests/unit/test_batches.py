"""The batch checker: how an accepted batch ended, asked of the server off the hot path."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from noetl_pgworker.batches import BatchChecker
from noetl_pgworker.errors import RetryLater

from ..helpers import wait_until

pytestmark = pytest.mark.unit


class Server:
    """Answers GET /api/events/batch/{id}/status as NoETL does, or is away."""

    def __init__(self) -> None:
        self.away = True
        self.asked = 0
        self.lock = threading.Lock()

    def batch_status(self, request_id: str) -> dict[str, Any]:
        with self.lock:
            self.asked += 1
        if self.away:
            raise RetryLater("NoETL server http://noetl unreachable: connection refused")
        state = "failed" if request_id.startswith("bad") else "completed"
        return {"request_id": request_id, "state": state, "message": "boom"}


def test_an_unreachable_server_is_said_once_per_outage_not_per_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = Server()
    checker = BatchChecker(server, deadline=60)  # type: ignore[arg-type]
    checker.start()
    try:
        with caplog.at_level(logging.WARNING, logger="noetl_pgworker.batches"):
            for n in range(4):
                checker.track(f"ok-{n}", 1, [n])
            checker.track("bad-1", 1, [9])
            wait_until(lambda: server.asked >= 15, timeout=30)
            server.away = False
            wait_until(lambda: checker.pending() == 0, timeout=30)
        paused = [r for r in caplog.records if "cannot check" in r.getMessage()]
        resumed = [r for r in caplog.records if "checking batches again" in r.getMessage()]
        assert len(paused) == 1 and len(resumed) == 1
        assert checker.completed_total == 4 and checker.failed_total == 1
    finally:
        checker.stop()
