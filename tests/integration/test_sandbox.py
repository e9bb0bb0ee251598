"""What a command's tools may take from the worker: its libpq identity (postgres), its
process (python, shell), its limits."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from noetl_pgworker.credentials import EnvCredentials
from noetl_pgworker.dispatcher import execute
from noetl_pgworker.enqueue import enqueue
from noetl_pgworker.errors import ConfigError
from noetl_pgworker.models import Command, Outcome
from noetl_pgworker.tools import ToolRegistry, default_registry
from noetl_pgworker.tools.postgres import PostgresTool

from ..helpers import unavailable

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


# -- python and shell children ----------------------------------------------------------------

IS_ROOT = os.geteuid() == 0
#: As root, children must run as another user for the worker to be out of their reach.
RUN_AS = "nobody" if IS_ROOT else None


def sandboxed(**kwargs: Any) -> ToolRegistry:
    return default_registry(python_mode="process", run_as=RUN_AS, **kwargs)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def pids_with(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and alive(int(name)):
                found.append(int(name))
    return found


def test_shell_background_and_setsid_children_die_with_the_command() -> None:
    registry = sandboxed()
    try:
        out = execute(
            command("shell", {"command": "setsid sleep 1001 & sleep 1002 & nohup sleep 1003 &"}),
            registry,
            timeout=10,
        )
        assert out.ok, out.error
        assert pids_with("1001") == [] and pids_with("1002") == [] and pids_with("1003") == []
        timed = execute(
            command("shell", {"command": "setsid sleep 1004 & sleep 30", "timeout": 1}),
            registry,
            timeout=10,
        )
        assert timed.error_type == "timeout"
        assert pids_with("1004") == []
    finally:
        registry.close()


@pytest.mark.parametrize("mode", ["process", "spawn"])
def test_python_double_fork_dies_with_the_command(mode: str) -> None:
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execvp('sleep', ['sleep', '1005'])\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "time.sleep(0.2)\n"
        "result = 'forked'\n"
    )
    # spawn runs the installed interpreter: here it may not be readable by another user
    registry = default_registry(python_mode=mode, run_as=RUN_AS if mode == "process" else None)
    try:
        out = execute(command("python", {"code": code}), registry, timeout=10)
        assert out.ok and out.data == "forked", out.error
        assert pids_with("1005") == []
    finally:
        registry.close()


def test_limits_are_a_ceiling_a_command_can_only_lower() -> None:
    registry = sandboxed(
        python_memory_mb=256, child_max_procs=50, child_max_file_mb=2, child_cpu_seconds=20
    )
    code = (
        "import resource as r\n"
        "result = [r.getrlimit(x)[1] for x in"
        " (r.RLIMIT_AS, r.RLIMIT_NPROC, r.RLIMIT_FSIZE, r.RLIMIT_CPU)]\n"
    )
    mb = 1024 * 1024
    try:
        asked_more = {"memory_mb": 100_000, "max_procs": 10_000, "max_file_mb": 10_000}
        out = execute(command("python", {"code": code, **asked_more}), registry, timeout=10)
        assert out.ok and out.data == [256 * mb, 50, 2 * mb, 20], out.error
        lower = {"memory_mb": 128, "cpu_seconds": 5, "max_procs": 7}
        out = execute(command("python", {"code": code, **lower}), registry, timeout=10)
        assert out.data == [128 * mb, 7, 2 * mb, 5]
        sh = execute(command("shell", {"command": "cat /proc/self/limits"}), registry)
        limits = {
            line[:26].strip(): line[26:].split()[:2] for line in sh.data["stdout"].splitlines()
        }
        assert limits["Max processes"] == ["50", "50"]
        assert limits["Max file size"] == [str(2 * mb)] * 2
        assert limits["Max address space"] == [str(256 * mb)] * 2
        big = execute(
            command("shell", {"command": "head -c 3000000 /dev/zero > big; echo done"}),
            registry,
        )
        assert (not big.ok and "SIGXFSZ" in (big.error or "")) or "File too large" in str(big.data)
    finally:
        registry.close()


def test_cpu_time_limit_stops_a_busy_command() -> None:
    registry = sandboxed(child_cpu_seconds=1)
    try:
        out = execute(command("python", {"code": "while True:\n    pass\n"}), registry, timeout=20)
        assert (not out.ok and "SIGXCPU" in (out.error or "")) or "SIGKILL" in (out.error or "")
        assert out.error_type != "timeout"
    finally:
        registry.close()


def test_a_fork_bomb_is_bounded_by_the_process_limit() -> None:
    if not IS_ROOT:
        unavailable("the process limit binds a user other than root: run as root (as CI does)")
    registry = sandboxed(child_max_procs=20)
    code = (
        "import os\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(100):\n"
        "        if os.fork() == 0:\n"
        "            import time; time.sleep(30)\n"
        "        n += 1\n"
        "except OSError as exc:\n"
        "    result = {'forked': n, 'error': type(exc).__name__}\n"
    )
    try:
        out = execute(command("python", {"code": code}), registry, timeout=20)
        assert out.ok, out.error
        assert out.data["forked"] < 20 and out.data["error"] == "BlockingIOError"
    finally:
        registry.close()


def test_run_as_needs_a_root_worker_and_a_real_user() -> None:
    if IS_ROOT:
        with pytest.raises(ConfigError, match="no such user"):
            default_registry(run_as="no-such-user-pgw")
        registry = default_registry(run_as="nobody")
        try:
            out = execute(command("shell", {"command": "id -u"}), registry)
            assert out.data["stdout"].strip() == str(pwd.getpwnam("nobody").pw_uid)
        finally:
            registry.close()
    else:
        with pytest.raises(ConfigError, match="must run as root"):
            default_registry(run_as="nobody")


SPY = """
import os, signal
found = {}
try:
    found["environ"] = open(f"/proc/{worker}/environ", "rb").read().decode(errors="replace")
except OSError as exc:
    found["environ"] = type(exc).__name__
try:
    found["mem"] = open(f"/proc/{worker}/mem", "rb").read(1).hex()
except OSError as exc:
    found["mem"] = type(exc).__name__
try:
    os.kill(worker, signal.SIGKILL)
    found["kill"] = "sent"
except OSError as exc:
    found["kill"] = type(exc).__name__
result = found
"""


def test_children_cannot_read_or_kill_the_worker(dsn: str, tmp_path: Path) -> None:
    """A real worker (the CLI) with a secret in its environment; a python and a shell command
    try to read its environment and memory and to kill it."""
    env = {**os.environ, "NOETL_PGWORKER_DSN": dsn, "PGPASSWORD": "worker-env-secret"}
    args = [sys.executable, "-m", "noetl_pgworker", "start", "--concurrency", "2"]
    args += ["--poll-interval", "0.2", "--tool-kinds", "python,shell", "--log-level", "warning"]
    if RUN_AS:
        args += ["--run-as", RUN_AS]
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(args, env=env, stderr=log)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            enqueue(conn, tool_kind="python", tool_config={"code": SPY}, args={"worker": proc.pid})
            shell = f"cat /proc/{proc.pid}/environ; kill -9 {proc.pid}; echo alive"
            enqueue(conn, tool_kind="shell", tool_config={"command": shell})
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                rows = conn.execute(
                    "SELECT tool_kind, status, result FROM noetl.command"
                    " WHERE status IN ('COMPLETED', 'FAILED') ORDER BY tool_kind"
                ).fetchall()
                if len(rows) == 2:
                    break
                time.sleep(0.2)
        assert proc.poll() is None, "the worker was killed by a command"
        assert len(rows) == 2, (tmp_path / "worker.log").read_text()
        text = json.dumps([r[2] for r in rows])
        assert "worker-env-secret" not in text
        python = next(r[2] for r in rows if r[0] == "python")["context"]
        assert python["environ"] == "PermissionError" and python["mem"] == "PermissionError"
        if RUN_AS:
            assert python["kill"] == "PermissionError"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
