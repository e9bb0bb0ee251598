"""What a command's tools may take from the worker: its libpq identity (postgres), its
process (python, shell), its limits."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from noetl_pgworker.credentials import EnvCredentials
from noetl_pgworker.dispatcher import execute
from noetl_pgworker.models import Command, Outcome
from noetl_pgworker.tools import ToolRegistry
from noetl_pgworker.tools.postgres import PostgresTool

pytestmark = pytest.mark.integration

PG_ENV = ("PGUSER", "PGPASSWORD", "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE", "PGDATABASE")


def command(kind: str, config: dict[str, Any], args: dict[str, Any] | None = None) -> Command:
    return Command(
        command_id="1",
        execution_id=1,
        step="s",
        tool_kind=kind,
        catalog_id=1,
        input={"tool_config": config, "input": args or {}},
    )


def run_pg(config: dict[str, Any], credentials: EnvCredentials | None = None) -> Outcome:
    registry = ToolRegistry([PostgresTool()])
    return execute(command("postgres", config), registry, timeout=10, credentials=credentials)


class FakePostgres:
    """A TCP listener that speaks just enough of the protocol to record what a client sends:
    the startup parameters and, after asking for a cleartext password, the password."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.startups: list[dict[str, str]] = []
        self.passwords: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError, struct.error):
                self._session(conn)

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def _session(self, conn: socket.socket) -> None:
        while True:
            (length,) = struct.unpack("!i", self._read(conn, 4))
            body = self._read(conn, length - 4)
            (code,) = struct.unpack("!i", body[:4])
            if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                conn.sendall(b"N")
                continue
            break
        parts = body[4:].split(b"\0")
        self.startups.append(
            {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 2, 2)}
        )
        conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        try:
            kind = self._read(conn, 1)
            (length,) = struct.unpack("!i", self._read(conn, 4))
            payload = self._read(conn, length - 4)
        except OSError:
            return  # the client gave up without sending a password
        if kind == b"p":
            self.passwords.append(payload.rstrip(b"\0").decode())
        err = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
        conn.sendall(b"E" + struct.pack("!i", len(err) + 4) + err)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_pg() -> Iterator[FakePostgres]:
    server = FakePostgres()
    yield server
    server.close()


@pytest.fixture
def worker_pg_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The worker's own libpq identity, every way libpq can find one."""
    for name in PG_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSWORD", "env-secret")
    monkeypatch.setenv("HOME", str(tmp_path))
    pgpass = tmp_path / ".pgpass"
    pgpass.write_text("*:*:*:*:home-pgpass-secret\n")
    pgpass.chmod(0o600)
    return tmp_path


def test_postgres_does_not_send_the_workers_password(
    fake_pg: FakePostgres, worker_pg_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = f"host=127.0.0.1 port={fake_pg.port} user=someone dbname=x sslmode=disable"
    out = run_pg({"connection_string": dsn, "query": "SELECT 1"})
    assert not out.ok and "cannot connect" in (out.error or "")
    # Without PGPASSWORD libpq would fall back to ~/.pgpass, then to PGPASSFILE.
    monkeypatch.delenv("PGPASSWORD")
    run_pg({"connection_string": dsn, "query": "SELECT 1"})
    passfile = worker_pg_env / "other-pgpass"
    passfile.write_text("*:*:*:*:passfile-secret\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    run_pg({"connection_string": dsn, "query": "SELECT 1"})
    assert len(fake_pg.startups) == 3
    assert fake_pg.passwords == []  # nothing was sent: not env-secret, not a pgpass line


def test_postgres_does_not_lend_the_workers_user_or_service(
    fake_pg: FakePostgres, worker_pg_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGUSER", "worker_role")
    nouser = run_pg(
        {"connection_string": f"dbname=x host=127.0.0.1 port={fake_pg.port}", "query": "SELECT 1"}
    )
    assert not nouser.ok and "must name a user" in (nouser.error or ""), nouser.error
    services = worker_pg_env / "services.conf"
    services.write_text("[worker]\nuser=service_role\npassword=service-secret\ndbname=svc\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    monkeypatch.setenv("PGSERVICE", "worker")
    monkeypatch.delenv("PGPASSWORD")
    out = run_pg(
        {"dsn": f"postgresql://someone@127.0.0.1:{fake_pg.port}?sslmode=disable", "query": "x"}
    )
    assert not out.ok
    assert fake_pg.passwords == []
    assert [s["user"] for s in fake_pg.startups] == ["someone"]
    assert fake_pg.startups[0]["database"] == "someone"  # not the service's, not PGDATABASE


@pytest.mark.parametrize(
    "extra", ["passfile=/tmp/x", "service=worker", "sslcert=/tmp/c sslkey=/tmp/k"]
)
def test_postgres_refuses_the_workers_files_in_a_command(extra: str) -> None:
    out = run_pg({"connection_string": f"host=127.0.0.1 user=u {extra}", "query": "SELECT 1"})
    assert not out.ok and "may not use" in (out.error or ""), out.error


def test_postgres_still_connects_with_what_the_command_gives(
    dsn: str, worker_pg_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = conninfo.conninfo_to_dict(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS pgw_sandbox_role")
        conn.execute("CREATE ROLE pgw_sandbox_role LOGIN PASSWORD 'role-secret'")
    try:
        given = conninfo.make_conninfo(dsn, user="pgw_sandbox_role", password="role-secret")
        out = run_pg({"connection_string": given, "query": "SELECT current_user AS u"})
        assert out.ok, out.error
        assert out.data["rows"] == [{"u": "pgw_sandbox_role"}]
        # An alias (the operator's) gives the user; the environment still gives nothing.
        monkeypatch.setenv("NOETL_PGWORKER_CREDENTIAL_WAREHOUSE", given)
        aliased = run_pg({"auth": "warehouse", "query": "SELECT 1 AS one"}, EnvCredentials())
        assert aliased.ok and aliased.data["rows"] == [{"one": 1}], aliased.error
        assert parts.get("host")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP ROLE IF EXISTS pgw_sandbox_role")
