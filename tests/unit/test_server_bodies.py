"""The exact JSON bodies sent to a NoETL server (server mode)."""

from __future__ import annotations

import json

import httpx
import pytest

from noetl_pgworker.errors import RetryLater, ToolError
from noetl_pgworker.models import Command, CommandRef, Outcome
from noetl_pgworker.server import (
    NoetlServer,
    ServerRejected,
    batch_body,
    idempotency_key,
    outcome_events,
    resolver,
    start_events,
)

pytestmark = pytest.mark.unit

REF = CommandRef(
    execution_id=771281641401483271,
    command_id=771281642072571914,
    catalog_id=1,
    step="start",
    tool_kind="python",
    meta_command_id=771281642072571914,
)


def test_start_events() -> None:
    assert start_events(REF, "w1") == [
        {
            "step": "start",
            "name": "command.started",
            "payload": {"command_id": 771281642072571914, "worker_id": "w1"},
            "actionable": False,
            "informative": True,
            "meta": {"command_id": 771281642072571914, "worker_id": "w1"},
        },
        {
            "step": "start",
            "name": "step.enter",
            "payload": {"status": "started", "command_id": 771281642072571914},
            "actionable": False,
            "informative": True,
            "meta": {"command_id": 771281642072571914, "worker_id": "w1"},
        },
    ]


def test_success_events_carry_response_and_envelope() -> None:
    evs = outcome_events(REF, Outcome.success({"msg": "hi world", "n": 1}), "w1")
    cid = 771281642072571914
    # Observed on NoETL 4.26: the server copies payload.result into the workflow.completed and
    # playbook.completed events it writes, whose CHECK allows only status/reference/context.
    envelope = {"status": "COMPLETED", "context": {"msg": "hi world", "n": 1}}
    meta = {"command_id": cid, "worker_id": "w1"}
    assert evs == [
        {
            "step": "start",
            "name": "call.done",
            "actionable": True,
            "informative": True,
            "meta": meta,
            "payload": {
                "response": {"msg": "hi world", "n": 1},
                "result": envelope,
                "command_id": cid,
                "loop_event_id": None,
                "loop_iteration_index": None,
            },
        },
        {
            "step": "start",
            "name": "step.exit",
            "actionable": False,
            "informative": True,
            "meta": meta,
            "payload": {
                "status": "COMPLETED",
                "result": envelope,
                "error": None,
                "command_id": cid,
            },
        },
        {
            "step": "start",
            "name": "command.completed",
            "actionable": False,
            "informative": True,
            "meta": meta,
            "payload": {"command_id": cid, "worker_id": "w1", "result": envelope},
        },
    ]


def test_failure_events_carry_error_and_type() -> None:
    evs = outcome_events(REF, Outcome.failure("ValueError: boom", error_type="exception"), "w1")
    assert [e["name"] for e in evs] == ["call.error", "step.exit", "command.failed"]
    call, exit_, final = (e["payload"] for e in evs)
    assert call["error"] == "ValueError: boom" and call["response"] is None
    envelope = {
        "status": "FAILED",
        "context": {"error": "ValueError: boom", "error_type": "exception"},
    }
    assert call["result"] == envelope
    assert exit_["status"] == "FAILED"
    assert final == {
        "command_id": 771281642072571914,
        "worker_id": "w1",
        "error": "ValueError: boom",
        "error_type": "exception",
        "result": envelope,
    }
    for ev in evs:  # what NoETL's event CHECK accepts once the server copies it
        assert set(ev["payload"].get("result") or {}) <= {"status", "reference", "context"}


def test_envelope_context_keeps_only_control_fields() -> None:
    data = {"rows": [{"a": 1}], "columns": ["a"], "row_count": 1, "meta": {"x": 1, "l": [1]}}
    (call, exit_, _) = outcome_events(REF, Outcome.success(data), "w1")
    assert call["payload"]["response"] == data  # the step result travels whole
    assert exit_["payload"]["result"] == {
        "status": "COMPLETED",
        "context": {"row_count": 1, "meta": {"x": 1}},
    }


def test_loop_iterations_echo_noetl_loop_keys() -> None:
    ref = CommandRef.from_row(
        {
            "execution_id": 1,
            "command_id": 2,
            "catalog_id": 3,
            "step_name": "each",
            "meta": {"command_id": 2, "__loop_epoch_id": "ep-1", "loop_iteration_index": 4},
        }
    )
    call, _, _ = outcome_events(ref, Outcome.success({"v": 1}), "w1")
    assert call["payload"]["loop_event_id"] == "ep-1"
    assert call["payload"]["loop_iteration_index"] == 4
    assert call["meta"]["__loop_epoch_id"] == "ep-1"
    assert call["meta"]["loop_iteration_index"] == 4


def test_batch_body_and_idempotency_key() -> None:
    body = batch_body(771281641401483271, "w1", [])
    assert body == {"execution_id": "771281641401483271", "worker_id": "w1", "events": []}
    text = json.dumps(body)
    key = idempotency_key("w1", 771281641401483271, text)
    assert key.startswith("w1:771281641401483271:") and len(key.split(":")[2]) == 32
    assert key == idempotency_key("w1", 771281641401483271, text)  # a retry sends the same key
    assert key != idempotency_key("w1", 771281641401483271, text + " ")


def server_answering(status: int, headers: dict[str, str] | None = None) -> NoetlServer:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers or {}, json={"detail": "field required"})

    return NoetlServer("http://noetl.test", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_transient_answers_are_retried(status: int) -> None:
    with pytest.raises(RetryLater) as info:
        server_answering(status, {"Retry-After": "7"}).post_batch(1, "w", [{"name": "x"}])
    assert info.value.retry_after == 7.0


@pytest.mark.parametrize("status", [400, 401, 403, 409, 422])
def test_validation_answers_are_not_retried(status: int) -> None:
    with pytest.raises(ServerRejected, match="field required"):
        server_answering(status).post_batch(1, "w", [{"name": "x"}])


def test_externalised_context_without_a_server_fails_clearly() -> None:
    cmd = Command(
        command_id="1",
        execution_id=2,
        step="s",
        tool_kind="noop",
        catalog_id=3,
        input={"input": {"kind": "result_ref", "ref": "noetl://execution/2/result/x/1"}},
    )
    with pytest.raises(ToolError, match="only in server mode"):
        resolver(None)(cmd)
    untouched = Command(
        command_id="1",
        execution_id=2,
        step="s",
        tool_kind="noop",
        catalog_id=3,
        input={"input": {"kind": "other"}},
    )
    assert resolver(None)(untouched) is untouched
