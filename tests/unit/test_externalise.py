"""Outputs too large for an event: stored once with the server, sent as a reference."""

from __future__ import annotations

from typing import Any

import pytest

from noetl_pgworker.externalise import Externaliser, Refused
from noetl_pgworker.models import CommandRef, Outcome
from noetl_pgworker.sink import WriteItem

pytestmark = pytest.mark.unit

REF = CommandRef(execution_id=7, command_id=8, catalog_id=9, step="big")


def item(data: Any, ok: bool = True) -> WriteItem:
    outcome = Outcome.success(data) if ok else Outcome.failure("boom", data=data)
    return WriteItem(REF, outcome=outcome)


class Server:
    def __init__(self, refuse: bool = False) -> None:
        self.puts: list[tuple[int, str, Any]] = []
        self.refuse = refuse

    def put(self, execution_id: int, step: str, data: Any) -> dict[str, Any]:
        self.puts.append((execution_id, step, data))
        if self.refuse:
            raise Refused("HTTP 413: too large")
        return {"ref": f"noetl://execution/{execution_id}/result/{step}/1", "store": "disk"}


BIG = {"n": 2, "label": "x" * 10, "long": "y" * 2000, "rows": [{"a": "z" * 600}] * 2}


def test_small_failed_and_empty_outputs_go_as_they_are() -> None:
    server = Server()
    ext = Externaliser(server.put, limit=1000)
    for it in (item({"a": 1}), item(BIG, ok=False), item(None)):
        assert ext.item(it) is it
    assert server.puts == []


def test_a_large_output_is_stored_once_and_sent_as_its_reference() -> None:
    server = Server()
    ext = Externaliser(server.put, limit=1000)
    first = ext.item(item(BIG))
    again = ext.item(item(BIG))  # a retried write reuses the reference
    assert len(server.puts) == 1 and server.puts[0] == (7, "big", BIG)
    assert first == again
    assert first.outcome is not None
    data = first.outcome.data
    assert data["reference"] == {
        "kind": "result_ref",
        "ref": "noetl://execution/7/result/big/1",
        "store": "disk",
        "bytes": data["_size_bytes"],
    }
    # the scalar fields travel beside it; long strings and collections do not
    assert data["n"] == 2 and data["label"] == "x" * 10
    assert "long" not in data and "rows" not in data
    ext.written({first.key})
    ext.item(item(BIG))
    assert len(server.puts) == 2  # forgotten once written


def test_a_list_output_is_sent_as_its_reference_alone() -> None:
    server = Server()
    out = Externaliser(server.put, limit=100).item(item(list(range(100))))
    assert out.outcome is not None
    assert set(out.outcome.data) == {"reference", "_size_bytes"}


def test_when_the_server_refuses_the_output_goes_as_before() -> None:
    server = Server(refuse=True)
    it = item(BIG)
    assert Externaliser(server.put, limit=1000).item(it) is it
    assert len(server.puts) == 1
