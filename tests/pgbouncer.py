"""A throwaway PgBouncer in front of the test PostgreSQL (for the pool-mode tests).

It runs as the user running the tests, or, as root (PgBouncer refuses root), as the same
unprivileged user as the throwaway cluster. A missing ``pgbouncer`` binary skips the tests
that need it on a user's machine, saying so; in CI (``CI=true``) it fails them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import conninfo

from noetl_pgworker.testing import _unprivileged_user

from .helpers import unavailable


def pgbouncer_binary() -> str:
    """The pgbouncer binary; skip (user machine) or fail (CI) when it is missing."""
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer") if os.access(p, os.X_OK)),
        None,
    )
    if found:
        return found
    message = (
        "pgbouncer is not installed (Debian/Ubuntu: apt-get install pgbouncer): the tests of"
        " --pool-mode session|transaction run the worker through a real PgBouncer"
    )
    unavailable(message)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgBouncer:
    """One pgbouncer process with its own ini and userlist, in front of ``server_dsn``."""

    def __init__(self, server_dsn: str, pool_mode: str, *, pool_size: int) -> None:
        self.binary = pgbouncer_binary()
        self.pool_mode = pool_mode
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="noetl-pgworker-pgbouncer-"))
        self.log = self.root / "pgbouncer.log"
        server = conninfo.conninfo_to_dict(server_dsn)
        user = str(server.get("user") or "postgres")
        target = f"host={server.get('host') or '127.0.0.1'} port={server.get('port') or 5432}"
        if server.get("password"):
            target += f" user={user} password={server['password']}"
        (self.root / "userlist.txt").write_text(f'"{user}" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = {target}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {self.root / 'userlist.txt'}",
                    f"pool_mode = {pool_mode}",
                    f"default_pool_size = {pool_size}",
                    "max_client_conn = 500",
                    f"logfile = {self.log}",
                    f"pidfile = {self.root / 'pgbouncer.pid'}",
                    "",
                ]
            )
        )
        self.user = user
        cmd = [self.binary, str(self.root / "pgbouncer.ini")]
        if os.geteuid() == 0:
            runner = _unprivileged_user()
            entry = pwd.getpwnam(runner)
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            cmd = ["runuser", "-u", runner, "--", *cmd]
        self._out = (self.root / "stderr.log").open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT)
        self._wait_up(server_dsn)

    def _wait_up(self, server_dsn: str) -> None:
        deadline = time.monotonic() + 15
        probe = self.dsn(server_dsn)
        while True:
            if self.proc.poll() is not None:
                err = (self.root / "stderr.log").read_text(errors="replace")
                raise RuntimeError(f"pgbouncer exited: {err}{self.text()}")
            try:
                with psycopg.connect(probe, connect_timeout=2, prepare_threshold=None) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def dsn(self, database_dsn: str) -> str:
        """``database_dsn`` (its database and user), through this pgbouncer."""
        return conninfo.make_conninfo(database_dsn, host="127.0.0.1", port=str(self.port))

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def pgbouncer(server_dsn: str, pool_mode: str, *, pool_size: int = 20) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(server_dsn, pool_mode, pool_size=pool_size)
    try:
        yield bouncer
    finally:
        bouncer.stop()
