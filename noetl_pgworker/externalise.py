"""Outputs too large for an event travel by reference (server mode).

A step's output goes to NoETL's server whole in ``call.done``'s ``response``; the server keeps
it as the step's result for the templates of later steps. A batch above 2 MiB is refused, so
an output above :data:`INLINE_LIMIT` is first stored with the server's result store (``PUT
/api/result/{execution_id}`` → a ``noetl://`` reference) and the response carries the
reference instead, with the output's scalar fields beside it::

    {"reference": {"kind": "result_ref", "ref": "noetl://…", "store": "disk", "bytes": N},
     "_size_bytes": N, <the output's scalar fields>}

NoETL's server (4.26) resolves such a ``reference`` when it records the step's result, so the
next step renders the real value, not a summary. A reference is made once per command (kept
while its outcome waits to be written); when the server refuses to store the output, the
response is a ``{truncated, preview}`` summary as before, and the refusal is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .jsontext import dumps
from .sink import Key, WriteItem

logger = logging.getLogger(__name__)

#: Above this an output is sent by reference (the server refuses batches above 2 MiB).
INLINE_LIMIT = 1536 * 1024
#: References kept for outcomes not yet written (a retried write reuses them).
KEPT_REFERENCES = 1024

#: ``put(execution_id, step, data)`` → the server's answer (``ref``, ``store``, ``bytes``);
#: raises on failure (a retryable failure propagates: the write is retried).
Put = Callable[[int, str, Any], dict[str, Any]]


class Refused(Exception):
    """The server will not store this output (not worth retrying)."""


class Externaliser:
    """Replaces too-large outputs of write items by references to the server's copy."""

    def __init__(self, put: Put, limit: int = INLINE_LIMIT) -> None:
        self._put = put
        self._limit = limit
        self._refs: OrderedDict[Key, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def item(self, item: WriteItem) -> WriteItem:
        outcome = item.outcome
        if outcome is None or not outcome.ok or outcome.data is None:
            return item
        size = len(dumps(outcome.data).encode())
        if size <= self._limit:
            return item
        reference = self._reference(item, size)
        if reference is None:
            return item
        data = by_reference(outcome.data, reference, size)
        return dataclasses.replace(item, outcome=dataclasses.replace(outcome, data=data))

    def _reference(self, item: WriteItem, size: int) -> dict[str, Any] | None:
        with self._lock:
            known = self._refs.get(item.key)
        if known is not None:
            return known
        assert item.outcome is not None
        try:
            answer = self._put(item.ref.execution_id, item.ref.step, item.outcome.data)
        except Refused as exc:
            logger.warning(
                "the server would not store a %d-byte output of %s; a summary goes instead: %s",
                size,
                item.ref.step,
                exc,
                extra={"action": "result_not_stored", "command_id": str(item.ref.command_id)},
            )
            return None
        reference = {
            "kind": "result_ref",
            "ref": str(answer["ref"]),
            "store": str(answer.get("store") or "kv"),
            "bytes": int(answer.get("bytes") or size),
        }
        with self._lock:
            self._refs[item.key] = reference
            while len(self._refs) > KEPT_REFERENCES:
                self._refs.popitem(last=False)
        return reference

    def written(self, keys: set[Key]) -> None:
        """Forget the references of outcomes now written."""
        with self._lock:
            for key in keys:
                self._refs.pop(key, None)


def by_reference(data: Any, reference: dict[str, Any], size: int) -> dict[str, Any]:
    """The response that stands for ``data``: its reference and its scalar fields."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        out = {str(k): v for k, v in data.items() if _small_scalar(v)}
    out["reference"] = reference
    out["_size_bytes"] = size
    return out


def _small_scalar(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float):
        return True
    return isinstance(value, str) and len(value) <= 1000


__all__ = ["INLINE_LIMIT", "Externaliser", "Put", "Refused", "by_reference"]
