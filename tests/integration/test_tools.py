"""http against a local server, postgres against the test database, credentials."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from noetl_pgworker.credentials import EnvCredentials
from noetl_pgworker.dispatcher import execute
from noetl_pgworker.models import Command, Outcome
from noetl_pgworker.tools import Confinement, default_registry

pytestmark = pytest.mark.integration

# The test servers listen on loopback: allowed here, as an operator allows it.
REGISTRY = default_registry(confinement=Confinement(http_allow_loopback=True))


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        path = self.path.split("?")[0]
        if path == "/json":
            self._send(200, json.dumps({"hello": "world", "n": [1, 2]}).encode())
        elif path == "/text":
            self._send(200, b"plain text", "text/plain; charset=utf-8")
        elif path == "/404":
            self._send(404, json.dumps({"detail": "nope"}).encode())
        elif path == "/500":
            self._send(500, b"kaput", "text/plain")
        elif path == "/slow":
            time.sleep(3)
            self._send(200, b"{}")
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/json")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:  # /echo
            echo = {
                "method": self.command,
                "path": self.path,
                "body": body,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
            self._send(200, json.dumps(echo).encode())

    do_GET = do_POST = do_PUT = do_DELETE = _handle


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="test-http", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def run(
    kind: str,
    config: dict[str, Any],
    args: dict[str, Any] | None = None,
    credentials: EnvCredentials | None = None,
    timeout: float = 30,
) -> Outcome:
    command = Command(
        command_id="1",
        execution_id=1,
        step="s",
        tool_kind=kind,
        catalog_id=1,
        input={"tool_config": config, "input": args or {}},
    )
    return execute(command, REGISTRY, timeout=timeout, credentials=credentials)


def test_http_json_text_and_redirect(server: str) -> None:
    out = run("http", {"url": f"{server}/json"})
    assert out.ok
    assert out.data["status_code"] == 200 and out.data["data"] == {"hello": "world", "n": [1, 2]}
    assert out.data["headers"]["content-type"] == "application/json"
    assert out.data["url"] == f"{server}/json" and out.data["elapsed"] >= 0
    assert run("http", {"endpoint": f"{server}/text"}).data["data"] == "plain text"
    assert run("http", {"url": f"{server}/redirect"}).data["data"]["hello"] == "world"
    stay = run("http", {"url": f"{server}/redirect", "follow_redirects": False})
    assert not stay.ok and stay.error == "HTTP 302: Found"


def test_http_sends_method_params_headers_and_bodies(server: str) -> None:
    out = run(
        "http",
        {
            "url": f"{server}/echo",
            "method": "post",
            "params": {"q": "1"},
            "headers": {"X-Test": "yes"},
            "payload": {"a": 1},
        },
    )
    echo = out.data["data"]
    assert echo["method"] == "POST" and echo["path"] == "/echo?q=1"
    assert echo["headers"]["x-test"] == "yes" and json.loads(echo["body"]) == {"a": 1}
    form = run("http", {"url": f"{server}/echo", "method": "PUT", "data": {"k": "v"}}).data["data"]
    assert form["body"] == "k=v"


def test_http_and_shell_render_their_templates(server: str) -> None:
    command = Command(
        command_id="1",
        execution_id=1,
        step="s",
        tool_kind="http",
        catalog_id=1,
        input={
            "tool_config": {
                "url": "{{ api.base }}/echo",
                "method": "POST",
                "params": {"page": "{{ iter.page }}"},
                "headers": {"X-Who": "{{ who }}"},
                "payload": {"ids": "{{ ids }}", "n": "{{ input.n }}"},
            },
            "input": {"n": 3},
            "render_context": {
                "api": {"base": server},
                "iter": {"page": 2},
                "who": "ann",
                "ids": [1, 2],
            },
        },
    )
    echo = execute(command, REGISTRY).data["data"]
    assert echo["path"] == "/echo?page=2" and echo["headers"]["x-who"] == "ann"
    assert json.loads(echo["body"]) == {"ids": [1, 2], "n": 3}
    shell = command.model_copy(
        update={
            "tool_kind": "shell",
            "input": {
                "tool_config": {"command": "echo {{ who }} $N", "env": {"N": "{{ iter.page }}"}},
                "render_context": {"who": "ann", "iter": {"page": 2}},
            },
        }
    )
    assert execute(shell, REGISTRY).data["stdout"] == "ann 2\n"


@pytest.mark.parametrize(
    ("path", "error"),
    [("/404", "HTTP 404: Not Found"), ("/500", "HTTP 500: Internal Server Error")],
)
def test_http_non_2xx_fails_and_carries_the_response(server: str, path: str, error: str) -> None:
    out = run("http", {"url": f"{server}{path}"})
    assert not out.ok and out.error == error
    assert out.data["status_code"] == int(path[1:])


def test_http_timeouts_and_refused_connections_are_readable(server: str) -> None:
    t0 = time.monotonic()
    slow = run("http", {"url": f"{server}/slow", "timeout": 0.5})
    assert time.monotonic() - t0 < 2.5
    assert not slow.ok and slow.error_type == "timeout" and "timed out after 0.5 s" in slow.error
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = run("http", {"url": f"http://user:pw-secret@127.0.0.1:{port}/x"})
    assert not refused.ok and "cannot connect to http://***@127.0.0.1" in refused.error
    assert "pw-secret" not in refused.error
    bad = run("http", {"url": "nota://url"})
    assert not bad.ok and bad.error.startswith("http: invalid url")
    assert not run("http", {}).ok


def test_http_auth_alias_sends_credentials_and_never_shows_them(
    server: str, tmp_path: Path
) -> None:
    creds = tmp_path / "creds.json"
    creds.write_text(
        json.dumps(
            {
                "api": {"token": "tok-123", "base_url": server},
                "hdr": {"headers": {"X-Api-Key": "key-456"}, "allowed_hosts": ["127.0.0.1"]},
                "unbound": {"token": "tok-789"},
            }
        )
    )
    provider = EnvCredentials({"NOETL_PGWORKER_CREDENTIALS": str(creds)})
    # sent, and scrubbed from the echo that comes back
    out = run("http", {"url": f"{server}/echo", "auth": "api"}, credentials=provider)
    assert out.data["data"]["headers"]["authorization"] == "Bearer ***"
    out = run("http", {"url": f"{server}/echo", "auth": {"alias": "hdr"}}, credentials=provider)
    assert out.data["data"]["headers"]["x-api-key"] == "***"
    unbound = run("http", {"url": f"{server}/echo", "auth": "unbound"}, credentials=provider)
    assert not unbound.ok and unbound.error_type == "credentials"
    assert "'unbound' names no host it may be sent to" in unbound.error
    unknown = run("http", {"url": f"{server}/echo", "auth": "nope"}, credentials=provider)
    assert not unknown.ok and unknown.error_type == "credentials"
    assert "unknown credential alias 'nope'" in unknown.error
    assert repr(provider.get("api")) == "Credential(alias='api')"


def test_postgres_statements_params_and_types(dsn: str) -> None:
    out = run(
        "postgres",
        {"dsn": dsn, "query": "SELECT %(n)s::int + 1 AS n, 'x' AS s", "params": {"n": 41}},
    )
    assert out.ok, out.error
    assert out.data == {  # NoETL's keys for one statement
        "status": "success",
        "columns": ["n", "s"],
        "rows": [{"n": 42, "s": "x"}],
        "row_count": 1,
        "statement_count": 1,
    }
    script = run(
        "postgres",
        {
            "connection_string": dsn,
            "command": (
                "CREATE TABLE t (id int, price numeric(10,2), at timestamptz, u uuid,"
                " b bytea, j jsonb,"
                " d interval, f float8);"
                "INSERT INTO t VALUES (1, 9.99, '2026-01-02T03:04:05Z',"
                " 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',"
                " '\\x0102', '{\"k\": [1]}', '90 minutes', 'NaN');"
                "SELECT * FROM t, t AS t2"
            ),
        },
    )
    assert script.ok, script.error
    create, insert, select = script.data["results"]
    assert create == {
        "status": "success",
        "row_count": -1,
        "message": "Command executed. -1 rows affected.",
        "affected_rows": -1,
    }
    assert insert["row_count"] == insert["affected_rows"] == 1
    # the step's result is the last statement's, as NoETL's, with every statement's beside it
    assert script.data["statement_count"] == 3 and script.data["rows"] == select["rows"]
    row = select["rows"][0]
    assert row["price"] == "9.99" and row["at"].startswith("2026-01-02T03:04:05")
    assert row["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" and row["b"] == "AQI="
    assert row["j"] == {"k": [1]} and row["d"] == 5400.0 and row["f"] == "nan"
    assert row["id_2"] == 1  # the repeated column keeps its value under a new name
    listed = run("postgres", {"dsn": dsn, "query": ["SELECT 1 AS a", "SELECT 2 AS b"]})
    assert [r["rows"] for r in listed.data["results"]] == [[{"a": 1}], [{"b": 2}]]


def test_postgres_errors_timeouts_and_rollback(dsn: str) -> None:
    bad = run("postgres", {"dsn": dsn, "query": "CREATE TABLE x (a int); SELECT * FROM nowhere"})
    assert not bad.ok and bad.error.startswith("postgres [42P01]: ")
    with psycopg.connect(dsn) as conn:  # the whole script rolled back
        assert conn.execute("SELECT to_regclass('x')").fetchone() == (None,)
    slow = run("postgres", {"dsn": dsn, "query": "SELECT pg_sleep(5)", "timeout_seconds": 0.5})
    assert not slow.ok and slow.error_type == "timeout"
    nodsn = run("postgres", {"query": "SELECT 1"})
    assert not nodsn.ok and "connection_string" in nodsn.error


def test_postgres_via_auth_alias_and_no_password_in_errors(dsn: str) -> None:
    provider = EnvCredentials({"NOETL_PGWORKER_CREDENTIAL_WAREHOUSE": dsn})
    out = run(
        "postgres",
        {"auth": "warehouse", "query": "SELECT current_database() AS db"},
        credentials=provider,
    )
    assert out.ok and out.data["rows"][0]["db"] == psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    wrong = EnvCredentials(
        {
            "NOETL_PGWORKER_CREDENTIAL_BAD": "host=127.0.0.1 port=1 user=u password=hunter2"
            " connect_timeout=1"
        }
    )
    failed = run("postgres", {"auth": "bad", "query": "SELECT 1"}, credentials=wrong)
    assert not failed.ok and "cannot connect to bad" in failed.error
    assert "hunter2" not in json.dumps(failed.error)
