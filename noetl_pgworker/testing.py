"""What tests and demos need: a throwaway PostgreSQL, and the worker's parts in memory.

:func:`throwaway_postgres` gives a DSN: a private cluster in a temporary directory, made with
the local server binaries (``initdb``/``pg_ctl``), or, where there are none, a Docker container
through testcontainers. PostgreSQL refuses to run as root; when the process is root the cluster
runs as an unprivileged user (``postgres`` if it exists, else ``nobody``).

The in-memory parts (``memory.py``) let a test drive the real :class:`~noetl_pgworker.Worker`
without a database; ``tests/integration/test_conformance.py`` keeps them honest.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import PgWorkerError
from .memory import InMemorySink, InMemorySource

__all__ = [
    "InMemorySink",
    "InMemorySource",
    "LocalCluster",
    "NoPostgres",
    "find_pg_bindir",
    "scratch_database",
    "throwaway_postgres",
]


class NoPostgres(PgWorkerError):
    """No PostgreSQL server binaries and no Docker: cannot start a throwaway PostgreSQL."""


def find_pg_bindir() -> Path | None:
    """The directory with ``initdb`` and ``pg_ctl``, or None."""
    candidates: list[str] = []
    if os.environ.get("NOETL_PGWORKER_PG_BINDIR"):
        candidates.append(os.environ["NOETL_PGWORKER_PG_BINDIR"])
    for tool in ("pg_ctl", "initdb"):
        found = shutil.which(tool)
        if found:
            candidates.append(str(Path(found).resolve().parent))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(out.stdout.strip())
    # Debian/Ubuntu and RHEL-style layouts keep the server binaries off PATH; newest first.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    candidates += sorted(glob.glob("/usr/pgsql-*/bin"), reverse=True)
    for cand in candidates:
        path = Path(cand)
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1."""

    def __init__(
        self, bindir: Path, *, port: int | None = None, settings: dict[str, str] | None = None
    ) -> None:
        self.bindir = bindir
        #: Server settings given after (so over) the defaults below, e.g. ``{"fsync": "on"}``.
        self.settings = dict(settings or {})
        self.port = port or _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="noetl-pgworker-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = _unprivileged_user()
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise NoPostgres(
                f"{args[0]} failed ({proc.returncode}):"
                f" {proc.stderr.strip() or proc.stdout.strip()}" + (f"\n{log}" if log else "")
            )

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                "-h 127.0.0.1",
                f"-k {self.root}",
                # A throwaway cluster: durability buys nothing, speed does.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=300",
                "-c shared_buffers=128MB",
                *(f"-c {name}={value}" for name, value in self.settings.items()),
            ]
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def scratch_database(
    admin_dsn: str, *, prefix: str = "noetl_pgworker_scratch", template: str | None = None
) -> Iterator[str]:
    """A new database on ``admin_dsn``'s server (a copy of ``template`` if given), dropped after.

    Yields its DSN: ``admin_dsn`` with the database name replaced.
    """
    import uuid

    import psycopg
    from psycopg import conninfo, sql

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        create = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as admin:
        admin.execute(create)
    try:
        yield conninfo.make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise NoPostgres(
        "running as root and no unprivileged user (postgres, nobody) to run PostgreSQL"
    )


@contextlib.contextmanager
def throwaway_postgres(
    settings: dict[str, str] | None = None,
) -> Iterator[tuple[str, LocalCluster | None]]:
    """Yield ``(dsn, cluster)``; ``cluster`` is None when the server is a container.

    ``settings`` override the local cluster's server settings (a container keeps its own).
    """
    bindir = find_pg_bindir()
    if bindir is not None:
        cluster = LocalCluster(bindir, settings=settings)
        try:
            cluster.init()
            cluster.start()
            yield cluster.dsn, cluster
        finally:
            cluster.destroy()
        return
    try:
        from testcontainers.postgres import PostgresContainer
    except ImportError as exc:
        raise NoPostgres(
            "no PostgreSQL server binaries (initdb, pg_ctl) found and testcontainers is not"
            " installed; install PostgreSQL, or Docker and `pip install testcontainers`, or set"
            " NOETL_PGWORKER_TEST_DSN"
        ) from exc
    try:
        container = PostgresContainer("postgres:16-alpine", driver=None)
        container.start()
    except Exception as exc:
        raise NoPostgres(
            f"no PostgreSQL server binaries found and Docker did not start a container: {exc}"
        ) from exc
    try:
        url = container.get_connection_url()
        yield url, None
    finally:
        container.stop()
