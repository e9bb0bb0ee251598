"""NoETL's lifecycle events and result envelopes, built from outcomes.

Everything here is pure: it turns a command reference and an outcome into the JSON-ready
dictionaries that the reporter writes (rows of ``noetl.event``, the ``result`` of
``noetl.command``). Every ``result`` is an envelope that passes NoETL's CHECK: an object with a
string ``status`` and nothing but ``status``, ``reference`` and ``context`` (an object).
"""

from __future__ import annotations

import math
from typing import Any

from .jsontext import clean_text, dumps
from .models import CommandRef, Outcome

#: NoETL drops ``result.context`` above this size; event rows stay under it.
EVENT_CONTEXT_LIMIT = 100 * 1024
_PREVIEW_CHARS = 1000


def event_status(name: str) -> str:
    """NoETL's rule: error/failed → FAILED; done/exit/completed → COMPLETED; else RUNNING."""
    if "error" in name or "failed" in name:
        return "FAILED"
    if "done" in name or "exit" in name or "completed" in name:
        return "COMPLETED"
    return "RUNNING"


def data_context(outcome: Outcome, limit: int) -> dict[str, Any]:
    """The ``context`` object of a result envelope, at most about ``limit`` bytes of data."""
    context: dict[str, Any]
    if not outcome.ok:
        context = {"error": clean_text(outcome.error)}
        if outcome.error_type:
            context["error_type"] = outcome.error_type
        if outcome.data is not None:
            context["response"] = _bounded(outcome.data, limit // 2)
    else:
        data = outcome.data
        text = dumps(data)
        if len(text.encode("utf-8")) > limit:
            context = _summary(text, limit)
        else:
            context = dict(data) if isinstance(data, dict) else {"data": data}
    if outcome.extra:
        for key, value in outcome.extra.items():
            context[key] = _bounded(value, max(1024, limit // 8))
    return context


def _summary(text: str, limit: int) -> dict[str, Any]:
    return {
        "truncated": True,
        "original_bytes": len(text.encode("utf-8")),
        "limit_bytes": limit,
        "preview": text[:_PREVIEW_CHARS],
    }


def _bounded(value: Any, limit: int) -> Any:
    """``value`` itself when its JSON fits in ``limit`` bytes, else a summary saying so."""
    text = dumps(value)
    if len(text.encode("utf-8")) > limit:
        return _summary(text, limit)
    return value


def envelope(status: str, context: dict[str, Any]) -> dict[str, Any]:
    return {"status": status, "context": context}


def _meta(ref: CommandRef, worker_id: str, *, actionable: bool) -> dict[str, Any]:
    meta = {
        "command_id": ref.wire_command_id,
        "worker_id": worker_id,
        "actionable": actionable,
        "informative": True,
    }
    if ref.attempt > 1:  # a run after the first (taken back, or retried) says which
        meta["attempt"] = ref.attempt
    return meta


def _event(
    ref: CommandRef,
    name: str,
    *,
    result: dict[str, Any] | None,
    meta: dict[str, Any],
    error: str | None = None,
    duration: float | None = None,
) -> dict[str, Any]:
    return {
        "execution_id": ref.execution_id,
        "command_id": ref.command_id,
        "catalog_id": ref.catalog_id,
        "parent_execution_id": ref.parent_execution_id,
        "event_type": name,
        "node_name": ref.step,
        "status": event_status(name),
        "duration": duration if duration is None or math.isfinite(duration) else None,
        "result": result,
        "meta": meta,
        "error": clean_text(error),
    }


def started_event(ref: CommandRef, worker_id: str) -> dict[str, Any]:
    """``command.started``."""
    return _event(
        ref,
        "command.started",
        result=envelope("RUNNING", {"worker_id": worker_id, "command_id": ref.wire_command_id}),
        meta=_meta(ref, worker_id, actionable=False),
    )


def row_result(ref: CommandRef, outcome: Outcome, worker_id: str, limit: int) -> dict[str, Any]:
    """The ``noetl.command.result`` envelope (also the ``command.completed|failed`` result)."""
    context = data_context(outcome, limit)
    context["worker_id"] = worker_id
    context["command_id"] = ref.wire_command_id
    if outcome.error_type == "cancelled":
        return envelope("CANCELLED", context)
    return envelope("COMPLETED" if outcome.ok else "FAILED", context)


def cancelled_event(
    ref: CommandRef, outcome: Outcome, worker_id: str, result: dict[str, Any]
) -> dict[str, Any]:
    """``command.cancelled``: the worker stopped the command (``noetl-pgworker cancel``)."""
    meta = _meta(ref, worker_id, actionable=False)
    meta["error_type"] = outcome.error_type
    return _event(
        ref,
        "command.cancelled",
        result=result,
        meta=meta,
        error=outcome.error,
        duration=outcome.duration,
    )


def finished_events(
    ref: CommandRef,
    outcome: Outcome,
    worker_id: str,
    *,
    loop_event_id: str | None = None,
    iter_index: int | None = None,
    row_limit: int,
) -> list[dict[str, Any]]:
    """``call.done|call.error``, ``step.exit``, ``command.completed|command.failed``."""
    status = "COMPLETED" if outcome.ok else "FAILED"
    call_context = data_context(outcome, EVENT_CONTEXT_LIMIT)
    call_context["command_id"] = ref.wire_command_id
    call_meta = _meta(ref, worker_id, actionable=True)
    if loop_event_id is not None:
        call_meta["loop_event_id"] = loop_event_id
        call_meta["loop_iteration_index"] = iter_index
    final = row_result(ref, outcome, worker_id, min(row_limit, EVENT_CONTEXT_LIMIT))
    final_meta = _meta(ref, worker_id, actionable=False)
    if not outcome.ok:
        final_meta["error_type"] = outcome.error_type
    return [
        _event(
            ref,
            "call.done" if outcome.ok else "call.error",
            result=envelope(status, call_context),
            meta=call_meta,
            error=outcome.error,
            duration=outcome.duration,
        ),
        _event(
            ref,
            "step.exit",
            result=envelope(status, dict(call_context)),
            meta=_meta(ref, worker_id, actionable=False),
            error=outcome.error,
        ),
        _event(
            ref,
            "command.completed" if outcome.ok else "command.failed",
            result=final,
            meta=final_meta,
            error=outcome.error,
            duration=outcome.duration,
        ),
    ]
