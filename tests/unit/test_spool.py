"""The spool: what it keeps is read back; what cannot be read is set aside, never fatal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from noetl_pgworker.models import CommandRef, Outcome
from noetl_pgworker.spool import Spool, Spooled

pytestmark = pytest.mark.unit


def item(command_id: int, data: object = None) -> Spooled:
    ref = CommandRef(
        execution_id=1, command_id=command_id, catalog_id=1, step="s", tool_kind="noop"
    )
    return Spooled(ref, Outcome.success(data if data is not None else {"n": command_id}))


def test_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "w/1")
    assert spool.save([item(1), item(2)]) == 2
    back = spool.take()
    assert [s.ref.command_id for s in back] == [1, 2]
    assert back[0].outcome.data == {"n": 1}
    assert not spool.path.exists()
    assert spool.take() == []


def test_a_line_nested_too_deep_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, "w1")
    spool.save([item(1)])
    deep = "[" * 100_000 + "]" * 100_000
    with spool.path.open("a") as fh:
        fh.write(deep + "\n")
        fh.write("{not json\n")
    spool.save([item(2)])
    with caplog.at_level(logging.ERROR):
        back = spool.take()
    assert [s.ref.command_id for s in back] == [1, 2]
    rejected = spool.path.with_name(spool.path.name + ".rejected")
    assert rejected.read_text().splitlines() == [deep, "{not json"]
    assert "line 2" in caplog.text and "nested too deeply" in caplog.text
    assert str(rejected) in caplog.text
    assert not spool.path.exists()


def test_an_outcome_that_cannot_be_serialised_does_not_stop_the_others(tmp_path: Path) -> None:
    deep: list[object] = []
    cur = deep
    for _ in range(100_000):
        nxt: list[object] = []
        cur.append(nxt)
        cur = nxt
    spool = Spool(tmp_path, "w1")
    assert spool.save([item(1), item(2, deep), item(3)]) == 2
    assert [
        json.loads(line)["ref"]["command_id"] for line in spool.path.read_text().splitlines()
    ] == [
        1,
        3,
    ]
