"""Connections: opening them, naming them, and wrapping driver errors once (redacted)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import psycopg
from psycopg import conninfo, sql
from psycopg_pool import PoolTimeout

from . import netguard
from .errors import DatabaseUnavailable, ItemRefused, PgWorkerError, RetryLater
from .netguard import DEFAULT_NETWORK_TIMEOUT
from .redact import redact_dsn, redact_text

#: Exceptions that mean "the database is not there right now" rather than "the SQL is wrong".
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.errors.AdminShutdown,
    psycopg.errors.CannotConnectNow,
    psycopg.errors.ConnectionFailure,
)
#: Transient errors, and a pool that could not hand out a connection in time.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, PoolTimeout)

#: SQLSTATE classes that say "this row's data is refused": only these fail an item. Every
#: other database error (connection 08, read-only transaction 25 during a failover,
#: serialization 40, resources 53, lock timeout 55, operator intervention 57, system 58, …)
#: says nothing against the item, and is retried.
ITEM_ERROR_CLASSES = frozenset({"22", "23"})


def is_item_error(exc: BaseException) -> bool:
    """True when the database refused this particular data (SQLSTATE class 22 or 23)."""
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state:
        return state[:2] in ITEM_ERROR_CLASSES
    return isinstance(exc, psycopg.DataError | psycopg.IntegrityError)


def is_retryable(exc: BaseException) -> bool:
    """A database error worth retrying later: anything but an item's own data error."""
    if isinstance(exc, RETRYABLE_ERRORS):
        return True
    return isinstance(exc, psycopg.Error) and not is_item_error(exc)


#: How the worker's connections reach PostgreSQL (``--pool-mode``): ``direct``, or through a
#: pooling proxy such as PgBouncer that pools ``session``s or ``transaction``s.
PoolMode = Literal["direct", "session", "transaction"]
POOL_MODES: tuple[PoolMode, ...] = ("direct", "session", "transaction")


def connect_kwargs(
    application_name: str,
    connect_timeout: float,
    pool_mode: PoolMode = "direct",
    *,
    dsn: str = "",
    network_timeout: float = DEFAULT_NETWORK_TIMEOUT,
) -> dict[str, Any]:
    """Connection parameters added to the user's DSN (which libpq reads untouched).

    A dead peer is noticed within about ``network_timeout`` seconds (keepalives and
    ``tcp_user_timeout``, ``netguard.py``), unless ``dsn`` sets those itself.

    Through a pooler (``session``, ``transaction``) only startup parameters PgBouncer accepts
    are sent: no ``options`` (PgBouncer refuses unknown startup parameters; a setting the
    worker needs there goes per transaction, ``SET LOCAL``). Through ``transaction`` pooling
    no server-side prepared statement is made (``prepare_threshold=None``): consecutive
    transactions of one connection run on different server connections, which neither have
    nor keep the statements this connection prepared.
    """
    kwargs: dict[str, Any] = {
        "application_name": application_name[:63],
        "connect_timeout": max(1, int(connect_timeout)),
        **netguard.client_kwargs(dsn, network_timeout),
    }
    if pool_mode == "transaction":
        kwargs["prepare_threshold"] = None
    return kwargs


#: Set on the worker's own sessions (direct mode): no statement of the worker waits behind a
#: table lock or runs unbounded, and a role's or database's shorter setting (which would make a
#: claim or a write fail for ever) is overridden. Startup options win over ALTER ROLE/DATABASE.
WORKER_SESSION_SETTINGS = {
    "lock_timeout": "5s",
    "statement_timeout": "60s",
    "idle_in_transaction_session_timeout": "60s",
    # The worker's prepared statements keep one generic plan. Left to choose, PostgreSQL
    # planned the write-back afresh at every execution (a custom plan prunes NoETL's 16
    # command partitions at planning, so the generic plan looked dearer): planning cost as
    # much as executing. The generic plan prunes the same partitions when it runs.
    "plan_cache_mode": "force_generic_plan",
}


def apply_session_settings(conn: psycopg.Connection[Any], pool_mode: PoolMode) -> None:
    """Through a session-pooling proxy (no startup ``options``): set the worker's session
    settings with SET on a new connection, which keeps its server session. Direct sessions
    have them from the startup options; through transaction pooling no session exists."""
    if pool_mode != "session":
        return
    for name, value in WORKER_SESSION_SETTINGS.items():
        conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    if not conn.autocommit:
        conn.commit()


def worker_session_kwargs(
    dsn: str, pool_mode: PoolMode, network_timeout: float = DEFAULT_NETWORK_TIMEOUT
) -> dict[str, Any]:
    """``options`` for the worker's own sessions, added to what the DSN's ``options`` hold:
    the settings above, and the server's side of the bounds against a silent network (its
    keepalives and ``tcp_user_timeout``, so that the server ends a session whose client it
    cannot reach, and frees its locks). Nothing through a pooler (PgBouncer refuses an
    ``options`` startup parameter)."""
    if pool_mode != "direct":
        return {}
    try:
        given = conninfo.conninfo_to_dict(dsn).get("options") if dsn else None
    except psycopg.ProgrammingError:
        given = None
    settings = {**WORKER_SESSION_SETTINGS, **netguard.server_settings(network_timeout)}
    ours = " ".join(f"-c {k}={v}" for k, v in settings.items())
    return {"options": f"{given} {ours}" if given else ours}


def connect(
    dsn: str,
    *,
    application_name: str = "noetl-pgworker",
    connect_timeout: float = 10.0,
    autocommit: bool = False,
    network_timeout: float = DEFAULT_NETWORK_TIMEOUT,
    extra: dict[str, Any] | None = None,
) -> psycopg.Connection[Any]:
    """Open one connection; an unreachable database raises :class:`DatabaseUnavailable`.

    It prepares no statement on the server: these connections (the CLI's, the listener's)
    gain nothing from it, and they may go through a transaction-pooling proxy. ``extra``:
    more connection parameters (e.g. :func:`worker_session_kwargs`).
    """
    kwargs = {
        **connect_kwargs(
            application_name, connect_timeout, dsn=dsn, network_timeout=network_timeout
        ),
        "prepare_threshold": None,
        **(extra or {}),
    }
    try:
        return psycopg.connect(dsn, autocommit=autocommit, **kwargs)
    except psycopg.Error as exc:
        raise DatabaseUnavailable(
            f"cannot connect to {redact_dsn(dsn)}: {redact_text(first_line(exc), dsn)}"
        ) from exc


#: What a database without NoETL's tables or the worker's objects answers.
NO_SCHEMA_ERRORS = (
    psycopg.errors.UndefinedTable,
    psycopg.errors.InvalidSchemaName,
    psycopg.errors.UndefinedFunction,
)


@contextlib.contextmanager
def wrap_errors(dsn: str, doing: str) -> Iterator[None]:
    """Turn driver errors into :class:`PgWorkerError` with one readable line."""
    try:
        yield
    except PgWorkerError:
        raise
    except NO_SCHEMA_ERRORS as exc:
        raise PgWorkerError(
            f"{doing}: {redact_text(first_line(exc), dsn)} in the database {redact_dsn(dsn)};"
            " run `noetl-pgworker schema apply` there (with --with-noetl-tables if it has no"
            " NoETL tables)"
        ) from exc
    except TRANSIENT_ERRORS as exc:
        raise DatabaseUnavailable(
            f"{doing}: database unavailable ({redact_dsn(dsn)}):"
            f" {redact_text(first_line(exc), dsn)}"
        ) from exc
    except psycopg.Error as exc:
        raise PgWorkerError(f"{doing}: {redact_text(first_line(exc), dsn)}") from exc


@contextlib.contextmanager
def write_errors() -> Iterator[None]:
    """A sink's database errors as the package's: an item's own data error (SQLSTATE class 22
    or 23) refuses it (:class:`ItemRefused`); every other one is retried (:class:`RetryLater`)."""
    try:
        yield
    except (psycopg.Error, PoolTimeout) as exc:
        if is_retryable(exc):
            raise RetryLater(first_line(exc)) from exc
        raise ItemRefused(f"outcome could not be stored: {first_line(exc)}") from exc


def pooler_hint(exc: BaseException) -> str:
    """A hint when an error says that --dsn goes through transaction pooling unannounced.

    psycopg names its prepared statements ``_pg3_<n>``; a statement that "already exists" or
    "does not exist" on the server means the connection's transactions run on different server
    connections.
    """
    if (
        isinstance(exc, psycopg.Error)
        and exc.sqlstate in ("42P05", "26000")
        and "_pg3_" in str(exc)
    ):
        return (
            "; --dsn seems to go through a transaction-pooling proxy (PgBouncer"
            " pool_mode=transaction): start the worker with --pool-mode transaction"
        )
    return ""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
