"""systemd's notification protocol (``Type=notify``), without a dependency.

:class:`Notifier` sends ``READY=1``, ``STATUS=…``, ``WATCHDOG=1`` and ``STOPPING=1`` to
``$NOTIFY_SOCKET``. The watchdog thread pings only while the worker's main loop shows progress
(``alive()`` returns True): a hung loop stops the pings, and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

from . import threads

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str, watchdog_usec: int | None = None) -> None:
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self.watchdog_interval = watchdog_usec / 1e6 if watchdog_usec else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._stopping = False

    @classmethod
    def from_env(cls) -> Notifier | None:
        """A notifier when systemd (or a test) set ``NOTIFY_SOCKET``; else None."""
        address = os.environ.get("NOTIFY_SOCKET")
        if not address:
            return None
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        watchdog = (
            int(usec) if usec and usec.isdigit() and (not pid or pid == str(os.getpid())) else None
        )
        return cls(address, watchdog)

    def send(self, *lines: str) -> None:
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # systemd gone, or a test socket closed: nothing to do
            logger.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        with self._send_lock:
            self._stopping = True  # no watchdog ping may follow STOPPING=1
            self.send("STOPPING=1", "STATUS=stopping")

    def start_watchdog(self, alive: Callable[[float], bool], status: Callable[[], str]) -> None:
        """Ping at half the watchdog interval while ``alive(max_age)`` holds."""
        interval = self.watchdog_interval
        period = interval / 2 if interval else 5.0

        def run() -> None:
            while not self._stop.wait(period):
                if self._stopping:
                    return
                if interval and alive(interval / 2):
                    with self._send_lock:
                        if self._stopping:
                            return
                        self.send("WATCHDOG=1", f"STATUS={status()}")
                elif interval:
                    logger.error(
                        "main loop shows no progress: not sending the watchdog ping",
                        extra={"action": "watchdog_withheld"},
                    )
                else:
                    self.status(status())

        self._thread = threading.Thread(target=run, name="noetl-pgworker-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        threads.join(self._thread, 5)
        self._sock.close()
