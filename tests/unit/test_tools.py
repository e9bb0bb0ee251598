from __future__ import annotations

import base64

import pytest

from noetl_pgworker.dispatcher import execute
from noetl_pgworker.errors import ToolError, UnknownTool
from noetl_pgworker.models import Command
from noetl_pgworker.tools import ToolRegistry, default_registry
from noetl_pgworker.tools.python import PythonTool

pytestmark = pytest.mark.unit


def cmd(kind: str = "python", config: dict | None = None, args: dict | None = None) -> Command:
    return Command(
        command_id="1",
        execution_id=2,
        step="s",
        tool_kind=kind,
        catalog_id=3,
        input={"tool_config": config or {}, "input": args or {}},
    )


def test_noop_reports_the_step() -> None:
    assert default_registry().get("noop").run(cmd("noop")) == {"status": "noop", "step": "s"}


def test_python_main_gets_the_arguments_its_signature_names() -> None:
    code = "def main(a, b=2):\n    return {'sum': a + b}\n"
    assert PythonTool().run(cmd(config={"code": code}, args={"a": 1, "unused": 9})) == {"sum": 3}


def test_python_args_override_input_and_kwargs_take_everything() -> None:
    code = "def main(**kw):\n    return kw\n"
    out = PythonTool().run(cmd(config={"code": code, "args": {"a": 10}}, args={"a": 1, "b": 2}))
    assert out == {"a": 10, "b": 2}


def test_python_result_variable_sees_arguments_as_globals() -> None:
    out = PythonTool().run(
        cmd(config={"code": "result = [x * 2 for x in items]"}, args={"items": [1, 2]})
    )
    assert out == [2, 4]


def test_python_code_b64() -> None:
    code = base64.b64encode(b"result = 'decoded'").decode()
    assert PythonTool().run(cmd(config={"code_b64": code})) == "decoded"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "tool_config.code (or code_b64) is required"),
        ({"code": "x = 1"}, "defines neither main() nor a `result` variable"),
        ({"code_b64": "!!!"}, "not base64"),
        ({"code": "result = 1", "args": [1]}, "args must be an object"),
    ],
)
def test_python_configuration_errors(config: dict, message: str) -> None:
    with pytest.raises(ToolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PythonTool().run(cmd(config=config))


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("def main():\n    raise ValueError('boom')\n", "ValueError: boom"),
        ("result = 1 / 0", "ZeroDivisionError: division by zero"),
        ("def main(:\n", "SyntaxError"),
        ("def main(needed):\n    return needed\n", "TypeError"),
        ("import sys\nsys.exit(3)", "SystemExit: 3"),
        ("result = object()", "result is not JSON-serialisable"),
    ],
)
def test_failures_become_failed_outcomes(code: str, error: str) -> None:
    outcome = execute(cmd(config={"code": code}), default_registry())
    assert not outcome.ok
    assert outcome.error is not None and error in outcome.error
    assert outcome.duration >= 0 and outcome.started_at is not None


def test_unknown_kind_fails_with_a_clear_error() -> None:
    outcome = execute(cmd("wasm"), default_registry())
    assert not outcome.ok
    assert outcome.error_type == "unknown_tool"
    assert "unknown tool kind 'wasm'" in (outcome.error or "")
    with pytest.raises(UnknownTool):
        ToolRegistry().get("noop")


def test_registry_lists_kinds_sorted() -> None:
    assert default_registry().kinds() == ("noop", "python")
    assert "python" in default_registry()
