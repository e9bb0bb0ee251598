"""Bounds against a silent network: every connection notices a dead peer within seconds.

A network that drops packets instead of refusing them (a lost route, a dead switch, a VM
paused on the other side) leaves a socket waiting for ever: a read on an idle connection never
returns, and a write's retransmissions go on for about 15 minutes. Keepalive probes alone do
not help a socket that has unacknowledged data (the kernel does not probe then).

So each of the worker's connections gets, from ``--network-timeout`` (T seconds):

- on the client (libpq): ``keepalives=1``, ``keepalives_idle`` = T/2, ``keepalives_interval``
  = T/6, ``keepalives_count`` = 3 (an idle connection is dropped after about T), and
  ``tcp_user_timeout`` = T (data unacknowledged for T seconds drops it too);
- on the server, where the connection is direct (the ``options`` startup parameter; a pooling
  proxy refuses it): the same as ``tcp_keepalives_*`` and ``tcp_user_timeout``, so that the
  server ends the session of a client it cannot reach, and with it the session's locks.

A keyword the user's DSN gives is left as the DSN says. A timeout of 0 sets none of them.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import conninfo
from psycopg_pool import ConnectionPool
from psycopg_pool.pool import AddConnection, MaintenanceTask

#: The default of ``--network-timeout`` (seconds): a dead peer is noticed within about this.
DEFAULT_NETWORK_TIMEOUT = 20.0

#: libpq keywords this module sets (unless the DSN gives them).
CLIENT_KEYWORDS = (
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)


def _given(dsn: str) -> set[str]:
    if not dsn:
        return set()
    try:
        return {k for k, v in conninfo.conninfo_to_dict(dsn).items() if v not in (None, "")}
    except psycopg.ProgrammingError:
        return set()


def _timings(timeout: float) -> tuple[int, int, int, int]:
    """(idle s, interval s, count, user timeout ms) for a detection time of ``timeout`` s."""
    idle = max(1, int(timeout / 2))
    interval = max(1, int(timeout / 6))
    return idle, interval, 3, max(1000, int(timeout * 1000))


def client_kwargs(dsn: str, timeout: float = DEFAULT_NETWORK_TIMEOUT) -> dict[str, Any]:
    """libpq keepalive and ``tcp_user_timeout`` parameters, less those ``dsn`` gives."""
    if timeout <= 0:
        return {}
    idle, interval, count, user_ms = _timings(timeout)
    ours: dict[str, Any] = {
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": interval,
        "keepalives_count": count,
        "tcp_user_timeout": user_ms,
    }
    given = _given(dsn)
    return {k: v for k, v in ours.items() if k not in given}


def server_settings(timeout: float = DEFAULT_NETWORK_TIMEOUT) -> dict[str, str]:
    """The server-side twins (every role may set them in its own session)."""
    if timeout <= 0:
        return {}
    idle, interval, count, user_ms = _timings(timeout)
    return {
        "tcp_keepalives_idle": str(idle),
        "tcp_keepalives_interval": str(interval),
        "tcp_keepalives_count": str(count),
        "tcp_user_timeout": str(user_ms),
    }


#: The longest wait between two attempts of the pool to replace a lost connection (seconds).
RECONNECT_PACE = 2.0


class PacedPool(ConnectionPool[Any]):
    """A :class:`~psycopg_pool.ConnectionPool` that keeps trying to replace lost connections
    at a steady pace: psycopg_pool's reconnection delay doubles without bound (1, 2, 4, … 32 s),
    so after an outage of a minute the pool would come back up to half a minute after the
    database; here a new attempt follows at most ``RECONNECT_PACE`` seconds after a failed one.
    (Give it a long ``reconnect_timeout``: it gives up on a connection after that.)"""

    def schedule_task(self, task: MaintenanceTask, delay: float) -> None:
        if isinstance(task, AddConnection):
            delay = min(delay, RECONNECT_PACE)
        super().schedule_task(task, delay)
