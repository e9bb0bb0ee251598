"""The worker's connections: the pool, the claim session, and what the pool mode costs.

The pool serves the writer, the heartbeat, releases and samples; the claim session (its own
connection, ``session.py``) serves the claims and holds their session locks; the listener has
its own connection too (``listener.py``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from . import schema
from .config import Settings
from .db import (
    apply_session_settings,
    connect_kwargs,
    first_line,
    worker_session_kwargs,
    wrap_errors,
)
from .errors import DatabaseUnavailable
from .incarnation import application_name, new_token
from .netguard import PacedPool
from .redact import redact_dsn, redact_text

logger = logging.getLogger(__name__)


#: The pool never gives up replacing a lost connection while the worker runs (seconds).
RECONNECT_FOREVER = 365 * 86400.0


def open_pool(
    settings: Settings, closing: contextlib.ExitStack, incarnation: str | None = None
) -> ConnectionPool[Any]:
    """The worker's connection pool, open (closed by ``closing``); the schema checked.

    Its connections are named ``noetl-pgworker@<incarnation>:<worker id>``; a lost one is
    replaced at a steady pace (``netguard.PacedPool``)."""
    s = settings
    kwargs = {
        **connect_kwargs(
            application_name("", s.worker_id, incarnation or new_token()),
            s.connect_timeout,
            s.pool_mode,
            dsn=s.dsn,
            network_timeout=s.network_timeout,
        ),
        **worker_session_kwargs(s.dsn, s.pool_mode, s.network_timeout),
    }
    pool: ConnectionPool[Any] = PacedPool(
        s.dsn,
        min_size=3,
        max_size=4,
        kwargs=kwargs,
        name="noetl-pgworker",
        open=False,
        timeout=30,
        reconnect_timeout=RECONNECT_FOREVER,
        configure=lambda conn: apply_session_settings(conn, s.pool_mode),
    )
    try:
        pool.open(wait=True, timeout=s.connect_timeout + 1)
    except PoolTimeout as exc:
        pool.close(timeout=1)
        probe = _probe_error(s.dsn, kwargs)
        raise DatabaseUnavailable(f"cannot connect to {redact_dsn(s.dsn)}: {probe}") from exc
    closing.callback(pool.close, timeout=5)
    if s.verify_schema:
        with wrap_errors(s.dsn, "checking the schema"), pool.connection(timeout=10) as conn:
            schema.require(conn)
    return pool


def log_pool_mode(settings: Settings, *, listens: bool, session_locks: bool) -> None:
    """Say once at start how the worker reaches PostgreSQL and what that costs."""
    s = settings
    if s.pool_mode == "direct":
        logger.info(
            "pool mode direct: --dsn connects to PostgreSQL itself", extra={"action": "pool"}
        )
        return
    how = (
        "pool mode session: --dsn goes through a session-pooling proxy (no `options`"
        " startup parameter)"
        if s.pool_mode == "session"
        else "pool mode transaction: --dsn goes through a transaction-pooling proxy"
        " (no server-side prepared statements, nothing kept between transactions)"
    )
    if s.pool_mode == "transaction" and s.session_dsn:
        how += f"; LISTEN and the claim session over --session-dsn {redact_dsn(s.session_dsn)}"
    logger.info(how, extra={"action": "pool"})
    if not listens:
        logger.warning(
            "pool mode transaction without --session-dsn: no LISTEN (a proxy that pools"
            " transactions cannot deliver notifications); new commands are found by polling"
            " every %.1f s",
            s.poll_interval,
            extra={"action": "pool_polling"},
        )
    if not session_locks:
        logger.warning(
            "pool mode transaction without --session-dsn: claimed commands hold no session"
            " lock (NoETL's server could claim one in the moment after our claim commits),"
            " and one process per --worker-id is not enforced",
            extra={"action": "pool_no_session_locks"},
        )


def _probe_error(dsn: str, kwargs: dict[str, Any]) -> str:
    """Why a connection with the pool's parameters fails, in one line (the pool only says it
    timed out), with the fix when a pooler refused the worker's startup ``options``."""
    try:
        psycopg.connect(dsn, **kwargs).close()
    except psycopg.Error as exc:
        why = redact_text(first_line(exc), dsn)
        if "unsupported startup parameter" in why:
            why += (
                " -- --dsn goes through a pooler (PgBouncer), which refuses the `options` the"
                " worker sends to PostgreSQL: start it with --pool-mode session (or"
                " transaction; see the README, 'Where PostgreSQL runs')"
            )
        return why
    return "timed out"
