"""Round trips per claim, counted in the protocol (libpq's trace), not timed: over a database a
few milliseconds away every extra round trip is a pause of the whole claim loop."""

from __future__ import annotations

import itertools
import tempfile
from typing import Any

import psycopg
import pytest
from psycopg import pq
from psycopg_pool import ConnectionPool

from noetl_pgworker.source import ClaimOptions, PgCommandSource

from ..helpers import insert_raw_command, scalar

pytestmark = pytest.mark.integration


def traced_claim(source: PgCommandSource, limit: int) -> tuple[int, list[Any], str]:
    """Claim ``limit`` commands with the claim session's protocol traced: how many round trips
    it took (the client sent, then waited for the server's answer), what was claimed, and the
    trace."""
    with tempfile.TemporaryFile("w+") as trace:
        with source.session.connection() as conn:
            conn.pgconn.trace(trace.fileno())
            conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            claimed = source.claim(limit)
        finally:
            with source.session.connection() as conn:
                conn.pgconn.untrace()
        trace.seek(0)
        text = trace.read()
    sides = [line[0] for line in text.splitlines() if line[:2] in ("F\t", "B\t")]
    trips = sum(1 for a, b in itertools.pairwise(sides) if (a, b) == ("F", "B"))
    return trips, claimed, text


def test_a_claim_and_the_pending_unlocks_cost_one_round_trip(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    ids = [insert_raw_command(conn, tool_kind="noop", context="{}")[1] for _ in range(4)]
    with ConnectionPool(dsn, min_size=1, max_size=1, open=True) as pool:
        # The first claim also recovers dead workers' claims (a transaction); later ones do
        # not for an hour.
        source = PgCommandSource(
            pool,
            worker_id="round-trips",
            tool_kinds=["noop"],
            options=ClaimOptions(reclaim_every=3600),
        )
        try:
            first = source.claim(1)
            assert [int(c.command_id) for c in first] == ids[:1]
            source.done([ids[0]])  # its outcome is written: its lock goes with the next claim
            trips, claimed, text = traced_claim(source, 2)
            assert [int(c.command_id) for c in claimed] == ids[1:3]
            assert trips == 1, text
            # The unlock did go through in that round trip.
            with psycopg.connect(dsn) as other:
                assert scalar(other, "SELECT pg_try_advisory_xact_lock(%s)", (ids[0],))
                assert not scalar(other, "SELECT pg_try_advisory_xact_lock(%s)", (ids[1],))
            # Without pending unlocks: one round trip too.
            trips, claimed, text = traced_claim(source, 5)
            assert [int(c.command_id) for c in claimed] == ids[3:]
            assert trips == 1, text
        finally:
            source.close()
