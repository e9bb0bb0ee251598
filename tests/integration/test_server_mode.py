"""Server mode against a fake NoETL server that applies what the real one applies."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from noetl_pgworker.enqueue import ensure_catalog
from noetl_pgworker.models import CommandRef

from ..conftest import RunningWorker
from ..fake_noetl import FakeNoetl
from ..helpers import scalar, wait_until

pytestmark = pytest.mark.integration

PLAYBOOK = {
    "start": (
        "python",
        {"code": "def main(greeting):\n    return {'msg': greeting + ' world', 'n': 1}\n"},
        "middle",
        lambda resp: {"prev_msg": resp["msg"]},
    ),
    "middle": (
        "python",
        {"code": "def main(prev_msg):\n    return {'upper': prev_msg.upper()}\n"},
        "finish",
        lambda resp: {},
    ),
    "finish": ("noop", {}, None, None),
}


@pytest.fixture
def fake(dsn: str) -> Iterator[FakeNoetl]:
    server = FakeNoetl(dsn, PLAYBOOK)
    yield server
    server.close()


def start_execution(conn: psycopg.Connection[Any], fake: FakeNoetl) -> int:
    execution_id = int(scalar(conn, "SELECT noetl.snowflake_id()"))
    fake.issue(
        execution_id,
        "start",
        *PLAYBOOK["start"][:2],
        {"greeting": "hi"},
        catalog_id=ensure_catalog(conn),
    )
    return execution_id


def finished(conn: psycopg.Connection[Any], execution_id: int) -> bool:
    return bool(
        scalar(
            conn,
            "SELECT count(*) FROM noetl.event WHERE execution_id = %s"
            " AND event_type = 'playbook.completed'",
            (execution_id,),
        )
    )


def assert_exactly_once(fake: FakeNoetl, conn: psycopg.Connection[Any]) -> None:
    finals = [e for e in fake.received if e["name"] in ("command.completed", "command.failed")]
    ids = [e["payload"]["command_id"] for e in finals]
    assert len(ids) == len(set(ids)), "a terminal event was applied twice"
    rows = conn.execute("SELECT status, count(*) FROM noetl.command GROUP BY status").fetchall()
    assert dict(rows) == {"COMPLETED": len(ids)}
    assert not fake.rejections, fake.rejections


def test_a_three_step_workflow_advances_and_completes(
    start_worker: Callable[..., RunningWorker], conn: psycopg.Connection[Any], fake: FakeNoetl
) -> None:
    execution_id = start_execution(conn, fake)
    start_worker(server_url=fake.url, worker_id="srv-1")
    wait_until(lambda: finished(conn, execution_id), timeout=60)
    results = dict(conn.execute("SELECT step_name, result FROM noetl.command").fetchall())
    assert results["middle"]["context"]["upper"] == "HI WORLD"  # read the first step's output
    assert results["start"]["context"] == {"msg": "hi world", "n": 1}
    assert_exactly_once(fake, conn)
    # The worker wrote no lifecycle rows of its own beyond the claim: the server did, once each.
    assert scalar(conn, "SELECT count(*) FROM noetl.event WHERE event_type = 'call.done'") == 3
    assert (
        scalar(conn, "SELECT count(*) FROM noetl.event WHERE event_type = 'command.claimed'") == 3
    )
    names = [e["name"] for e in fake.received if e["step"] == "middle"]
    assert names == ["command.started", "step.enter", "call.done", "step.exit", "command.completed"]
    # call.*, step.exit and command.* of a command travel in one batch
    for _path, headers, body in fake.requests:
        names = [e["name"] for e in body["events"]]
        if "call.done" in names:
            assert {"step.exit", "command.completed"} <= set(names)
        key = {k.lower(): v for k, v in headers.items()}["idempotency-key"]
        assert key.startswith(f"srv-1:{body['execution_id']}:")


def test_a_server_down_mid_run_loses_nothing_and_applies_nothing_twice(
    start_worker: Callable[..., RunningWorker], conn: psycopg.Connection[Any], fake: FakeNoetl
) -> None:
    execution_id = start_execution(conn, fake)
    fake.down = True  # the first step runs while the server is away
    start_worker(server_url=fake.url, worker_id="srv-2")
    wait_until(
        lambda: scalar(conn, "SELECT count(*) FROM noetl.command WHERE worker_id = 'srv-2'") == 1
    )
    time.sleep(2.0)  # several retries fail
    assert scalar(conn, "SELECT status FROM noetl.command") == "CLAIMED"  # nothing written
    fake.down = False
    fake.drop_after_apply = 1  # and one answer is lost after the server applied the batch
    wait_until(lambda: finished(conn, execution_id), timeout=60)
    assert_exactly_once(fake, conn)


def issue_with_externalised_input(
    conn: psycopg.Connection[Any], fake: FakeNoetl, greeting: str
) -> int:
    """A python command whose `context.input` NoETL's server moved out of the row (a
    `result_ref` the fake resolves to `{"greeting": greeting}`); returns its execution id."""
    execution_id = int(scalar(conn, "SELECT noetl.snowflake_id()"))
    ref = f"noetl://execution/{execution_id}/result/input/1"
    fake.refs[ref] = {"greeting": greeting}
    fake.issue(
        execution_id,
        "start",
        "python",
        {"code": "def main(greeting):\n    return {'msg': greeting}\n"},
        {},
        catalog_id=ensure_catalog(conn),
    )
    conn.execute(
        "UPDATE noetl.command SET context = jsonb_set(context, '{input}',"
        " jsonb_build_object('kind', 'result_ref', 'ref', %s::text))",
        (ref,),
    )
    return execution_id


def test_externalised_context_is_resolved_through_the_server(
    start_worker: Callable[..., RunningWorker], conn: psycopg.Connection[Any], fake: FakeNoetl
) -> None:
    execution_id = issue_with_externalised_input(conn, fake, "resolved")
    missing = fake.issue(execution_id, "start", "python", {"code": "result = 1"}, {})
    conn.execute(
        "UPDATE noetl.command SET context = jsonb_set(context, '{tool_config}',"
        ' \'{"kind": "temp_ref", "ref": "noetl://nowhere"}\') WHERE command_id = %s',
        (missing,),
    )
    fake.playbook = {}
    start_worker(server_url=fake.url)
    wait_until(
        lambda: (
            scalar(
                conn, "SELECT count(*) FROM noetl.command WHERE status IN ('COMPLETED', 'FAILED')"
            )
            == 2
        ),
        timeout=30,
    )
    rows = dict(conn.execute("SELECT command_id, result FROM noetl.command").fetchall())
    assert [r["context"].get("msg") for c, r in rows.items() if c != missing] == ["resolved"]
    err = scalar(conn, "SELECT error FROM noetl.command WHERE command_id = %s", (missing,))
    assert "cannot resolve context.tool_config (noetl://nowhere)" in err


def test_without_the_batch_endpoint_events_go_one_by_one(
    start_worker: Callable[..., RunningWorker], conn: psycopg.Connection[Any], fake: FakeNoetl
) -> None:
    fake.no_batch = True
    execution_id = start_execution(conn, fake)
    start_worker(server_url=fake.url)
    wait_until(lambda: finished(conn, execution_id), timeout=60)
    assert any(path == "/api/events" for path, _, _ in fake.requests)
    assert_exactly_once(fake, conn)


def test_long_running_commands_send_command_heartbeats(
    conn: psycopg.Connection[Any], fake: FakeNoetl
) -> None:
    from noetl_pgworker.server import CommandHeartbeats, NoetlServer

    execution_id = int(scalar(conn, "SELECT noetl.snowflake_id()"))
    command_id = fake.issue(execution_id, "finish", "noop", {}, {}, catalog_id=ensure_catalog(conn))
    ref = CommandRef(
        execution_id=execution_id,
        command_id=command_id,
        catalog_id=1,
        step="finish",
        meta_command_id=command_id,
    )
    server = NoetlServer(fake.url)
    beats = CommandHeartbeats(server, "w-hb", lambda: [(ref, time.monotonic() - 10)], interval=0.2)
    beats.start()
    try:
        wait_until(lambda: any(e["name"] == "command.heartbeat" for e in fake.received), timeout=5)
    finally:
        beats.stop()
        server.close()
    beat = next(e for e in fake.received if e["name"] == "command.heartbeat")
    assert beat["payload"] == {"command_id": command_id, "worker_id": "w-hb"}
    assert not fake.rejections


def test_a_poison_command_is_reported_to_the_server(
    start_worker: Callable[..., RunningWorker], conn: psycopg.Connection[Any], fake: FakeNoetl
) -> None:
    execution_id = int(scalar(conn, "SELECT noetl.snowflake_id()"))
    command_id = fake.issue(
        execution_id, "start", "python", {"code": "result = 1"}, {}, catalog_id=ensure_catalog(conn)
    )
    # Run three times by workers that died with it (none of them registered any more).
    conn.execute(
        "UPDATE noetl.command SET status = 'RUNNING', worker_id = 'gone', attempt = 3,"
        " claimed_at = now() - interval '1 hour'"
    )
    fake.playbook = {}
    start_worker(server_url=fake.url, lease=1, stale_after=2)
    wait_until(lambda: any(e["name"] == "command.failed" for e in fake.received), timeout=20)
    failed = [e for e in fake.received if e["name"] == "command.failed"]
    assert len(failed) == 1
    assert failed[0]["payload"]["command_id"] == command_id
    assert "abandoned by 3 worker(s)" in failed[0]["payload"]["error"]
    assert failed[0]["payload"]["error_type"] == "abandoned"
    assert [e["name"] for e in fake.received] == ["call.error", "step.exit", "command.failed"]
    assert scalar(conn, "SELECT status FROM noetl.command") == "FAILED"
    assert not fake.rejections


def test_the_fake_fails_a_batch_whose_envelope_the_real_check_refuses(
    conn: psycopg.Connection[Any], fake: FakeNoetl
) -> None:
    """Pins the rule observed on NoETL 4.26 (chk_event_result_shape): the envelope the worker
    sent before this rule was known ({status, context, command_id}) is accepted with 202, then
    the batch fails and the workflow does not advance."""
    import httpx

    execution_id = start_execution(conn, fake)
    command_id = int(scalar(conn, "SELECT command_id FROM noetl.command"))
    old = {"status": "COMPLETED", "context": {"msg": "x"}, "command_id": command_id}
    body = {
        "execution_id": str(execution_id),
        "worker_id": "old",
        "events": [
            {
                "step": "start",
                "name": "call.done",
                "payload": {"response": {"msg": "x"}, "result": old, "command_id": command_id},
                "actionable": True,
                "informative": True,
                "meta": {"command_id": command_id},
            }
        ],
    }
    answer = httpx.post(
        f"{fake.url}/api/events/batch",
        json=body,
        headers={"Idempotency-Key": f"old:{execution_id}:1"},
    )
    assert answer.status_code == 202
    status = httpx.get(f"{fake.url}/api/events/batch/{answer.json()['request_id']}/status")
    assert status.json()["state"] == "failed"
    assert "chk_event_result_shape" in status.json()["message"]
    assert scalar(conn, "SELECT count(*) FROM noetl.command WHERE step_name = 'middle'") == 0


def test_a_batch_the_server_fails_after_accepting_it_is_reported(
    start_worker: Callable[..., RunningWorker],
    conn: psycopg.Connection[Any],
    fake: FakeNoetl,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.fail_batches = "deadlock detected"
    start_execution(conn, fake)
    running = start_worker(server_url=fake.url, worker_id="srv-bf", metrics_port=0)
    worker = running.worker
    wait_until(lambda: worker.batch_checker is not None and worker.batch_checker.failed_total > 0)
    assert any(
        "failed batch" in r.getMessage() and "deadlock detected" in r.getMessage()
        for r in caplog.records
    )
    from prometheus_client import generate_latest

    from noetl_pgworker.metrics import Metrics

    assert isinstance(worker.metrics, Metrics)
    text = generate_latest(worker.metrics.registry).decode()
    failed = [
        line
        for line in text.splitlines()
        if line.startswith("noetl_pgworker_server_batches_failed")
    ]
    assert failed and float(failed[0].split()[-1]) >= 1
    # Published in the worker's runtime row, which `status` reads.
    wait_until(
        lambda: (
            int(
                scalar(
                    conn,
                    "SELECT COALESCE((runtime ->> 'server_batches_failed')::int, 0)"
                    " FROM noetl.runtime WHERE name = 'srv-bf'",
                )
                or 0
            )
            > 0
        )
    )
    from noetl_pgworker.status import format_status, read_status

    st = read_status(conn)
    assert next(w.server_batches_failed for w in st.workers if w.name == "srv-bf") > 0
    assert "accepted by the NoETL server and then failed" in format_status(st)
    running.stop()


def test_results_are_resolved_on_the_older_servers_route(
    start_worker: Callable[..., RunningWorker], conn: psycopg.Connection[Any], fake: FakeNoetl
) -> None:
    """Observed on NoETL 2.103.4: the resolver answers at /api/api/result/resolve."""
    fake.resolve_path = "/api/api/result/resolve"
    issue_with_externalised_input(conn, fake, "old route")
    start_worker(server_url=fake.url, worker_id="srv-old")
    wait_until(
        lambda: (
            scalar(conn, "SELECT status FROM noetl.command WHERE step_name = 'start'")
            == "COMPLETED"
        )
    )
    response = next(e for e in fake.received if e["name"] == "call.done")["payload"]["response"]
    assert response == {"msg": "old route"}


def test_each_outcome_travels_in_a_batch_of_its_own(
    start_worker: Callable[..., RunningWorker], conn: psycopg.Connection[Any], fake: FakeNoetl
) -> None:
    """Observed on NoETL 4.26: only the last call.done of a batch advances the workflow, so
    two outcomes of one execution in one batch left a fan-out waiting forever."""
    execution_id = start_execution(conn, fake)
    fake.issue(execution_id, "start", *PLAYBOOK["start"][:2], {"greeting": "hey"})
    # Both finish together and reach the writer in one flush.
    start_worker(server_url=fake.url, worker_id="srv-fan", concurrency=2, flush_interval=0.3)
    wait_until(
        lambda: (
            scalar(
                conn,
                "SELECT count(*) FROM noetl.command WHERE step_name = 'finish'"
                " AND status = 'COMPLETED'",
            )
            == 2
        ),
        timeout=60,
    )
    for _path, _headers, body in fake.requests:
        outcomes = [e for e in body["events"] if e["name"] in ("call.done", "call.error")]
        assert len(outcomes) <= 1


def test_a_playbook_step_starts_its_sub_playbook_through_the_server(
    start_worker: Callable[..., RunningWorker], conn: psycopg.Connection[Any], fake: FakeNoetl
) -> None:
    """Seen on NoETL 4.26 and 2.103.4: a `kind: playbook` step stayed PENDING for ever (no
    worker ran the kind); NoETL's worker starts the child with POST /api/execute."""
    execution_id = int(scalar(conn, "SELECT noetl.snowflake_id()"))
    fake.issue(
        execution_id,
        "child",
        "playbook",
        {"path": "e2e/child", "input": {"base": 20}},
        {},
        catalog_id=ensure_catalog(conn),
    )
    start_worker(server_url=fake.url, worker_id="srv-pb")
    wait_until(
        lambda: (
            scalar(conn, "SELECT status FROM noetl.command WHERE step_name = 'child'")
            == "COMPLETED"
        )
    )
    assert fake.executions[0]["path"] == "e2e/child"
    assert fake.executions[0]["parent_execution_id"] == execution_id
    assert fake.executions[0]["payload"]["base"] == 20
    done = next(e for e in fake.received if e["name"] == "call.done")
    assert done["payload"]["response"]["execution_id"] == "7001"


def test_cancel_an_execution_through_the_server_stops_its_running_command(
    start_worker: Callable[..., RunningWorker], conn: psycopg.Connection[Any], fake: FakeNoetl
) -> None:
    from noetl_pgworker import control

    execution_id = int(scalar(conn, "SELECT noetl.snowflake_id()"))
    sleepy = {"code": "import time\ndef main():\n    time.sleep(60)\n    return 1\n"}
    cid = fake.issue(execution_id, "nap", "python", sleepy, {}, catalog_id=ensure_catalog(conn))
    running = start_worker(server_url=fake.url, poll_interval=60, python_mode="process")
    wait_until(
        lambda: (
            scalar(conn, "SELECT status FROM noetl.command WHERE command_id = %s", (cid,))
            == "RUNNING"
        ),
        timeout=30,
    )
    result = control.cancel_execution(conn, execution_id, wait=20, by="tester", server_url=fake.url)
    assert result.ok, result
    assert result.message.startswith(f"NoETL server: execution {execution_id} cancelled")
    assert fake.cancelled == [(execution_id, {"reason": "cancelled by tester"})]
    assert result.data["commands"][0]["seconds"] < 20  # stopped, not waited for
    running.stop()
    failed = [e for e in fake.received if e["name"] == "command.failed"]
    assert len(failed) == 1 and "cancelled by tester" in json.dumps(failed[0]), failed
