"""Connections: opening them, naming them, redacting them, and wrapping driver errors once."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any, Literal

import psycopg
from psycopg import conninfo, sql
from psycopg_pool import PoolTimeout

from .errors import DatabaseUnavailable, ItemRefused, PgWorkerError, RetryLater

# libpq keywords whose values are secrets.
_SECRET_KEYS = {"password", "sslpassword"}
# scheme://userinfo@ — userinfo runs to the last "@" before the path (libpq and URL parsers
# stop the authority at "/"); it may not span whitespace or quotes.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/\s\"'<>]*)@", re.I)
# password=… in a query string (ends at "&") or in a keyword/value DSN (a quoted value, or
# one word); the keyword may be spelled with spaces around "=" (libpq accepts both).
_QUERY_PASSWORD = re.compile(r"(?i)(?<=[?&])((?:ssl)?password=)[^&#\s\"'<>]*")
_KEYWORD_PASSWORD = re.compile(r"(?i)\b((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s'&]+)")
_NAME_ONLY_SCHEMES = ("postgres://", "postgresql://")

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


def redact_secrets(text: str) -> str:
    """``text`` with every URL password and ``password=`` value replaced by ``***``.

    For any text that is logged or stored: libpq quotes a DSN it cannot parse whole, and tools
    and drivers put URLs in their messages. A URL's user name stays (``user:***@``) for
    PostgreSQL URLs; other schemes lose their whole user information (it may be a token).
    """

    def userinfo(m: re.Match[str]) -> str:
        scheme, info = m["scheme"], m["userinfo"]
        if ":" in info:
            return f"{scheme}{info.split(':', 1)[0]}:***@"
        if scheme.lower() in _NAME_ONLY_SCHEMES:
            return m[0]
        return f"{scheme}***@"

    text = _URL_USERINFO.sub(userinfo, text)
    text = _QUERY_PASSWORD.sub(r"\1***", text)
    return _KEYWORD_PASSWORD.sub(r"\1***", text)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, in URL or keyword form."""
    if not dsn:
        return "(libpq defaults / PG* environment)"
    if "://" in dsn:
        return redact_secrets(dsn)
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return redact_secrets(dsn)
    return conninfo.make_conninfo(
        **{k: ("***" if k in _SECRET_KEYS else str(v)) for k, v in params.items() if v is not None}
    )


def dsn_password(dsn: str) -> str | None:
    """The DSN's password, also from a DSN that libpq cannot parse (to remove it from text)."""
    if not dsn:
        return None
    try:
        password = conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        password = None
    if password:
        return str(password)
    # Not parseable, or parsed otherwise than meant (a "/" in a URL's password ends libpq's
    # user information): the text between "://" and the last "@", after the first ":".
    m = re.search(r"://([^\s@]*)@", dsn)
    if m and ":" in m[1]:
        return m[1].split(":", 1)[1] or None
    k = _KEYWORD_PASSWORD.search(dsn) or _QUERY_PASSWORD.search(dsn)
    if k is None:
        return None
    return dsn[k.end(1) : k.end()].strip("'") or None


def redact_text(text: str, dsn: str) -> str:
    """Remove the DSN's password, and any other URL or keyword password, from a message."""
    password = dsn_password(dsn)
    if password:
        text = text.replace(password, "***")
    return redact_secrets(text)


#: How the worker's connections reach PostgreSQL (``--pool-mode``): ``direct``, or through a
#: pooling proxy such as PgBouncer that pools ``session``s or ``transaction``s.
PoolMode = Literal["direct", "session", "transaction"]
POOL_MODES: tuple[PoolMode, ...] = ("direct", "session", "transaction")


def connect_kwargs(
    application_name: str, connect_timeout: float, pool_mode: PoolMode = "direct"
) -> dict[str, Any]:
    """Connection parameters added to the user's DSN (which libpq reads untouched).

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
        # A dead peer is noticed within about half a minute instead of the kernel's hours.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
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


def worker_session_kwargs(dsn: str, pool_mode: PoolMode) -> dict[str, Any]:
    """``options`` for the worker's own sessions, added to what the DSN's ``options`` hold;
    nothing through a pooler (PgBouncer refuses an ``options`` startup parameter)."""
    if pool_mode != "direct":
        return {}
    try:
        given = conninfo.conninfo_to_dict(dsn).get("options") if dsn else None
    except psycopg.ProgrammingError:
        given = None
    ours = " ".join(f"-c {k}={v}" for k, v in WORKER_SESSION_SETTINGS.items())
    return {"options": f"{given} {ours}" if given else ours}


def connect(
    dsn: str,
    *,
    application_name: str = "noetl-pgworker",
    connect_timeout: float = 10.0,
    autocommit: bool = False,
) -> psycopg.Connection[Any]:
    """Open one connection; an unreachable database raises :class:`DatabaseUnavailable`.

    It prepares no statement on the server: these connections (the CLI's, the listener's)
    gain nothing from it, and they may go through a transaction-pooling proxy.
    """
    kwargs = {**connect_kwargs(application_name, connect_timeout), "prepare_threshold": None}
    try:
        return psycopg.connect(dsn, autocommit=autocommit, **kwargs)
    except psycopg.Error as exc:
        raise DatabaseUnavailable(
            f"cannot connect to {redact_dsn(dsn)}: {redact_text(first_line(exc), dsn)}"
        ) from exc


@contextlib.contextmanager
def wrap_errors(dsn: str, doing: str) -> Iterator[None]:
    """Turn driver errors into :class:`PgWorkerError` with one readable line."""
    try:
        yield
    except PgWorkerError:
        raise
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
