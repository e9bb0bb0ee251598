"""Test fixtures: a real PostgreSQL, a template database, a fresh database per test.

PostgreSQL is ``NOETL_PGWORKER_TEST_DSN`` when set, else a throwaway cluster from local
server binaries, else a testcontainers container. If none can be had, every database test
errors with the reason: the suite never silently skips them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from noetl_pgworker import schema
from noetl_pgworker.config import Settings
from noetl_pgworker.testing import LocalCluster, scratch_database, throwaway_postgres
from noetl_pgworker.worker import RunSummary, Worker

SAMPLES = Path(__file__).resolve().parent / "samples"


def with_dbname(dsn: str, dbname: str) -> str:
    return conninfo.make_conninfo(dsn, dbname=dbname)


class PgServer:
    def __init__(self, dsn: str, cluster: LocalCluster | None, template: str = "") -> None:
        self.dsn = dsn
        self.cluster = cluster
        #: a database with NoETL's tables and the worker's objects, cloned for each test
        self.template = template


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    dsn = os.environ.get("NOETL_PGWORKER_TEST_DSN")
    stack = contextlib.ExitStack()
    cluster: LocalCluster | None = None
    if not dsn:
        dsn, cluster = stack.enter_context(throwaway_postgres())
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        stack.close()
        raise RuntimeError(f"the test PostgreSQL is not reachable: {exc}") from exc
    with stack:
        template_dsn = stack.enter_context(scratch_database(dsn, prefix="pgw_tmpl"))
        with psycopg.connect(template_dsn) as conn:
            schema.apply(conn, with_noetl_tables=True)
        template = str(conninfo.conninfo_to_dict(template_dsn)["dbname"])
        yield PgServer(dsn, cluster, template)


@contextlib.contextmanager
def fresh_database(server: PgServer, template: str | None) -> Iterator[str]:
    with scratch_database(server.dsn, prefix="pgw_t", template=template) as dsn:
        yield dsn


@pytest.fixture
def dsn(pg_server: PgServer) -> Iterator[str]:
    """A fresh database with NoETL's tables and the worker's objects."""
    with fresh_database(pg_server, pg_server.template) as d:
        yield d


@pytest.fixture
def empty_dsn(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database."""
    with fresh_database(pg_server, None) as d:
        yield d


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


class RunningWorker:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.summary: RunSummary | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.summary = self.worker.run()
        except BaseException as exc:
            self.error = exc

    def stop(self, timeout: float = 30) -> RunSummary:
        self.worker.stop()
        return self.join(timeout)

    def join(self, timeout: float = 30) -> RunSummary:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


@pytest.fixture
def start_worker(dsn: str) -> Iterator[Callable[..., RunningWorker]]:
    """Start Worker.run() on a thread; every worker still running is stopped at teardown."""
    started: list[RunningWorker] = []

    def start(**overrides: Any) -> RunningWorker:
        values: dict[str, Any] = {"dsn": dsn, "poll_interval": 0.5, "heartbeat_interval": 1.0}
        # The default worker id is the host name: each worker started here gets its own.
        values["worker_id"] = f"test-{len(started)}"
        values.update(overrides)
        traces = values.pop("traces", None)  # a Worker argument, not a setting
        running = RunningWorker(Worker(Settings(**values), traces=traces))
        running.thread.start()
        started.append(running)
        if not values.get("drain"):
            assert running.worker.wait_ready(30), "worker did not become ready"
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.worker.stop()
            running.thread.join(30)
