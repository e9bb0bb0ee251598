"""Stopping a running command from outside its thread: an operator's cancel, the worker's stop.

The dispatcher runs each command inside :meth:`Interrupts.running`, which makes a
:class:`Running` handle the thread's current one; the sandbox (python and shell processes)
watches it while it waits for the command's process, and kills that process within
:data:`WATCH_INTERVAL` of a cancel or of the stop's time running out. Tools that run on the
worker's own thread (http, postgres, inline python) cannot be interrupted: their outcome is
turned into CANCELLED when they return.

A command's process that ends by a stop signal the worker did not send (SIGTERM, SIGINT,
SIGHUP: a service manager signalling every process of the service) while its worker is
stopping is *interrupted*, not failed: the worker gives the command back to PENDING.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from .errors import ToolError

#: How often a waiting sandbox looks at its command's handle (seconds).
WATCH_INTERVAL = 0.1
#: A command's process killed by one of these was stopped from outside the worker.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
#: How long a command ended by a stop signal waits to learn whether its worker is stopping
#: (the signal may reach the command's process a moment before the worker).
STOP_GRACE = 1.0


class Cancelled(ToolError):
    """The command was cancelled (``noetl-pgworker cancel``)."""

    error_type = "cancelled"


class Interrupted(ToolError):
    """The worker stopped while the command ran: it goes back to PENDING."""

    error_type = "interrupted"


@dataclass(eq=False)
class Running:
    """One running command's handle."""

    command_id: str
    owner: Interrupts
    cancelled_by: str | None = None
    event: threading.Event = field(default_factory=threading.Event)

    def reason(self) -> ToolError | None:
        """Why the command must stop now (None: it may go on)."""
        if self.cancelled_by is not None:
            return Cancelled(f"cancelled by {self.cancelled_by}")
        if self.owner.aborting.is_set():
            return Interrupted("the worker stopped before the command ended")
        return None

    def wait(self, timeout: float) -> None:
        self.event.wait(timeout)


_current: ContextVar[Running | None] = ContextVar("noetl_pgworker_running", default=None)


def current() -> Running | None:
    """The handle of the command this thread runs, if the dispatcher gave it one."""
    return _current.get()


class Interrupts:
    """One worker's running commands, and its stop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, Running] = {}
        #: the worker is stopping (a stop signal reached it)
        self.stopping = threading.Event()
        #: the stop's time for running commands is out: kill their processes, give them back
        self.aborting = threading.Event()

    @contextlib.contextmanager
    def running(self, command_id: str) -> Iterator[Running]:
        handle = Running(command_id, self)
        with self._lock:
            self._running[command_id] = handle
        token = _current.set(handle)
        try:
            yield handle
        finally:
            _current.reset(token)
            with self._lock:
                self._running.pop(command_id, None)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def cancel(self, command_id: str, by: str = "an operator") -> bool:
        """Ask the running command to stop; False if it is not running here."""
        with self._lock:
            handle = self._running.get(command_id)
        if handle is None:
            return False
        handle.cancelled_by = by
        handle.event.set()
        return True

    def stop(self) -> None:
        self.stopping.set()

    def abort(self) -> None:
        """Kill every running command's process (each goes back to PENDING)."""
        self.aborting.set()
        with self._lock:
            handles = list(self._running.values())
        for handle in handles:
            handle.event.set()


def stopped_from_outside(returncode: int, handle: Running | None) -> bool:
    """Did a command's process end (``returncode`` < 0: killed by that signal) because its
    worker is being stopped? Waits up to :data:`STOP_GRACE` for the worker to know."""
    if handle is None or returncode >= 0 or -returncode not in STOP_SIGNALS:
        return False
    return handle.owner.stopping.wait(STOP_GRACE)
