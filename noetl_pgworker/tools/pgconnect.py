"""Connecting a tool to PostgreSQL without lending the worker's identity.

libpq fills every connection option a connection string leaves out from the process's ``PG*``
environment variables, from a service file (``PGSERVICE``), from ``~/.pgpass`` (or
``PGPASSFILE``) and from ``~/.postgresql/postgresql.{crt,key}``. For the worker's own
connections that is the point; for a command's ``connection_string`` it would send the
worker's password, user name or client certificate to whatever host the command names.

:func:`tool_conninfo` therefore gives libpq every option explicitly: what the command (or its
``auth`` alias) gives, and for everything else a neutral value — an empty password, a password
file and client certificate that do not exist, the compiled-in default otherwise — so that no
environment variable, password file or service file has anything left to fill in. The user is
required. A command may not name local files of the worker (password file, service, client
certificate and key, TLS key log); a credential alias, written by the operator, may.
"""

from __future__ import annotations

from functools import cache

from psycopg import ProgrammingError, pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..errors import ToolError

#: A path that does not exist: libpq finds no password file / certificate there.
NO_FILE = "/nonexistent/noetl-pgworker/none"

#: Options naming files of the worker: a command may not use them (an alias may).
WORKER_FILES = ("passfile", "service", "servicefile", "sslcert", "sslkey", "sslkeylogfile")

#: Neutral explicit values where libpq has no compiled default and refuses an empty string,
#: or where the empty string would mean "look in the worker's home directory".
NEUTRAL = {
    "password": "",
    "passfile": NO_FILE,
    "sslcert": NO_FILE,
    "sslkey": NO_FILE,
    "sslrootcert": NO_FILE,
    "sslcertmode": "allow",
    # A command's connection notices a silent network within about 20 s, as the worker's
    # own do (netguard.py), unless the connection string says otherwise.
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",
    "min_protocol_version": "3.0",
    "max_protocol_version": "3.0",
}

#: Options without an environment variable that only a service file could set, and that
#: accept an empty value (= not set). The rest of them (SCRAM keys) have no neutral explicit
#: value; PGSERVICE could still set those.
EMPTY_OK = (
    "fallback_application_name",
    "sslpassword",
    "replication",
    "oauth_issuer",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_scope",
    "sslkeylogfile",
)


@cache
def _defaults() -> tuple[tuple[str, bool, str | None], ...]:
    """(keyword, has an environment variable, compiled-in default) for every libpq option."""
    out = []
    for opt in pq.Conninfo.get_defaults():
        key = opt.keyword.decode()
        compiled = opt.compiled.decode() if opt.compiled is not None else None
        out.append((key, opt.envvar is not None, compiled))
    return tuple(out)


def tool_conninfo(dsn: str, *, trusted: bool = False, tool: str = "postgres", **extra: str) -> str:
    """``dsn`` with every libpq option given explicitly; raise :class:`ToolError` if the
    command names the worker's files or gives no user. ``trusted``: the DSN is the operator's
    (a credential alias), so it may name files. ``extra`` (e.g. ``application_name``) is
    added unless the DSN gives it."""
    try:
        given = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except ProgrammingError as exc:
        raise ToolError(f"{tool}: invalid connection string: {str(exc).splitlines()[0]}") from None
    if not trusted:
        named = [k for k in WORKER_FILES if given.get(k)]
        if named:
            raise ToolError(
                f"{tool}: the connection string may not use {', '.join(named)}: those name the"
                " worker's own files (use an auth alias)"
            )
    if not given.get("user"):
        raise ToolError(
            f"{tool}: the connection string must name a user (user=… or postgresql://user@…):"
            " the worker does not lend its own"
        )
    params: dict[str, str] = {}
    for key, has_env, compiled in _defaults():
        if key == "service":
            continue  # an empty service is an error; every option it could fill is set here
        if key in NEUTRAL:
            params[key] = NEUTRAL[key]
        elif has_env:
            params[key] = compiled if compiled is not None else ""
        elif key in EMPTY_OK:
            params[key] = ""
    params.update(extra)
    params.update(given)
    return make_conninfo("", **params)
