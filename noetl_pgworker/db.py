"""Connections: opening them, naming them, redacting them, and wrapping driver errors once."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg_pool import PoolTimeout

from .errors import DatabaseUnavailable, PgWorkerError

# libpq keywords whose values are secrets.
_SECRET_KEYS = {"password", "sslpassword"}
_URL_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<tail>@)", re.I
)

#: Exceptions that mean "the database is not there right now" rather than "the SQL is wrong".
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.errors.AdminShutdown,
    psycopg.errors.CannotConnectNow,
    psycopg.errors.ConnectionFailure,
)
#: Transient errors, and a pool that could not hand out a connection in time.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, PoolTimeout)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, in URL or keyword form."""
    if not dsn:
        return "(libpq defaults / PG* environment)"
    if "://" in dsn:
        redacted = _URL_PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", dsn)
        return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", redacted)
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return re.sub(r"(?i)(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn)
    return conninfo.make_conninfo(
        **{k: ("***" if k in _SECRET_KEYS else str(v)) for k, v in params.items() if v is not None}
    )


def redact_text(text: str, dsn: str) -> str:
    """Remove the DSN's password from a message (driver errors sometimes quote it)."""
    try:
        password = conninfo.conninfo_to_dict(dsn).get("password") if dsn else None
    except psycopg.ProgrammingError:
        password = None
    if password:
        text = text.replace(str(password), "***")
    return text


def connect_kwargs(application_name: str, connect_timeout: float) -> dict[str, Any]:
    """Connection parameters added to the user's DSN (which libpq reads untouched)."""
    return {
        "application_name": application_name[:63],
        "connect_timeout": max(1, int(connect_timeout)),
        # A dead peer is noticed within about half a minute instead of the kernel's hours.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }


def connect(
    dsn: str,
    *,
    application_name: str = "noetl-pgworker",
    connect_timeout: float = 10.0,
    autocommit: bool = False,
) -> psycopg.Connection[Any]:
    """Open one connection; an unreachable database raises :class:`DatabaseUnavailable`."""
    try:
        return psycopg.connect(
            dsn, autocommit=autocommit, **connect_kwargs(application_name, connect_timeout)
        )
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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
