"""What the queue and the workers look like right now.

Live commands (PENDING, CLAIMED, RUNNING) are counted exactly, from the worker's partial
indexes. History (terminal commands) is estimated from the planner's statistics unless
``exact`` is asked for: counting it means reading every row NoETL ever kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from .queries import query


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    name: str
    status: str
    capacity: int | None
    heartbeat_age_seconds: float
    in_flight: int = 0
    completed: int = 0
    failed: int = 0
    #: Server mode: event batches the NoETL server accepted (202) and then failed.
    server_batches_failed: int = 0


@dataclass(frozen=True, slots=True)
class QueueStatus:
    counts: dict[str, dict[str, int]]  # status -> tool kind -> commands
    oldest_pending_seconds: float | None
    workers: list[WorkerInfo]
    stuck: int = 0
    lease_seconds: float = 120.0
    #: terminal status -> commands, estimated from statistics (empty when ``exact``)
    estimated: dict[str, int] = field(default_factory=dict)
    exact: bool = False
    #: FAILED and CANCELLED commands that ended in the last ``recent_hours``, exactly:
    #: status -> tool kind -> commands
    recent_failures: dict[str, dict[str, int]] = field(default_factory=dict)
    recent_hours: float = 24.0
    #: tool kinds no worker claims (``noetl-pgworker pause``)
    paused: list[str] = field(default_factory=list)

    def total(self, status: str) -> int:
        if status in self.counts:
            return sum(self.counts[status].values())
        return self.estimated.get(status, 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "totals": {s: self.total(s) for s in sorted({*self.counts, *self.estimated})},
            "estimated": sorted(self.estimated),
            "exact": self.exact,
            "oldest_pending_seconds": self.oldest_pending_seconds,
            "stuck_past_lease": self.stuck,
            "lease_seconds": self.lease_seconds,
            "workers": [_worker(w) for w in self.workers],
            "recent_failures": {"hours": self.recent_hours, "counts": self.recent_failures},
            "paused_tool_kinds": self.paused,
        }


def _worker(w: WorkerInfo) -> dict[str, Any]:
    return {
        "name": w.name,
        "status": w.status,
        "capacity": w.capacity,
        "heartbeat_age_seconds": round(w.heartbeat_age_seconds, 1),
        "in_flight": w.in_flight,
        "completed": w.completed,
        "failed": w.failed,
        "server_batches_failed": w.server_batches_failed,
    }


def _recent_failures(
    cur: psycopg.Cursor[Any], hours: float
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """FAILED/CANCELLED commands of the last ``hours`` (exact, from their own index) and the
    paused tool kinds."""
    recent: dict[str, dict[str, int]] = {}
    cur.execute(query("status_recent_failures"), {"seconds": hours * 3600})
    for status, kind, n in cur.fetchall():
        recent.setdefault(str(status), {})[str(kind)] = int(n)
    cur.execute(query("control_paused_kinds"))
    return recent, [str(r[0]) for r in cur.fetchall()]


def read_status(
    conn: psycopg.Connection[Any],
    lease: float = 120.0,
    *,
    exact: bool = False,
    recent_hours: float = 24.0,
) -> QueueStatus:
    """The queue's state. Costs the same however much history the tables hold, unless
    ``exact``: then every command is counted, history included (a scan of the whole table)."""
    counts: dict[str, dict[str, int]] = {}
    estimated: dict[str, int] = {}
    with conn.cursor() as cur:
        cur.execute(query("status_counts" if exact else "queue_depth"))
        for status, kind, n in cur.fetchall():
            counts.setdefault(str(status), {})[str(kind)] = int(n)
        if not exact:
            live = sum(sum(kinds.values()) for kinds in counts.values())
            cur.execute(query("status_history_estimate"), {"live": live})
            estimated = {str(status): int(n) for status, n in cur.fetchall()}
        cur.execute(query("status_oldest_pending"))
        row = cur.fetchone()
        oldest = float(row[0]) if row and row[0] is not None else None
        cur.execute(query("status_stuck"), {"lease": lease})
        stuck_row = cur.fetchone()
        cur.execute(query("status_workers"))
        workers = [
            WorkerInfo(
                str(name), str(st), cap, float(age or 0.0), int(fl), int(done), int(fail), int(bf)
            )
            for name, st, cap, age, fl, done, fail, bf in cur.fetchall()
        ]
        recent, paused = _recent_failures(cur, recent_hours)
    return QueueStatus(
        counts,
        oldest,
        workers,
        int(stuck_row[0]) if stuck_row else 0,
        lease,
        estimated,
        exact,
        recent,
        recent_hours,
        paused,
    )


def format_status(st: QueueStatus, rates: dict[str, float] | None = None) -> str:
    """A plain-text table for terminals; ``rates`` are commands/s per worker (``--watch``)."""
    lines = ["STATUS      TOOL_KIND        COMMANDS"]
    for status in sorted({*st.counts, *st.estimated}):
        for kind, n in sorted(st.counts.get(status, {}).items()):
            lines.append(f"{status:<11} {kind:<16} {n:>8}")
        if status in st.estimated and status not in st.counts:
            lines.append(
                f"{status:<11} {'(all, estimate)':<16} {'~' + str(st.estimated[status]):>8}"
            )
    if len(lines) == 1:
        lines.append(
            "(no commands)"
            if st.exact
            else "(no live commands; finished ones are estimated once PostgreSQL has analyzed"
            " the table: --exact counts them)"
        )
    if st.estimated:
        lines.append(
            "~ history estimated from the planner's statistics (pg_class, pg_stats);"
            " --exact counts every row"
        )
    lines += _format_recent(st)
    oldest = "-" if st.oldest_pending_seconds is None else f"{st.oldest_pending_seconds:.1f}s"
    lines += [
        "",
        f"oldest pending: {oldest}    stuck past the {st.lease_seconds:g} s lease: {st.stuck}"
        + (f"    paused: {', '.join(st.paused)}" if st.paused else ""),
        "",
        "WORKER                          STATUS   CAPACITY IN_FLIGHT  COMPLETED   FAILED"
        "  HEARTBEAT_AGE" + ("  CMDS/S(1m)" if rates is not None else ""),
    ]
    for w in st.workers:
        cap = w.capacity if w.capacity is not None else "-"
        line = (
            f"{w.name:<31} {w.status:<8} {cap:>8} {w.in_flight:>9} {w.completed:>10}"
            f" {w.failed:>8} {w.heartbeat_age_seconds:>13.1f}s"
        )
        if rates is not None:
            line += f" {rates.get(w.name, 0.0):>11.1f}"
        lines.append(line)
    if not st.workers:
        lines.append("(no workers registered)")
    for w in st.workers:
        if w.server_batches_failed:
            lines.append(
                f"! {w.name}: {w.server_batches_failed} event batch(es) accepted by the NoETL"
                " server and then failed there (see the worker's log)"
            )
    return "\n".join(lines)


def _format_recent(st: QueueStatus) -> list[str]:
    hours = f"{st.recent_hours:g} h"
    if not st.recent_failures:
        return ["", f"failed or cancelled in the last {hours}: none"]
    lines = ["", f"failed or cancelled in the last {hours} (exact):"]
    for status, kinds in sorted(st.recent_failures.items()):
        for kind, n in sorted(kinds.items()):
            lines.append(f"{status:<11} {kind:<16} {n:>8}")
    return lines


class RateTracker:
    """Commands/s per worker over the last minute, from successive status readings."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._history: list[tuple[float, dict[str, int]]] = []

    def update(self, now: float, st: QueueStatus) -> dict[str, float]:
        totals = {w.name: w.completed + w.failed for w in st.workers}
        self._history.append((now, totals))
        while len(self._history) > 1 and now - self._history[0][0] > self.window:
            self._history.pop(0)
        first_t, first = self._history[0]
        span = now - first_t
        if span <= 0:
            return {name: 0.0 for name in totals}
        return {name: max(0, n - first.get(name, n)) / span for name, n in totals.items()}
