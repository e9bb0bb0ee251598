"""A stop that ends: the process exits at most STOP_MARGIN seconds after --shutdown-timeout.

A graceful stop waits for running commands (``--shutdown-timeout``), then writes outcomes and
goes offline, each step bounded. But a step can still hang where the worker does not own the
wait — a statement sent into a silent partition waits until the kernel gives the connection up
(``--network-timeout``), several such steps one after the other. So the first SIGTERM/SIGINT
also arms this guard: if the process has not ended ``--shutdown-timeout`` + ``STOP_MARGIN``
seconds later, the outcomes not yet written are kept in the spool (``--spool-dir``; the next
start under the same worker id writes them, fenced as always) and the process exits at once
(status 1). Claims not written are recovered by the lease, as after any crash.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: Seconds past --shutdown-timeout after which a stopping process exits whatever it waits for.
STOP_MARGIN = 15.0


class StopDeadline:
    """Once armed, calls ``keep()`` and ends the process when ``seconds`` have passed."""

    def __init__(
        self,
        seconds: float,
        keep: Callable[[], int],
        *,
        exit_now: Callable[[int], None] | None = None,
    ) -> None:
        self._seconds = seconds
        self._keep = keep
        self._exit_now = exit_now or _exit
        self._armed = threading.Event()
        self._disarmed = threading.Event()

    def arm(self) -> None:
        """Start counting (once; later calls do nothing)."""
        if self._armed.is_set():
            return
        self._armed.set()
        threading.Thread(target=self._run, name="noetl-pgworker-stop-deadline", daemon=True).start()

    def disarm(self) -> None:
        """The stop finished in time."""
        self._disarmed.set()

    def _run(self) -> None:
        if self._disarmed.wait(self._seconds):
            return
        self.expire(f"the stop took longer than --shutdown-timeout + {STOP_MARGIN:.0f} s")

    def expire(self, why: str, status: int = 1) -> None:
        """Keep what is unwritten, then end the process now with ``status``."""
        try:
            kept = self._keep()
        except Exception:  # exiting anyway: say so, never hang here
            logger.exception("could not keep the unwritten outcomes")
            kept = 0
        logger.error(
            "%s: exiting now (%d unwritten outcome(s) kept in the spool; claims not written are"
            " recovered after the lease)",
            why,
            kept,
            extra={"action": "stop_deadline"},
        )
        self._exit_now(status)


def _exit(status: int) -> None:
    """Flush the logs, then end the process at once (no thread is waited for)."""
    logging.shutdown()
    os._exit(status)
