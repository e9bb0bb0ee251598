from __future__ import annotations

import json

import pytest

from noetl_pgworker.errors import MalformedCommand
from noetl_pgworker.models import Command, CommandRef

from ..conftest import SAMPLES

pytestmark = pytest.mark.unit


def sample_rows(name: str = "noetl-4.26-commands-happy.json") -> list[dict]:
    return json.loads((SAMPLES / name).read_text())


def test_maps_real_noetl_rows() -> None:
    row = sample_rows()[0]
    cmd = Command.from_row(row)
    assert cmd.command_id == "771281642072571914"
    assert cmd.execution_id == 771281641401483271
    assert cmd.step == "start"
    assert cmd.tool_kind == "python"
    assert cmd.input == row["context"]
    assert cmd.tool_config["code"].startswith("def main(greeting)")
    assert cmd.args == {"greeting": "hi"}
    assert cmd.event_id == row["event_id"]
    assert cmd.catalog_id == row["catalog_id"]
    assert cmd.attempt == 1
    assert cmd.meta["command_id"] == 771281642072571914
    assert cmd.loop_event_id is None and cmd.iter_index is None


def test_seed_fields_serialise_like_the_rust_command() -> None:
    cmd = Command.from_row(sample_rows()[2])
    # serde's JSON of the Rust struct: String id, i64 execution id, step, tool_kind, input.
    expected = {
        "command_id": "771281973363867681",
        "execution_id": 771281641401483271,
        "step": "finish",
        "tool_kind": "noop",
        "input": sample_rows()[2]["context"],
    }
    assert json.loads(cmd.seed_json()) == expected
    assert list(json.loads(cmd.seed_json())) == list(expected)


def test_ref_echoes_meta_command_id_as_it_came() -> None:
    row = dict(sample_rows()[0])
    row["meta"] = {**row["meta"], "command_id": "771281642072571914"}
    assert Command.from_row(row).ref.wire_command_id == "771281642072571914"
    assert CommandRef.from_row(row).command_id == 771281642072571914


def base_row(**changes: object) -> dict:
    row = {
        "command_id": 5,
        "event_id": 6,
        "execution_id": 7,
        "catalog_id": 8,
        "step_name": "s",
        "tool_kind": "noop",
        "context": {},
        "meta": {},
        "attempt": 1,
    }
    row.update(changes)
    return row


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # The claim returns context and meta as JSON text, parsed row by row.
        ({"context": '"a string"'}, "context is a JSON string, not an object"),
        ({"context": "[" * 3000 + "]" * 3000}, "context is nested too deeply"),
        ({"context": '{"input": ' * 3000 + "1" + "}" * 3000}, "context is nested too deeply"),
        ({"context": "{not json"}, "context is not JSON"),
        ({"meta": "[" * 3000 + "]" * 3000}, "meta is nested too deeply"),
        ({"context": [1, 2]}, "context is a JSON array, not an object"),
        ({"context": 3}, "context is a JSON number, not an object"),
        ({"context": {"tool_config": "x"}}, "context.tool_config is a JSON string"),
        ({"context": {"input": [1]}}, "context.input is a JSON array"),
        ({"tool_kind": None}, "tool_kind is empty"),
        ({"tool_kind": "  "}, "tool_kind is empty"),
        ({"meta": [1]}, "meta is a JSON array"),
        ({"step_name": ""}, "step"),
    ],
)
def test_malformed_rows_say_why(changes: dict, message: str) -> None:
    with pytest.raises(MalformedCommand) as info:
        Command.from_row(base_row(**changes))
    assert message in info.value.message
    assert info.value.message.startswith("malformed command")


def test_null_context_and_meta_are_empty_objects() -> None:
    cmd = Command.from_row(base_row(context=None, meta=None))
    assert cmd.input == {} and cmd.meta == {} and cmd.tool_config == {}
