"""auth keys resolved by NoETL's server, as its own worker resolves them."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from noetl_pgworker.credentials import EnvCredentials
from noetl_pgworker.errors import CredentialError
from noetl_pgworker.server_credentials import (
    CredentialNotFound,
    ServerCredentials,
    credential_from,
    normalise,
)

PG_BODY = {
    "name": "pg_k8s",
    "type": "postgres",
    "data": {
        "host": "db.svc",
        "port": 5432,
        "user": "noetl",
        "password": "s3cret pass",
        "database": "demo",
    },
}


class Server:
    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[str] = []
        self.down = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(str(request.url))
        if self.down:
            raise httpx.ConnectError("refused")
        key = request.url.path.rsplit("/", 1)[1]
        answer = self.answers.get(key)
        if isinstance(answer, int):
            return httpx.Response(answer)
        if answer is None:
            return httpx.Response(404, json={"detail": "not found"})
        return httpx.Response(200, content=json.dumps(answer))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def provider(server: Server, clock: Clock | None = None, **kw: Any) -> ServerCredentials:
    return ServerCredentials(
        "http://noetl:8082/",
        transport=httpx.MockTransport(server),
        clock=clock or Clock(),
        sleep=lambda s: None,
        **kw,
    )


def test_a_postgres_credential_becomes_a_quoted_dsn() -> None:
    server = Server({"pg_k8s": PG_BODY})
    cred = provider(server).get("pg_k8s")
    assert server.calls == ["http://noetl:8082/api/credentials/pg_k8s?include_data=true"]
    assert cred.dsn == (
        "host=db.svc port=5432 user=noetl password='s3cret pass' dbname=demo connect_timeout=10"
    )
    assert "s3cret" not in repr(cred)


@pytest.mark.parametrize(
    ("body", "dsn"),
    [
        ({"data": {"data": {"dsn": "postgresql://a@b/c"}}}, "postgresql://a@b/c"),
        ({"service": "postgres", "data": {"db_host": "h", "db_name": "d"}}, "host=h dbname=d"),
        ({"data": {"pg_host": "h", "db_user": "u"}}, "host=h user=u"),
    ],
)
def test_noetls_shapes_and_field_names(body: dict[str, Any], dsn: str) -> None:
    cred = credential_from("k", normalise("k", body))
    assert cred.dsn == dsn + ("" if "://" in dsn else " connect_timeout=10")


def test_other_credentials_give_tokens_headers_or_basic_auth() -> None:
    bearer = credential_from("t", normalise("t", {"type": "bearer", "data": {"token": "tok"}}))
    assert bearer.token == "tok" and bearer.dsn is None
    key = {"type": "api_key", "data": {"api_key": "k-1", "header_name": "X-Key"}}
    assert credential_from("a", normalise("a", key)).headers == {"X-Key": "k-1"}
    basic = credential_from("b", normalise("b", {"data": {"username": "u", "password": "p"}}))
    assert (basic.username, basic.password) == ("u", "p")


def test_local_aliases_win_and_unknown_keys_say_so() -> None:
    server = Server({"pg_k8s": PG_BODY})
    local = EnvCredentials({"NOETL_PGWORKER_CREDENTIAL_PG_K8S": "postgresql://local/db"})
    creds = provider(server, local=local)
    assert creds.get("pg_k8s").dsn == "postgresql://local/db" and server.calls == []
    with pytest.raises(CredentialNotFound, match="unknown credential 'nope'"):
        creds.get("nope")


def test_cached_for_five_minutes_then_refetched_and_stale_when_the_server_is_down() -> None:
    server = Server({"pg_k8s": PG_BODY})
    clock = Clock()
    creds = provider(server, clock)
    first = creds.get("pg_k8s")
    clock.now = 299
    assert creds.get("pg_k8s") is first and len(server.calls) == 1
    clock.now = 301
    creds.get("pg_k8s")
    assert len(server.calls) == 2
    server.down = True
    clock.now = 1000
    assert creds.get("pg_k8s").dsn == first.dsn  # stale copy
    assert len(server.calls) == 5  # three tries
    with pytest.raises(CredentialError, match="unreachable") as failed:
        creds.get("other")
    assert "s3cret" not in str(failed.value)


def test_server_errors_are_retried_then_reported_without_the_body() -> None:
    server = Server({"k": 503})
    with pytest.raises(CredentialError, match="answered 503"):
        provider(server).get("k")
    assert len(server.calls) == 3
