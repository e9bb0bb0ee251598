"""The doorbell: LISTEN on a dedicated autocommit connection, set an Event on every NOTIFY.

LISTEN is an accelerator, not a dependency: if the connection dies, the claim loop goes on
polling while this thread reconnects with backoff. A periodic round trip catches a connection
that is silently dead (no error, no notifications).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
from psycopg import sql

from . import threads
from .config import NOTIFY_CHANNEL
from .db import connect, first_line
from .netguard import DEFAULT_NETWORK_TIMEOUT

logger = logging.getLogger(__name__)


class Listener:
    def __init__(  # noqa: PLR0913 — keyword-only settings, each with a default
        self,
        dsn: str,
        wake: threading.Event,
        *,
        cancel_wake: threading.Event | None = None,
        channel: str = NOTIFY_CHANNEL,
        application_name: str = "noetl-pgworker-listener",
        connect_timeout: float = 10.0,
        check_interval: float = 30.0,
        network_timeout: float = DEFAULT_NETWORK_TIMEOUT,
        session_options: dict[str, Any] | None = None,
    ) -> None:
        #: ``--network-timeout`` and the server-side options (``db.worker_session_kwargs``).
        self._network_timeout = network_timeout
        self._session_options = session_options
        self._dsn = dsn
        self._wake = wake
        #: set by a notification with the payload 'cancel' (``noetl-pgworker cancel``)
        self._cancel_wake = cancel_wake
        self._channel = channel
        self._application_name = application_name
        self._connect_timeout = connect_timeout
        self._check_interval = check_interval
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._thread = threading.Thread(
            target=self._run, name="noetl-pgworker-listener", daemon=True
        )
        self.reconnects = 0
        self.last_notify: float | None = None
        self._ever_connected = False
        self.notifications = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        threads.join(self._thread, timeout)

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                self._listen()
                backoff = 0.0
            except Exception as exc:  # any failure: reconnect, never die
                self._connected.clear()
                backoff = min(10.0, max(0.2, backoff * 2))
                logger.warning(
                    "listener connection lost (%s); polling until it is back",
                    first_line(exc),
                    extra={"action": "listener_lost"},
                )
                self._stop.wait(backoff)
            finally:
                self._close()

    def _listen(self) -> None:
        conn = self._conn = connect(
            self._dsn,
            application_name=self._application_name,
            connect_timeout=self._connect_timeout,
            autocommit=True,
            network_timeout=self._network_timeout,
            extra=self._session_options,
        )
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        self._connected.set()
        if self._ever_connected:
            self.reconnects += 1
            logger.warning("listener reconnected", extra={"action": "listener_back"})
        self._ever_connected = True
        # Anything inserted while we were not listening must not wait for the poll timer.
        self._wake.set()
        logger.debug("listening on %s", self._channel, extra={"action": "listening"})
        last_check = time.monotonic()
        while not self._stop.is_set():
            for notify in conn.notifies(timeout=0.5):
                self.notifications += 1
                if notify.payload == "cancel":
                    if self._cancel_wake is not None:
                        self._cancel_wake.set()
                    continue
                self.last_notify = time.monotonic()
                self._wake.set()
            if time.monotonic() - last_check >= self._check_interval:
                conn.execute("SELECT 1")  # a silently dead connection raises here
                last_check = time.monotonic()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        self._connected.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken connection may fail; nothing to do
                logger.debug("error closing the listener connection", exc_info=True)
