from __future__ import annotations

import json

import pytest

from noetl_pgworker import events
from noetl_pgworker.models import CommandRef, Outcome

from ..conftest import SAMPLES

pytestmark = pytest.mark.unit

REF = CommandRef(
    execution_id=1, command_id=2, catalog_id=3, step="start", tool_kind="python", meta_command_id=2
)


def envelope_ok(result: object) -> bool:
    """The result CHECK of noetl.event, in Python."""
    if result is None:
        return True
    return (
        isinstance(result, dict)
        and isinstance(result.get("status"), str)
        and set(result) <= {"status", "reference", "context"}
        and isinstance(result.get("context", {}), dict)
        and isinstance(result.get("reference", {}), dict)
    )


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("call.done", "COMPLETED"),
        ("call.error", "FAILED"),
        ("step.exit", "COMPLETED"),
        ("command.completed", "COMPLETED"),
        ("command.failed", "FAILED"),
        ("command.started", "RUNNING"),
        ("command.claimed", "RUNNING"),
    ],
)
def test_event_status_follows_noetls_name_rule(name: str, status: str) -> None:
    assert events.event_status(name) == status


def test_success_events_match_noetls_shapes() -> None:
    sample = json.loads((SAMPLES / "noetl-4.26-events-happy.json").read_text())
    by_type = {e["event_type"]: e for e in sample if e["node_name"] == "start"}
    out = Outcome.success({"msg": "hi world", "n": 1}, duration=0.5)
    evs = events.finished_events(REF, out, "probe-1", row_limit=1 << 20)
    assert [e["event_type"] for e in evs] == ["call.done", "step.exit", "command.completed"]
    for ev in evs:
        want = by_type[ev["event_type"]]
        assert ev["status"] == want["status"]
        assert set(ev["result"]) == set(want["result"])
        assert set(ev["result"]["context"]) == set(want["result"]["context"])
        assert ev["meta"]["actionable"] == want["meta"]["actionable"]
        assert envelope_ok(ev["result"])
    started = events.started_event(REF, "probe-1")
    assert started["result"] == {
        "status": "RUNNING",
        "context": {"worker_id": "probe-1", "command_id": 2},
    }


def test_failure_events_carry_the_error() -> None:
    out = Outcome.failure("ValueError: boom", error_type="exception")
    evs = events.finished_events(REF, out, "w", row_limit=1 << 20)
    assert [e["event_type"] for e in evs] == ["call.error", "step.exit", "command.failed"]
    assert all(e["error"] == "ValueError: boom" for e in evs)
    assert evs[0]["result"] == {
        "status": "FAILED",
        "context": {"error": "ValueError: boom", "error_type": "exception", "command_id": 2},
    }
    assert evs[2]["meta"]["error_type"] == "exception"
    assert all(envelope_ok(e["result"]) for e in evs)


@pytest.mark.parametrize("data", [[1, 2], 42, "text", None, True])
def test_non_object_results_are_wrapped(data: object) -> None:
    result = events.row_result(REF, Outcome.success(data), "w", 1 << 20)
    assert result["context"]["data"] == data
    assert envelope_ok(result)


def test_large_results_are_summarised_not_inlined() -> None:
    big = {"blob": "x" * 300_000}
    row = events.row_result(REF, Outcome.success(big), "w", 1 << 20)
    assert row["context"]["blob"] == big["blob"]  # under the row limit: inline
    evs = events.finished_events(REF, Outcome.success(big), "w", row_limit=1 << 20)
    for ev in evs:
        assert len(json.dumps(ev["result"])) < events.EVENT_CONTEXT_LIMIT
        assert ev["result"]["context"]["truncated"] is True
    small_limit = events.row_result(REF, Outcome.success(big), "w", 10_000)
    assert small_limit["context"]["original_bytes"] > 300_000
