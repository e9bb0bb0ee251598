"""Threads the worker starts: one way to stop waiting for them.

Every thread the worker starts has a name, ends when an Event tells it to, and is joined with a
timeout; one that does not end in time is logged by name and left (they are daemon threads: a
stuck one cannot keep the process alive).
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)


def join(thread: threading.Thread | None, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``thread`` to end; log it if it would not.

    True when it ended (or never started, or is None); never waits for the calling thread.
    """
    if thread is None or thread.ident is None or thread is threading.current_thread():
        return True
    thread.join(max(0.0, timeout))
    if thread.is_alive():
        logger.error(
            "thread %s did not stop within %.1f s; leaving it",
            thread.name,
            timeout,
            extra={"action": "thread_stuck", "thread_name": thread.name},
        )
        return False
    return True
