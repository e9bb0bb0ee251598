"""The metrics server: local by default, and idle or silent clients cannot exhaust it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from noetl_pgworker import cli
from noetl_pgworker.config import Settings
from noetl_pgworker.metrics import HealthServer, Metrics

pytestmark = pytest.mark.integration


def metrics() -> Metrics:
    return Metrics(
        in_flight=lambda: 0,
        free_slots=lambda: 1,
        pending_writes=lambda: 0,
        listener_reconnects=lambda: 0,
        heartbeat_age=lambda: 0.0,
    )


@pytest.fixture
def health() -> Iterator[HealthServer]:
    server = HealthServer("127.0.0.1", 0, metrics(), lambda: (True, "ready"), timeout=1.0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return int(resp.status), bytes(resp.read())


def test_the_metrics_server_listens_on_localhost_by_default() -> None:
    assert Settings().metrics_host == "127.0.0.1"
    option = next(p for p in cli.start.params if p.name == "metrics_host")
    assert option.default == "127.0.0.1"


def test_the_endpoints_answer(health: HealthServer) -> None:
    assert get(health.port, "/healthz") == (200, b"ok\n")
    assert get(health.port, "/readyz") == (200, b"ready\n")
    status, body = get(health.port, "/metrics")
    assert status == 200 and b"noetl_pgworker_in_flight" in body


def test_a_silent_client_is_dropped_after_the_timeout(health: HealthServer) -> None:
    with socket.create_connection(("127.0.0.1", health.port)) as sock:
        sock.settimeout(10)
        t0 = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server, not by our timeout
        assert time.monotonic() - t0 < 4


def test_300_idle_connections_keep_threads_bounded_and_healthz_answering(
    health: HealthServer,
) -> None:
    before = threading.active_count()
    with contextlib.ExitStack() as stack:
        for _ in range(300):
            stack.enter_context(socket.create_connection(("127.0.0.1", health.port)))
        time.sleep(0.3)
        assert threading.active_count() <= before + 16
        t0 = time.monotonic()
        assert get(health.port, "/healthz") == (200, b"ok\n")
        assert time.monotonic() - t0 < 1.0  # not after the idle clients timed out
        assert threading.active_count() <= before + 16


def test_a_slow_client_is_dropped_and_others_still_served(health: HealthServer) -> None:
    with socket.create_connection(("127.0.0.1", health.port)) as slow:
        slow.settimeout(10)
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        assert get(health.port, "/healthz") == (200, b"ok\n")
        t0 = time.monotonic()
        assert slow.recv(1024) == b""
        assert time.monotonic() - t0 < 4
