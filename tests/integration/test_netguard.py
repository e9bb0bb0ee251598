"""Every connection of the worker is bounded against a silent network, client and server side."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from noetl_pgworker.config import Settings
from noetl_pgworker.connections import open_pool
from noetl_pgworker.session import open_session

pytestmark = pytest.mark.integration


def client_params(conn: psycopg.Connection[Any]) -> dict[str, str]:
    return {
        o.keyword.decode(): (o.val or b"").decode() for o in conn.pgconn.info if o.val is not None
    }


def server_values(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    row = conn.execute(
        "SELECT current_setting('tcp_user_timeout'), current_setting('tcp_keepalives_idle'),"
        " current_setting('tcp_keepalives_interval'), current_setting('tcp_keepalives_count')"
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_pool_and_claim_session_are_bounded(dsn: str) -> None:
    s = Settings(dsn=dsn, worker_id="bounded", network_timeout=12)
    with contextlib.ExitStack() as closing:
        pool = open_pool(s, closing, "0badc0de")
        with pool.connection() as conn:
            params = client_params(conn)
            assert params["tcp_user_timeout"] == "12000"
            assert (params["keepalives"], params["keepalives_idle"]) == ("1", "6")
            assert server_values(conn) == ("12000", "6", "2", "3")
            assert params["application_name"] == "noetl-pgworker@0badc0de:bounded"
        session = open_session(s, tuple, closing, listens=True, incarnation="0badc0de")
        with session.connection() as conn:
            assert client_params(conn)["tcp_user_timeout"] == "12000"
            assert server_values(conn) == ("12000", "6", "2", "3")
            assert (
                client_params(conn)["application_name"] == "noetl-pgworker-claim@0badc0de:bounded"
            )


def test_the_dsn_s_own_values_win(dsn: str) -> None:
    mine = conninfo.make_conninfo(dsn, tcp_user_timeout="45000", keepalives_idle="30")
    s = Settings(dsn=mine, worker_id="own-values", network_timeout=12)
    with contextlib.ExitStack() as closing:
        pool = open_pool(s, closing)
        with pool.connection() as conn:
            params = client_params(conn)
            assert (params["tcp_user_timeout"], params["keepalives_idle"]) == ("45000", "30")
            assert params["keepalives_interval"] == "2"


def test_zero_leaves_the_system_s_defaults(dsn: str) -> None:
    s = Settings(dsn=dsn, worker_id="system", network_timeout=0)
    with contextlib.ExitStack() as closing:
        pool = open_pool(s, closing)
        with pool.connection() as conn:
            assert client_params(conn).get("tcp_user_timeout", "") in ("", "0")
            assert server_values(conn)[0] == "0"


def test_the_pool_replaces_lost_connections_at_a_steady_pace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """psycopg_pool's own delay doubles (1, 2, 4 s, …); paced, attempts keep coming."""
    from noetl_pgworker import netguard

    monkeypatch.setattr(netguard, "RECONNECT_PACE", 0.2)
    # Nothing listens on port 1: each attempt fails at once.
    pool = netguard.PacedPool(
        "host=127.0.0.1 port=1 user=nobody dbname=none connect_timeout=2",
        min_size=1,
        open=False,
        reconnect_timeout=3600,
    )
    pool.open(wait=False)
    try:
        time.sleep(3)
        errors = pool.get_stats().get("connections_errors", 0)
    finally:
        pool.close(timeout=1)
    assert errors >= 8, errors  # unpaced: 3 (at 0, 1 and 3 s)
