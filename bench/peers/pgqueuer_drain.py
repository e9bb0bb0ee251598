"""PgQueuer drains N no-op jobs in one process; prints JSON {jobs, seconds, jobs_per_s}.

Run with the peers environment's python (``bench/bench.py --only peers`` does). Configured as
PgQueuer's own drain benchmark (``tools/benchmark.py --strategy drain``) and its performance
guide: asyncpg, one connection per queue manager, ``--dequeue`` queue managers (default 5) in
this one process, each with ``batch_size`` ``--batch-size`` (default 10), ``mode=drain``, on
uvloop (what ``pgq run`` uses when it is installed). The N jobs are enqueued in one statement
and the table analysed before the clock starts; the clock stops when every queue manager has
found the queue empty and finished its in-flight jobs (their status writes flushed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import asyncpg
import uvloop
from pgqueuer import PgQueuer
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.queries import Queries
from pgqueuer.types import QueueExecutionMode
from psycopg.conninfo import conninfo_to_dict


async def connect(dsn: str) -> asyncpg.Connection:
    p = conninfo_to_dict(dsn)
    return await asyncpg.connect(
        host=p.get("host"),
        port=int(p.get("port") or 5432),
        user=p.get("user"),
        password=p.get("password"),
        database=p.get("dbname"),
    )


async def main(dsn: str, jobs: int, dequeue: int, batch_size: int) -> dict[str, float]:
    setup = await connect(dsn)
    queries = Queries(AsyncpgDriver(setup))
    await queries.install()
    await queries.enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)
    await setup.execute("VACUUM ANALYZE pgqueuer")

    done = 0
    managers = []
    for _ in range(dequeue):
        pgq = PgQueuer(AsyncpgDriver(await connect(dsn)))

        @pgq.entrypoint("noop")
        async def noop(job: Job) -> None:
            nonlocal done
            done += 1

        managers.append(pgq)

    t0 = time.perf_counter()
    await asyncio.gather(
        *(m.run(batch_size=batch_size, mode=QueueExecutionMode.drain) for m in managers)
    )
    seconds = time.perf_counter() - t0
    left = sum(s.count for s in await queries.queue_size())
    await setup.close()
    if done != jobs or left:
        raise SystemExit(f"pgqueuer: {done}/{jobs} run, {left} left in the queue")
    return {"jobs": jobs, "seconds": round(seconds, 3), "jobs_per_s": round(jobs / seconds, 1)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--dequeue", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=10)
    a = ap.parse_args()
    print(json.dumps(uvloop.run(main(a.dsn, a.jobs, a.dequeue, a.batch_size))))
