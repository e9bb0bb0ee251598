"""Server mode: an output too large for an event travels by reference (the fake encodes what
NoETL 4.26 does with ``PUT /api/result`` and a ``reference`` in ``call.done``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from noetl_pgworker.enqueue import ensure_catalog
from noetl_pgworker.externalise import INLINE_LIMIT

from ..conftest import RunningWorker
from ..fake_noetl import FakeNoetl
from ..helpers import scalar, wait_until

pytestmark = pytest.mark.integration

COUNT = 60000  # about 1.9 MB of JSON: above INLINE_LIMIT
BIG = (
    "python",
    {
        "code": "def main(count):\n"
        "    items = [{'i': i, 'name': f'item-{i}'} for i in range(count)]\n"
        "    return {'n': len(items), 'label': 'big', 'items': items}\n"
    },
    "use",
    lambda resp: {"count": len(resp["items"]), "last": resp["items"][-1]["name"], "n": resp["n"]},
)
USE = (
    "python",
    {"code": "def main(count, last, n):\n    return {'count': count, 'last': last, 'n': n}\n"},
    "end",
    lambda resp: {},
)
PLAYBOOK = {"big": BIG, "use": USE, "end": ("noop", {}, None, None)}


@pytest.fixture
def fake(dsn: str) -> Iterator[FakeNoetl]:
    server = FakeNoetl(dsn, PLAYBOOK)
    yield server
    server.close()


def test_an_output_too_large_for_an_event_reaches_the_next_step_whole(
    start_worker: Callable[..., RunningWorker], conn: psycopg.Connection[Any], fake: FakeNoetl
) -> None:
    execution_id = int(scalar(conn, "SELECT noetl.snowflake_id()"))
    fake.issue(execution_id, "big", *BIG[:2], {"count": COUNT}, catalog_id=ensure_catalog(conn))
    start_worker(server_url=fake.url, worker_id="big-1")
    wait_until(
        lambda: scalar(
            conn,
            "SELECT count(*) FROM noetl.event WHERE execution_id = %s"
            " AND event_type = 'playbook.completed'",
            (execution_id,),
        ),
        timeout=90,
    )
    results = dict(conn.execute("SELECT step_name, result FROM noetl.command").fetchall())
    # the next step got every item, not a summary
    assert results["use"]["context"] == {"count": COUNT, "last": f"item-{COUNT - 1}", "n": COUNT}
    puts = [body for path, _, body in fake.requests if path.startswith("/api/result/")]
    assert len(puts) == 1 and puts[0]["name"] == "big" and len(puts[0]["data"]["items"]) == COUNT
    done = next(e for e in fake.received if e["name"] == "call.done" and e["step"] == "big")
    response = done["payload"]["response"]
    # the event carried the reference and the output's scalar fields, not the items
    assert response["reference"]["kind"] == "result_ref"
    assert response["reference"]["ref"].startswith(f"noetl://execution/{execution_id}/result/big/")
    assert response["n"] == COUNT and response["label"] == "big" and "items" not in response
    assert response["_size_bytes"] > INLINE_LIMIT
    assert not fake.rejections, fake.rejections
