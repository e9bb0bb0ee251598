"""Credentials kept by NoETL's server, for ``auth`` keys this worker does not define itself.

NoETL's own worker resolves a tool's ``auth`` key with ``GET {server}/api/credentials/{key}
?include_data=true``; :class:`ServerCredentials` does the same, in server mode, after the
worker's own aliases (:class:`~noetl_pgworker.credentials.EnvCredentials`), which win. As
NoETL's worker does, it caches what it got for five minutes, tries three times, and falls back
to an expired entry when the server cannot be reached.

The server's answer is normalised as NoETL normalises it: the payload is ``data.data`` or
``data``, the service ``service``/``provider``/``kind`` (else guessed from ``type``). A
postgres credential becomes a DSN (``dsn``/``connection_string``/``db_conn_string`` as given,
else built from ``host|db_host|pg_host``, ``port|db_port``, ``user|username|db_user``,
``password|db_password``, ``database|dbname|db_name``, ``sslmode``); other credentials give a
bearer ``token`` (``token``/``access_token``/``bearer_token``), ``headers`` (and ``api_key``
under ``header_name``) or ``username``/``password``. Secret values are never logged nor put in
an error message. A credential is bound to the hosts it names (``allowed_hosts``, else the
host of its ``base_url``/``url``/``endpoint``, or for a postgres credential its DSN's hosts):
the http tool refuses to send one that names none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import httpx
from psycopg.conninfo import make_conninfo

from .credentials import Credential, CredentialProvider, bound_hosts
from .errors import CredentialError

logger = logging.getLogger(__name__)

CACHE_SECONDS = 300.0
FETCH_TRIES = 3
FETCH_BACKOFF = 0.2
FETCH_TIMEOUT = 5.0

_POSTGRES_FIELDS = {
    "host": ("host", "db_host", "pg_host"),
    "port": ("port", "db_port"),
    "user": ("user", "username", "db_user"),
    "password": ("password", "db_password"),
    "dbname": ("database", "dbname", "db_name"),
    "sslmode": ("sslmode",),
}


def normalise(key: str, body: Any) -> dict[str, Any]:
    """NoETL's credential record: ``{key, type, service, data, **data}``."""
    body = body if isinstance(body, dict) else {}
    data = body.get("data") or {}
    payload = (
        data.get("data") if isinstance(data, dict) and isinstance(data.get("data"), dict) else data
    )
    payload = payload if isinstance(payload, dict) else {}
    record: dict[str, Any] = {
        "key": key,
        "type": str(body.get("type") or body.get("credential_type") or "").lower(),
        "service": str(
            body.get("service") or body.get("provider") or body.get("kind") or ""
        ).lower(),
        "data": payload,
    }
    for name, value in payload.items():
        record.setdefault(name, value)
    if not record["service"]:
        for service in ("postgres", "gcs", "s3", "azure"):
            if service in record["type"]:
                record["service"] = service
                break
    return record


def _first(record: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if record.get(name) is not None and record.get(name) != "":
            return record[name]
    return None


def credential_from(key: str, record: Mapping[str, Any]) -> Credential:
    """A normalised record as a :class:`Credential` this worker's tools use."""
    dsn = _first(record, ("dsn", "connection_string", "db_conn_string"))
    is_postgres = record.get("service") == "postgres" or "postgres" in str(record.get("type"))
    if dsn is None and (is_postgres or _first(record, ("db_host", "pg_host", "db_name"))):
        parts = {name: _first(record, names) for name, names in _POSTGRES_FIELDS.items()}
        parts = {name: str(value) for name, value in parts.items() if value is not None}
        if parts:
            dsn = make_conninfo(**parts, connect_timeout="10")
    if dsn is not None:
        return Credential(alias=key, dsn=str(dsn), allowed_hosts=bound_hosts(record, str(dsn)))
    headers_value = record.get("headers")
    headers = (
        {str(k): str(v) for k, v in headers_value.items()}
        if isinstance(headers_value, dict)
        else {}
    )
    api_key = record.get("api_key")
    if api_key is not None:
        headers[str(record.get("header_name") or "X-API-Key")] = str(api_key)
    token = _first(record, ("token", "access_token", "bearer_token"))
    username = _first(record, ("username", "user"))
    password = record.get("password")
    return Credential(
        alias=key,
        allowed_hosts=_allowed_hosts(record),
        token=str(token) if token is not None else None,
        headers=headers,
        username=str(username) if username is not None and password is not None else None,
        password=str(password) if username is not None and password is not None else None,
    )


def _allowed_hosts(record: Mapping[str, Any]) -> tuple[str, ...]:
    """The record's ``allowed_hosts`` (a list, or a comma-separated string), else the host of
    its ``base_url``/``url``/``endpoint``: where it may be sent."""
    hosts = record.get("allowed_hosts")
    if isinstance(hosts, str):
        hosts = hosts.split(",")
    if isinstance(hosts, list):
        return tuple(str(h).strip().lower() for h in hosts if str(h).strip())
    return bound_hosts(record)


class CredentialNotFound(CredentialError):
    """NoETL's server has no credential of this name."""

    error_type = "credentials"


class ServerCredentials:
    """``auth`` keys: the worker's own aliases first (``local``), then NoETL's server."""

    def __init__(  # noqa: PLR0913 — keyword-only settings, each with a default
        self,
        base_url: str,
        *,
        local: CredentialProvider | None = None,
        cache_seconds: float = CACHE_SECONDS,
        tries: int = FETCH_TRIES,
        backoff: float = FETCH_BACKOFF,
        timeout: float = FETCH_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._local = local
        self._cache_seconds = cache_seconds
        self._tries = max(1, tries)
        self._backoff = backoff
        self._clock = clock
        self._sleep = sleep
        self._cache: dict[str, tuple[float, Credential]] = {}
        self._lock = threading.Lock()
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": "noetl-pgworker"},
        )

    def close(self) -> None:
        self._client.close()

    def get(self, alias: str) -> Credential:
        if self._local is not None:
            try:
                return self._local.get(alias)
            except CredentialError:
                pass
        now = self._clock()
        with self._lock:
            cached = self._cache.get(alias)
        if cached is not None and now - cached[0] <= self._cache_seconds:
            return cached[1]
        try:
            credential = self._fetch(alias)
        except CredentialError as exc:
            if cached is not None and not isinstance(exc, CredentialNotFound):
                logger.warning(
                    "credential %r: %s; using the copy fetched %.0f s ago",
                    alias,
                    exc.message,
                    now - cached[0],
                    extra={"action": "credential_stale"},
                )
                return cached[1]
            raise
        with self._lock:
            self._cache[alias] = (self._clock(), credential)
        return credential

    def _fetch(self, key: str) -> Credential:
        path = f"/api/credentials/{quote(key, safe='')}"
        reason = ""
        for attempt in range(1, self._tries + 1):
            try:
                resp = self._client.get(path, params={"include_data": "true"})
            except httpx.HTTPError as exc:
                reason = f"NoETL server {self.base_url} unreachable ({type(exc).__name__})"
            else:
                if resp.status_code == 200:
                    try:
                        body = resp.json()
                    except ValueError:
                        reason = "NoETL server answered with something other than JSON"
                    else:
                        return credential_from(key, normalise(key, body))
                elif resp.status_code == 404:
                    raise CredentialNotFound(
                        f"unknown credential {key!r}: not among this worker's aliases, and"
                        " NoETL's server has no credential of that name"
                    )
                else:
                    reason = f"NoETL server answered {resp.status_code}"
            if attempt < self._tries and self._backoff > 0:
                self._sleep(self._backoff * 2 ** (attempt - 1))
        raise CredentialError(f"credential {key!r}: {reason}")


__all__ = ["CredentialNotFound", "ServerCredentials", "credential_from", "normalise"]
