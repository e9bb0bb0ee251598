"""Procrastinate drains N no-op jobs in one worker process; prints JSON {jobs, seconds,
jobs_per_s}.

Run with the peers environment's python (``bench/bench.py --only peers`` does). One worker
(``run_worker_async``) with ``concurrency`` ``--concurrency`` (default 10) asynchronous
sub-workers, ``wait=False`` (it stops once it has caught up with the queue), LISTEN/NOTIFY on
(the default), ``delete_jobs="never"`` (the default: a finished job's row stays, as a NoETL
command's does); its ``PsycopgConnector`` pool holds concurrency + 2 connections, so no
sub-worker waits for one. The task is ``async def noop(): pass``. The N jobs are deferred in
one statement (``batch_defer_async``) and the table analysed before the clock starts; the
clock stops when the worker returns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import psycopg
from procrastinate import App, PsycopgConnector


async def main(dsn: str, jobs: int, concurrency: int) -> dict[str, float]:
    pool = concurrency + 2
    app = App(connector=PsycopgConnector(conninfo=dsn, min_size=pool, max_size=pool))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        await noop.batch_defer_async(*({} for _ in range(jobs)))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE procrastinate_jobs")
        t0 = time.perf_counter()
        await app.run_worker_async(
            concurrency=concurrency,
            wait=False,
            install_signal_handlers=False,
            delete_jobs="never",
        )
        seconds = time.perf_counter() - t0
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FROM procrastinate_jobs"
        ).fetchone()
    if row is None or row[0] != jobs:
        raise SystemExit(f"procrastinate: {row} succeeded/all, expected {jobs}")
    return {"jobs": jobs, "seconds": round(seconds, 3), "jobs_per_s": round(jobs / seconds, 1)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=10)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(main(a.dsn, a.jobs, a.concurrency))))
