"""Secrets out of text: passwords in DSNs, URLs and messages, before anything is logged or stored.

A leaf module: it imports nothing of the package, so that every layer (models, logging, the
database, the tools) may use it.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import conninfo

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
