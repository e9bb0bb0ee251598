"""TLS end to end: a PostgreSQL that accepts only TLS, and a worker with sslmode=verify-full.

The test makes a CA and a server certificate for ``localhost``/127.0.0.1 (openssl), starts a
throwaway cluster with ``ssl = on`` whose pg_hba.conf admits ``hostssl`` only, and runs the
worker against it: its pool, its claim session, its listener and a postgres tool's own
connection all verify the server's certificate against the CA.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from noetl_pgworker import schema
from noetl_pgworker.config import Settings
from noetl_pgworker.enqueue import enqueue
from noetl_pgworker.testing import LocalCluster, NoPostgres, find_pg_bindir
from noetl_pgworker.worker import Worker

from ..conftest import RunningWorker
from ..helpers import count_status, scalar, unavailable, wait_until

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(where: Path) -> None:
    """ca.crt, and server.crt/server.key for CN and SAN localhost and 127.0.0.1."""
    if shutil.which("openssl") is None:
        message = (
            "the TLS test makes its certificates with the openssl command (apt-get install openssl)"
        )
        unavailable(message)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=noetl-pgworker test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=where)  # fmt: skip
    _openssl("req", *ec, "-subj", "/CN=localhost", "-keyout", "server.key",
             "-out", "server.csr", cwd=where)  # fmt: skip
    (where / "server.ext").write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        "basicConstraints = CA:FALSE\n"
        "extendedKeyUsage = serverAuth\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt",
             cwd=where)  # fmt: skip


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Path]]:
    bindir = find_pg_bindir()
    if bindir is None:
        raise NoPostgres("the TLS test needs local PostgreSQL server binaries (initdb, pg_ctl)")
    cluster = LocalCluster(bindir)
    try:
        cluster.init()
        certs = cluster.root / "tls"
        certs.mkdir()
        make_certificates(certs)
        (certs / "server.key").chmod(0o600)
        if cluster.user is not None:
            entry = pwd.getpwnam(cluster.user)
            for path in (certs, *certs.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        with (cluster.datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\nssl = on\n"
                f"ssl_cert_file = '{certs / 'server.crt'}'\n"
                f"ssl_key_file = '{certs / 'server.key'}'\n"
                f"ssl_ca_file = '{certs / 'ca.crt'}'\n"
            )
        # TLS or nothing: a connection without it is refused.
        (cluster.datadir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 trust\n"
            "hostnossl all all 0.0.0.0/0 reject\n"
        )
        cluster.start()
        # The client's copy of the CA (the cluster's directory may not be readable to us).
        ca = tmp_path_factory.mktemp("tls") / "ca.crt"
        shutil.copy(certs / "ca.crt", ca)
        yield cluster, ca
    finally:
        cluster.destroy()


def tls_dsn(cluster: LocalCluster, ca: Path, dbname: str = "postgres") -> str:
    return conninfo.make_conninfo(
        host="localhost",
        hostaddr="127.0.0.1",
        port=str(cluster.port),
        user="postgres",
        dbname=dbname,
        sslmode="verify-full",
        sslrootcert=str(ca),
    )


def test_the_worker_runs_over_verified_tls(tls_cluster: tuple[LocalCluster, Path]) -> None:
    cluster, ca = tls_cluster
    plain = f"host=127.0.0.1 port={cluster.port} user=postgres dbname=postgres sslmode=disable"
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(plain).close()
    with psycopg.connect(tls_dsn(cluster, ca), autocommit=True) as admin:
        admin.execute("CREATE DATABASE tls_worker")
    dsn = tls_dsn(cluster, ca, "tls_worker")
    with psycopg.connect(dsn) as conn:
        schema.apply(conn, with_noetl_tables=True)
    # A long poll interval: a prompt start shows the listener's NOTIFY arriving over TLS.
    running = RunningWorker(Worker(Settings(dsn=dsn, poll_interval=30, heartbeat_interval=1)))
    running.thread.start()
    try:
        assert running.worker.wait_ready(30), "worker did not become ready"
        with psycopg.connect(dsn, autocommit=True) as conn:
            t0 = time.monotonic()
            enqueue(conn, tool_kind="noop", count=20)
            enqueue(
                conn,
                tool_kind="postgres",
                tool_config={
                    "connection_string": dsn,
                    "query": "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                },
            )
            wait_until(lambda: count_status(conn, "COMPLETED") == 21, timeout=10)
            assert time.monotonic() - t0 < 5, "not woken by NOTIFY"
            tool = conn.execute(
                "SELECT result -> 'context' FROM noetl.command WHERE tool_kind = 'postgres'"
            ).fetchone()
            assert tool is not None
            row: dict[str, Any] = tool[0]["rows"][0]
            assert row["ssl"] is True and row["version"].startswith("TLS")
            # Every connection of the worker is encrypted: pool, claim session, listener.
            names = {
                r[0]: r[1]
                for r in conn.execute(
                    "SELECT split_part(split_part(a.application_name, ':', 1), '@', 1),"
                    " bool_and(s.ssl)"
                    " FROM pg_stat_activity AS a JOIN pg_stat_ssl AS s ON s.pid = a.pid"
                    " WHERE a.application_name LIKE 'noetl-pgworker%%' GROUP BY 1"
                )
            }
            assert names == {
                "noetl-pgworker": True,
                "noetl-pgworker-claim": True,
                "noetl-pgworker-listener": True,
            }, names
        summary = running.stop()
        assert summary.clean and summary.completed == 21
    finally:
        if running.thread.is_alive():
            running.worker.stop()
            running.thread.join(30)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert scalar(conn, "SELECT count(*) FROM noetl.command WHERE status = 'COMPLETED'") == 21
