"""The chaos suite runs on a PostgreSQL of its own, because it restarts the server."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from noetl_pgworker import schema
from noetl_pgworker.testing import LocalCluster, NoPostgres, find_pg_bindir

from ..conftest import PgServer, fresh_database
from ..helpers import Figures

FIGURES = Figures("chaos figures", "NOETL_PGWORKER_CHAOS_REPORT")
FAST = [
    "--heartbeat-interval", "0.5", "--stale-after", "2", "--lease", "2",
    "--poll-interval", "0.2", "--connect-timeout", "3",
]  # fmt: skip


@pytest.fixture(scope="session")
def chaos_cluster() -> Iterator[LocalCluster]:
    bindir = find_pg_bindir()
    if bindir is None:
        raise NoPostgres("the chaos suite needs local PostgreSQL server binaries (initdb, pg_ctl)")
    cluster = LocalCluster(bindir)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def chaos_dsn(chaos_cluster: LocalCluster) -> Iterator[str]:
    server = PgServer(chaos_cluster.dsn, chaos_cluster)
    with fresh_database(server, None) as dsn:
        with psycopg.connect(dsn) as conn:
            schema.apply(conn, with_noetl_tables=True)
        yield dsn


class WorkerProcess:
    def __init__(self, dsn: str, worker_id: str | None, log: Path, *extra: str) -> None:
        args = [sys.executable, "-m", "noetl_pgworker", "start", "--dsn", dsn, *FAST, *extra]
        if worker_id:
            args += ["--worker-id", worker_id]
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def text(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
        w.wait(10)


def spawn(
    started: list[WorkerProcess], dsn: str, tmp_path: Path, worker_id: str | None, *extra: str
) -> WorkerProcess:
    log = tmp_path / f"worker-{worker_id or len(started)}-{time.monotonic_ns()}.log"
    # The default worker id is the host name: each process started here gets its own.
    w = WorkerProcess(dsn, worker_id or f"chaos-{len(started)}", log, *extra)
    started.append(w)
    return w


def report(name: str, **figures: Any) -> None:
    """Keep a scenario's figures for the summary (and $NOETL_PGWORKER_CHAOS_REPORT)."""
    FIGURES.add(name, **figures)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    FIGURES.summary(terminalreporter)
