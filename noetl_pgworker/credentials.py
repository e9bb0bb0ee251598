"""Credentials for tools: ``auth`` aliases resolved to DSNs, headers or tokens.

A provider maps an alias to a :class:`Credential`. The one that ships reads a JSON file named
by ``NOETL_PGWORKER_CREDENTIALS`` (``{"alias": {"dsn": …} | {"headers": {…}} | {"token": …}}``)
and, for single aliases, ``NOETL_PGWORKER_CREDENTIAL_<ALIAS>`` variables holding the same JSON
or a bare DSN. Values never reach logs, errors or event payloads: tools use them, report only
the alias, and scrub the values from what they return (a server may echo them back). An alias
is sent only to the hosts it names: ``"allowed_hosts": ["api.example.com", "*.example.org"]``,
else the host of its ``base_url`` (or ``url``/``endpoint``), else its DSN's hosts; an alias
that names none is never attached to a request.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .errors import ConfigError, CredentialError
from .redact import dsn_password

_ENV_FILE = "NOETL_PGWORKER_CREDENTIALS"
_ENV_PREFIX = "NOETL_PGWORKER_CREDENTIAL_"
#: Secret values shorter than this are not scrubbed from tool output.
MIN_SCRUBBED = 4


@dataclass(frozen=True, slots=True, repr=False)
class Credential:
    alias: str
    dsn: str | None = None
    token: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    username: str | None = None
    password: str | None = None
    #: hosts this credential may be sent to (``*.example.com`` matches subdomains); None or
    #: empty: none (it is never attached to a request)
    allowed_hosts: tuple[str, ...] | None = None

    def __repr__(self) -> str:  # never print the secret parts
        return f"Credential(alias={self.alias!r})"

    def secrets(self) -> list[str]:
        """Every secret value, and the forms a server may echo them in, longest first."""
        values = [self.dsn, dsn_password(self.dsn or ""), self.token, self.password]
        values += self.headers.values()
        if self.username is not None and self.password:
            values.append(base64.b64encode(f"{self.username}:{self.password}".encode()).decode())
        # A value too short to hide anything would only garble the output it is scrubbed from.
        found = {v for v in values if v and len(v) >= MIN_SCRUBBED}
        return sorted(found, key=len, reverse=True)

    def scrub(self, value: Any) -> Any:
        """``value`` (JSON-like) with every secret of this credential replaced by ``***``."""
        secrets = self.secrets()
        if not secrets:
            return value
        pattern = re.compile("|".join(re.escape(s) for s in secrets))

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                return pattern.sub("***", v)
            if isinstance(v, dict):
                return {walk(k): walk(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [walk(x) for x in v]
            return v

        return walk(value)

    def allows_host(self, host: str) -> bool:
        if not self.allowed_hosts:
            return False
        host = host.lower().rstrip(".")
        return any(
            host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:]))
            for allowed in self.allowed_hosts
        )

    def refusal(self, host: str) -> str:
        """Why this credential is not sent to ``host`` (see :meth:`allows_host`)."""
        if not self.allowed_hosts:
            return (
                f"credential {self.alias!r} names no host it may be sent to: give it"
                " allowed_hosts (or a base_url)"
            )
        return (
            f"credential {self.alias!r} may not be sent to {host!r} (its allowed_hosts:"
            f" {', '.join(self.allowed_hosts)})"
        )

    @classmethod
    def parse(cls, alias: str, value: Any) -> Credential:
        if isinstance(value, str):
            return cls(alias=alias, dsn=value, allowed_hosts=dsn_hosts(value))
        if not isinstance(value, dict):
            raise ConfigError(f"credential {alias!r} must be a JSON object or a DSN string")
        headers = value.get("headers") or {}
        if not isinstance(headers, dict):
            raise ConfigError(f"credential {alias!r}: headers must be an object")
        dsn = value.get("dsn") or value.get("connection_string")
        hosts = value.get("allowed_hosts")
        if hosts is None:
            hosts = list(bound_hosts(value, str(dsn) if dsn else None)) or None
        if isinstance(hosts, str):
            hosts = [h.strip() for h in hosts.split(",") if h.strip()]
        if hosts is not None and (
            not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts)
        ):
            raise ConfigError(f"credential {alias!r}: allowed_hosts must be a list of host names")
        return cls(
            alias=alias,
            dsn=str(dsn) if dsn else None,
            token=str(value["token"]) if value.get("token") else None,
            headers={str(k): str(v) for k, v in headers.items()},
            username=value.get("username"),
            password=value.get("password"),
            allowed_hosts=None if hosts is None else tuple(h.lower() for h in hosts),
        )


def dsn_hosts(dsn: str) -> tuple[str, ...]:
    """The hosts a PostgreSQL connection string names (none for a socket or a bad DSN)."""
    try:
        hosts = conninfo_to_dict(dsn).get("host") or ""
    except psycopg.ProgrammingError:
        return ()
    return tuple(h.strip().lower() for h in str(hosts).split(",") if h.strip() and "/" not in h)


#: Where a credential names the service it belongs to (its host is where it may go).
URL_FIELDS = ("base_url", "url", "endpoint", "api_url", "server_url")


def bound_hosts(record: Mapping[str, Any], dsn: str | None = None) -> tuple[str, ...]:
    """The hosts a credential record is bound to when it names no ``allowed_hosts``: its
    DSN's hosts, or the host of its ``base_url`` (``url``, ``endpoint``…)."""
    if dsn:
        return dsn_hosts(dsn)
    for name in URL_FIELDS:
        value = record.get(name)
        if isinstance(value, str) and value:
            host = urlsplit(value if "//" in value else f"//{value}").hostname
            if host:
                return (host.lower(),)
    return ()


class CredentialProvider(Protocol):
    def get(self, alias: str) -> Credential:
        """The credential for ``alias``; raise :class:`CredentialError` when there is none."""
        ...


class EnvCredentials:
    """Aliases from ``NOETL_PGWORKER_CREDENTIALS`` (a JSON file) and ``…_CREDENTIAL_<ALIAS>``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self._file: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _from_file(self) -> dict[str, Any]:
        with self._lock:
            if self._file is None:
                path = self._environ.get(_ENV_FILE)
                if not path:
                    self._file = {}
                else:
                    try:
                        data = json.loads(Path(path).read_text(encoding="utf-8"))
                    except (OSError, json.JSONDecodeError) as exc:
                        raise ConfigError(f"cannot read credentials file {path}: {exc}") from exc
                    if not isinstance(data, dict):
                        raise ConfigError(f"credentials file {path} must hold a JSON object")
                    self._file = data
            return self._file

    def check(self) -> None:
        """Fail early (at start-up) on an unreadable credentials file."""
        self._from_file()

    def get(self, alias: str) -> Credential:
        env_name = _ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", alias).upper()
        raw = self._environ.get(env_name)
        if raw is not None:
            try:
                value: Any = json.loads(raw)
            except json.JSONDecodeError:
                value = raw  # a bare DSN
            return Credential.parse(alias, value)
        data = self._from_file()
        if alias in data:
            return Credential.parse(alias, data[alias])
        raise CredentialError(
            f"unknown credential alias {alias!r} (define it in the {_ENV_FILE} file or in"
            f" {env_name})"
        )


def auth_alias(config: Mapping[str, Any]) -> str | None:
    """The alias named by a tool's ``auth`` key (a string, or ``{"alias"|"key"|"name": …}``)."""
    auth = config.get("auth")
    if auth is None:
        return None
    if isinstance(auth, str):
        return auth
    if isinstance(auth, dict):
        for key in ("alias", "key", "name", "credential"):
            if isinstance(auth.get(key), str):
                return str(auth[key])
    raise CredentialError("auth must be an alias name or an object with an `alias`")
