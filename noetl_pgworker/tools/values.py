"""Database values to JSON, deliberately: nothing is left to ``default=str`` by accident."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import ipaddress
import math
import uuid
from collections.abc import Sequence
from typing import Any

#: Values whose JSON form is their text: Decimal (exact), UUID, network addresses.
_AS_STRING = (
    decimal.Decimal,
    uuid.UUID,
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
)


def to_json(value: Any) -> Any:
    """A JSON-ready form of a value read from a database.

    Decimal → string (exact; NaN/Infinity too), float NaN/±Infinity → string, date/time →
    ISO 8601, interval → seconds, UUID and addresses → string, bytes → base64, arrays and
    composites → lists, JSON → as is.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, _AS_STRING):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json(v) for v in value]
    return str(value)


def statement_result(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """One statement's output: ``{columns, rows (as objects), row_count}``."""
    return {"columns": list(columns), "rows": rows_to_dicts(columns, rows), "row_count": len(rows)}


def rows_to_dicts(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Rows as objects keyed by column; a repeated column name gets a ``_2``, ``_3`` suffix."""
    keys: list[str] = []
    seen: dict[str, int] = {}
    for name in columns:
        n = seen.get(name, 0) + 1
        seen[name] = n
        keys.append(name if n == 1 else f"{name}_{n}")
    return [{k: to_json(v) for k, v in zip(keys, row, strict=False)} for row in rows]
