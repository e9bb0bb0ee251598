"""What the queue and the workers look like right now."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from .queries import query


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    name: str
    status: str
    capacity: int | None
    heartbeat_age_seconds: float


@dataclass(frozen=True, slots=True)
class QueueStatus:
    counts: dict[str, dict[str, int]]  # status -> tool kind -> commands
    oldest_pending_seconds: float | None
    workers: list[WorkerInfo]

    def total(self, status: str) -> int:
        return sum(self.counts.get(status, {}).values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "totals": {s: self.total(s) for s in self.counts},
            "oldest_pending_seconds": self.oldest_pending_seconds,
            "workers": [_worker(w) for w in self.workers],
        }


def _worker(w: WorkerInfo) -> dict[str, Any]:
    return {
        "name": w.name,
        "status": w.status,
        "capacity": w.capacity,
        "heartbeat_age_seconds": round(w.heartbeat_age_seconds, 1),
    }


def read_status(conn: psycopg.Connection[Any]) -> QueueStatus:
    counts: dict[str, dict[str, int]] = {}
    with conn.cursor() as cur:
        cur.execute(query("status_counts"))
        for status, kind, n in cur.fetchall():
            counts.setdefault(str(status), {})[str(kind)] = int(n)
        cur.execute(query("status_oldest_pending"))
        row = cur.fetchone()
        oldest = float(row[0]) if row and row[0] is not None else None
        cur.execute(query("status_workers"))
        workers = [
            WorkerInfo(str(name), str(st), cap, float(age or 0.0))
            for name, st, cap, age in cur.fetchall()
        ]
    return QueueStatus(counts, oldest, workers)


def format_status(st: QueueStatus) -> str:
    """A plain-text table for terminals."""
    lines = ["STATUS      TOOL_KIND        COMMANDS"]
    for status in sorted(st.counts):
        for kind, n in sorted(st.counts[status].items()):
            lines.append(f"{status:<11} {kind:<16} {n:>8}")
    if len(lines) == 1:
        lines.append("(no commands)")
    oldest = "-" if st.oldest_pending_seconds is None else f"{st.oldest_pending_seconds:.1f}s"
    lines += [
        "",
        f"oldest pending: {oldest}",
        "",
        "WORKER                          STATUS   CAPACITY  HEARTBEAT_AGE",
    ]
    for w in st.workers:
        lines.append(
            f"{w.name:<31} {w.status:<8} {w.capacity if w.capacity is not None else '-':>8}"
            f"  {w.heartbeat_age_seconds:>12.1f}s"
        )
    if not st.workers:
        lines.append("(no workers registered)")
    return "\n".join(lines)
