"""The fault tier: the worker in a network namespace, PostgreSQL across a veth pair.

A silent partition drops packets instead of refusing them, as a dead switch or a lost route
does: both neighbour entries of the veth pair are pointed at a MAC address nobody has
(``ip neigh replace … nud permanent``), so frames go nowhere and connection attempts time out.
Healing puts the real addresses back. Nothing but the namespace's private addresses
(10.213.0.0/16, a /30 per run) and loopback are used.

Creating namespaces needs root. Not root: the tier is skipped, saying why; under ``CI=true``
it fails instead (CI runs as root, so a skip there would hide a broken tier). Everything it
creates (namespace, veth pair, PostgreSQL cluster, worker processes) is removed at the end,
and every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from noetl_pgworker import schema
from noetl_pgworker.testing import LocalCluster, NoPostgres, find_pg_bindir, scratch_database

from ..helpers import Figures, unavailable

FIGURES = Figures("fault figures", "NOETL_PGWORKER_FAULT_REPORT")
#: A MAC address no interface has: frames sent to it are lost.
NOWHERE = "02:00:00:de:ad:01"
#: Short liveness settings so that scenarios take seconds, not minutes.
FAST = [
    "--heartbeat-interval", "0.5", "--stale-after", "3", "--lease", "3",
    "--poll-interval", "0.5", "--connect-timeout", "3",
]  # fmt: skip


def _cannot_run(reason: str) -> None:
    unavailable(f"the fault tier cannot run: {reason}")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15, check=check)


class Net:
    """A network namespace joined to the root namespace by a veth pair."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000:05d}"
        self.ns = f"pgwfault{tag}"
        self.host_if = f"pgwf{tag}h"
        self.ns_if = f"pgwf{tag}n"
        # A /30 of its own per run (several runs may share a machine).
        block = (os.getpid() % 16000) * 4
        prefix = f"10.213.{block // 256 % 256}"
        self.host_ip = f"{prefix}.{block % 256 + 1}"
        self.ns_ip = f"{prefix}.{block % 256 + 2}"
        self.cidr = f"{prefix}.{block % 256}/30"
        self.host_mac = ""
        self.ns_mac = ""
        self.partitioned = False

    def create(self) -> None:
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.ns)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.ns, "link", "set", self.ns_if, "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        self.host_mac = self._mac()
        self.ns_mac = self._mac(self.ns)
        self.heal()

    def _mac(self, ns: str | None = None) -> str:
        args = ["-j", "link", "show", self.ns_if if ns else self.host_if]
        out = _ip(*(["-n", ns] if ns else []), *args).stdout
        return str(json.loads(out)[0]["address"])

    def _neigh(self, host_side: str, ns_side: str) -> None:
        _ip("neigh", "replace", self.ns_ip, "dev", self.host_if, "lladdr", host_side,
            "nud", "permanent")  # fmt: skip
        _ip("-n", self.ns, "neigh", "replace", self.host_ip, "dev", self.ns_if, "lladdr",
            ns_side, "nud", "permanent")  # fmt: skip

    def partition(self) -> float:
        """Drop every packet between the two sides from now on; returns the monotonic time."""
        self._neigh(NOWHERE, NOWHERE)
        self.partitioned = True
        return time.monotonic()

    def heal(self) -> float:
        """Deliver packets again; returns the monotonic time."""
        self._neigh(self.ns_mac, self.host_mac)
        self.partitioned = False
        return time.monotonic()

    def destroy(self) -> None:
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.ns, check=False)

    def exec_args(self, *args: str) -> list[str]:
        """A command line that runs ``args`` inside the namespace."""
        return ["ip", "netns", "exec", self.ns, *args]


@pytest.fixture(scope="session")
def net() -> Iterator[Net]:
    if os.geteuid() != 0:
        _cannot_run("needs root (network namespaces and veth pairs)")
    if shutil.which("ip") is None:
        _cannot_run("the `ip` command (iproute2) is not installed")
    n = Net()
    try:
        n.create()
    except (OSError, subprocess.SubprocessError) as exc:
        n.destroy()
        err = getattr(exc, "stderr", "") or exc
        _cannot_run(f"cannot create a network namespace and veth pair: {err}")
    try:
        yield n
    finally:
        n.destroy()


@pytest.fixture(scope="session")
def fault_cluster(net: Net) -> Iterator[LocalCluster]:
    """A PostgreSQL cluster of its own, on loopback and on the root side of the veth pair."""
    bindir = find_pg_bindir()
    if bindir is None:
        raise NoPostgres("the fault tier needs local PostgreSQL server binaries (initdb, pg_ctl)")
    cluster = LocalCluster(bindir, settings={"listen_addresses": f"127.0.0.1,{net.host_ip}"})
    try:
        cluster.init()
        with (cluster.datadir / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {net.cidr} trust\n")
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


class FaultDb:
    """A fresh database: ``dsn`` over loopback (the test, a root-namespace worker), ``net_dsn``
    over the veth pair (the worker in the namespace)."""

    def __init__(self, dsn: str, net: Net) -> None:
        self.dsn = dsn
        self.net_dsn = conninfo.make_conninfo(dsn, host=net.host_ip)


@pytest.fixture
def fault_db(fault_cluster: LocalCluster, net: Net) -> Iterator[FaultDb]:
    with scratch_database(fault_cluster.dsn, prefix="pgw_f") as dsn:
        with psycopg.connect(dsn) as conn:
            schema.apply(conn, with_noetl_tables=True)
        yield FaultDb(dsn, net)
        net.heal()
        # Sessions left by killed workers must not keep the database from being dropped.
        with psycopg.connect(fault_cluster.dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (conninfo.conninfo_to_dict(dsn)["dbname"],),
            )


class WorkerProcess:
    """The worker CLI in a subprocess (in the namespace when ``net`` is given)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if not self._out.closed:
                self._out.close()

    def text(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")


class Workers:
    """Starts workers; kills whatever still runs at the end of the test."""

    def __init__(self, net: Net, tmp_path: Path) -> None:
        self.net = net
        self.tmp_path = tmp_path
        self.started: list[WorkerProcess] = []

    def start(
        self, dsn: str, worker_id: str, *extra: str, in_ns: bool = True, fast: bool = True
    ) -> WorkerProcess:
        args = [sys.executable, "-m", "noetl_pgworker", "start", "--dsn", dsn]
        args += [*(FAST if fast else []), "--worker-id", worker_id, *extra]
        if in_ns:
            args = self.net.exec_args(*args)
        log = self.tmp_path / f"worker-{worker_id}-{len(self.started)}.log"
        w = WorkerProcess(args, log)
        self.started.append(w)
        return w

    def cleanup(self) -> None:
        for w in self.started:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.wait(15)


@pytest.fixture
def workers(net: Net, tmp_path: Path) -> Iterator[Workers]:
    ws = Workers(net, tmp_path)
    try:
        yield ws
    finally:
        net.heal()
        ws.cleanup()


def report(name: str, **figures: Any) -> None:
    """Keep a scenario's figures for the summary (and $NOETL_PGWORKER_FAULT_REPORT)."""
    FIGURES.add(name, **figures)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    FIGURES.summary(terminalreporter)
