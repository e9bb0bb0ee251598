"""Reading a statement's results from PostgreSQL a chunk at a time.

``cursor.execute`` keeps a whole result in memory before the first row can be looked at. Here
the SQL text (one statement or several, the simple query protocol as ``execute`` uses without
parameters) is sent with libpq's chunked-rows mode (single-row mode before libpq 17), each
chunk converted as psycopg converts rows and counted against a :class:`ResultCap`: a result
larger than the cap stops at the cap with a clear error, the worker's memory bounded by the
cap plus one chunk.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors, generators, pq
from psycopg.abc import PQGen
from psycopg.adapt import Transformer
from psycopg.rows import tuple_row

from .resultcap import ResultCap, ResultTooLarge

#: Rows per chunk.
CHUNK_ROWS = 256
_ROWS = (pq.ExecStatus.TUPLES_CHUNK, pq.ExecStatus.SINGLE_TUPLE)


@dataclass
class Statement:
    """One statement's outcome: ``columns`` (None when it returns no rows), its rows, the
    count of rows it changed, whether it was empty (only comments)."""

    columns: list[str] | None = None
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    rowcount: int = -1
    empty: bool = False


def _send(pgconn: pq.abc.PGconn, sql: bytes) -> PQGen[None]:
    pgconn.send_query(sql)
    if pq.version() >= 170000:
        pgconn.set_chunked_rows_mode(CHUNK_ROWS)
    else:
        pgconn.set_single_row_mode()
    yield from generators.send(pgconn)


def run_streamed(conn: psycopg.Connection[Any], sql: str, cap: ResultCap) -> list[Statement]:
    """Run ``sql`` (no parameters) on ``conn``, in its current transaction; every
    statement's outcome. Raises the first error PostgreSQL answers (after reading the rest),
    or :class:`ResultTooLarge` (the connection is then unusable: close it)."""
    out: list[Statement] = []
    error: psycopg.Error | None = None
    encoding = conn.info.encoding
    with conn.lock:
        conn.wait(_send(conn.pgconn, sql.encode()))
        tx = Transformer(conn)
        current: Statement | None = None
        while (res := conn.wait(generators.fetch(conn.pgconn))) is not None:
            status = pq.ExecStatus(res.status)
            if status in _ROWS or status == pq.ExecStatus.TUPLES_OK:
                if current is None:
                    names = [(res.fname(i) or b"").decode(encoding) for i in range(res.nfields)]
                    current = Statement(columns=names)
                    out.append(current)
                if res.ntuples:
                    tx.set_pgresult(res)
                    rows = tx.load_rows(0, res.ntuples, tuple_row(None))  # type: ignore[arg-type]
                    try:
                        cap.add(rows)
                    except ResultTooLarge:
                        _abandon(conn)
                        raise
                    current.rows.extend(rows)
                if status == pq.ExecStatus.TUPLES_OK:
                    current.rowcount = len(current.rows)
                    current = None
            elif status == pq.ExecStatus.COMMAND_OK:
                out.append(Statement(rowcount=_rowcount(res)))
            elif status == pq.ExecStatus.EMPTY_QUERY:
                out.append(Statement(empty=True))
            elif status == pq.ExecStatus.FATAL_ERROR and error is None:
                error = errors.error_from_result(res, encoding=encoding)
    if error is not None:
        raise error
    return out


def _abandon(conn: psycopg.Connection[Any]) -> None:
    """Cancel the running query and read what is left of it, a chunk at a time, unkept."""
    with contextlib.suppress(psycopg.Error):
        conn.cancel_safe(timeout=5)
    while conn.wait(generators.fetch(conn.pgconn)) is not None:
        pass


def _rowcount(res: pq.abc.PGresult) -> int:
    tuples = res.command_tuples
    return -1 if tuples is None else int(tuples)


__all__ = ["CHUNK_ROWS", "Statement", "run_streamed"]
