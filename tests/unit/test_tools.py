from __future__ import annotations

import base64
import json
import sys
import time

import pytest

from noetl_pgworker.dispatcher import execute
from noetl_pgworker.errors import ToolError, UnknownTool
from noetl_pgworker.models import Command
from noetl_pgworker.tools import ToolContext, ToolRegistry, command_timeout, default_registry
from noetl_pgworker.tools.python import PythonTool

pytestmark = pytest.mark.unit

CTX = ToolContext(timeout=30)
MODES = ["inline", "process", "spawn"]


def cmd(kind: str = "python", config: dict | None = None, args: dict | None = None) -> Command:
    return Command(
        command_id="1",
        execution_id=2,
        step="s",
        tool_kind=kind,
        catalog_id=3,
        input={"tool_config": config or {}, "input": args or {}},
    )


def run_python(mode: str, config: dict, args: dict | None = None, timeout: float = 30):
    """The outcome of one python command, through the dispatcher's execute()."""
    registry = ToolRegistry([PythonTool(mode=mode, memory_mb=512)])
    try:
        return execute(cmd(config=config, args=args), registry, timeout=timeout)
    finally:
        registry.close()


def test_noop_reports_the_step() -> None:
    assert default_registry().get("noop").run(cmd("noop"), CTX) == {"status": "noop", "step": "s"}


@pytest.mark.parametrize("mode", MODES)
def test_python_main_gets_the_arguments_its_signature_names(mode: str) -> None:
    code = "def main(a, b=2):\n    return {'sum': a + b}\n"
    out = run_python(mode, {"code": code}, {"a": 1, "unused": 9})
    assert out.ok and out.data == {"sum": 3}


@pytest.mark.parametrize("mode", MODES)
def test_python_inputs_merge_like_noetl_and_kwargs_take_everything(mode: str) -> None:
    # NoETL's worker: tool_config.args, then tool_config.input, then context.input; later wins.
    code = "def main(**kw):\n    return kw\n"
    config = {"code": code, "args": {"a": 10, "c": 3}, "input": {"a": 20, "d": 4}}
    out = run_python(mode, config, {"a": 1, "b": 2})
    assert out.data == {"a": 1, "b": 2, "c": 3, "d": 4}


@pytest.mark.parametrize("mode", MODES)
def test_python_reads_tool_level_input(mode: str) -> None:
    # A tool-level `input:` and a loop's `iter` reach the worker in tool_config.input only.
    code = "def main(item, iter):\n    return {'v': item * 2, 'i': iter['index']}\n"
    out = run_python(mode, {"code": code, "input": {"item": 21, "iter": {"index": 3}}})
    assert out.ok, out.error
    assert out.data == {"v": 42, "i": 3}


@pytest.mark.parametrize("mode", MODES)
def test_python_result_variable_sees_arguments_as_globals(mode: str) -> None:
    out = run_python(mode, {"code": "result = [x * 2 for x in items]"}, {"items": [1, 2]})
    assert out.data == [2, 4]


@pytest.mark.parametrize("mode", MODES)
def test_python_code_b64(mode: str) -> None:
    code = base64.b64encode(b"result = 'decoded'").decode()
    assert run_python(mode, {"code_b64": code}).data == "decoded"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "tool_config.code (or code_b64) is required"),
        ({"code": "x = 1"}, "defines neither main() nor a `result` variable"),
        ({"code_b64": "!!!"}, "not base64"),
        ({"code": "result = 1", "args": [1]}, "args must be an object"),
    ],
)
def test_python_configuration_errors(mode: str, config: dict, message: str) -> None:
    out = run_python(mode, config)
    assert not out.ok and message in (out.error or "")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("def main():\n    raise ValueError('boom')\n", "ValueError: boom"),
        ("result = 1 / 0", "ZeroDivisionError: division by zero"),
        ("def main(:\n", "SyntaxError"),
        ("def main(needed):\n    return needed\n", "TypeError"),
        ("import sys\nsys.exit(3)", "SystemExit: 3"),
        ("result = object()", "result is not JSON-serialisable"),
        ("result = float('nan')", "result is not JSON-serialisable"),
    ],
)
def test_failures_become_failed_outcomes(mode: str, code: str, error: str) -> None:
    outcome = run_python(mode, {"code": code})
    assert not outcome.ok
    assert outcome.error is not None and error in outcome.error, outcome.error
    assert outcome.duration >= 0 and outcome.started_at is not None


def test_process_mode_captures_output_and_the_traceback() -> None:
    code = "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\nresult = 7"
    out = run_python("process", {"code": code})
    assert out.ok and out.data == 7
    assert out.extra == {"_stdout": "to stdout\n", "_stderr": "to stderr\n"}
    failed = run_python("process", {"code": "def main():\n    raise KeyError('k')\n"})
    assert failed.error == "KeyError: 'k'"
    assert failed.extra is not None and "Traceback" in failed.extra["_traceback"]


def test_process_mode_bounds_what_it_keeps_of_the_output() -> None:
    out = run_python("process", {"code": "print('x' * 500000)\nresult = 1"})
    assert out.ok
    assert out.extra is not None
    assert len(out.extra["_stdout"]) < 70_000 and "more bytes not kept" in out.extra["_stdout"]


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("import os\nos._exit(9)", "exited with code 9 before it returned a result"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "killed by SIGSEGV"),
        ("x = bytearray(2 * 1024 ** 3)\nresult = 1", "MemoryError"),
    ],
)
def test_process_mode_survives_code_that_kills_its_process(code: str, error: str) -> None:
    out = run_python("process", {"code": code})
    assert not out.ok and error in (out.error or ""), out.error


def test_process_mode_kills_an_endless_loop_at_the_timeout() -> None:
    t0 = time.monotonic()
    out = run_python("process", {"code": "while True:\n    pass\n", "timeout_seconds": 1})
    assert time.monotonic() - t0 < 10
    assert not out.ok and out.error_type == "timeout"
    assert "timed out after 1 s" in (out.error or "")


def test_process_mode_does_not_inherit_the_workers_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOETL_PGWORKER_DSN", "postgresql://u:topsecret@db/x")
    out = run_python("process", {"code": "import os\nresult = dict(os.environ)"})
    assert out.ok and "NOETL_PGWORKER_DSN" not in out.data
    assert "topsecret" not in json.dumps(out.data)


def test_command_timeout_comes_from_tool_config() -> None:
    assert command_timeout(cmd(config={"timeout_seconds": 5}), 300) == 5
    assert command_timeout(cmd(config={"timeout": 2.5}), 300) == 2.5
    assert command_timeout(cmd(config={}), 300) == 300
    with pytest.raises(ToolError, match="positive number"):
        command_timeout(cmd(config={"timeout": "soon"}), 300)


def test_unknown_kind_fails_with_a_clear_error() -> None:
    outcome = execute(cmd("wasm"), default_registry())
    assert not outcome.ok
    assert outcome.error_type == "unknown_tool"
    assert "unknown tool kind 'wasm'" in (outcome.error or "")
    with pytest.raises(UnknownTool):
        ToolRegistry().get("noop")


def test_registry_lists_kinds_sorted() -> None:
    assert default_registry().kinds() == (
        "duckdb",
        "http",
        "noop",
        "postgres",
        "python",
        "shell",
        "task_sequence",
        "workbook",
    )
    assert "python" in default_registry()


@pytest.mark.parametrize(
    ("config", "check"),
    [
        ({"command": "echo hi; echo oops >&2"}, lambda o: o.data["stdout"] == "hi\n"),
        ({"command": ["printf", "%s", "a b"]}, lambda o: o.data["stdout"] == "a b"),
        (
            {"command": "echo $GREETING", "env": {"GREETING": "hey"}},
            lambda o: o.data["stdout"] == "hey\n",
        ),
        ({"command": "pwd", "cwd": "/"}, lambda o: o.data["stdout"] == "/\n"),
        ({"command": "echo $NOETL_PGWORKER_DSN"}, lambda o: o.data["stdout"] == "\n"),
    ],
)
def test_shell_runs_commands(monkeypatch: pytest.MonkeyPatch, config: dict, check) -> None:
    monkeypatch.setenv("NOETL_PGWORKER_DSN", "postgresql://u:topsecret@db/x")
    out = execute(cmd("shell", config), default_registry())
    assert out.ok, out.error
    assert out.data["returncode"] == 0
    assert check(out)


def test_shell_failures_carry_the_output() -> None:
    out = execute(
        cmd("shell", {"command": "echo partial; echo bad thing >&2; exit 4"}), default_registry()
    )
    assert not out.ok and out.error == "shell: exit code 4: bad thing"
    assert out.data == {"returncode": 4, "stdout": "partial\n", "stderr": "bad thing\n"}
    missing = execute(cmd("shell", {"command": ["/no/such/binary"]}), default_registry())
    assert not missing.ok and "cannot run '/no/such/binary'" in (missing.error or "")
    bad = execute(cmd("shell", {"command": 5}), default_registry())
    assert not bad.ok and "cmds (a list of command lines) or command" in (bad.error or "")


def test_shell_runs_noetls_cmds_lines_in_turn_and_stops_at_the_first_failure() -> None:
    # Observed with NoETL 4.26 playbooks: `tool: {kind: shell, cmds: [...]}` is NoETL's form.
    registry = default_registry()
    try:
        out = execute(cmd("shell", {"cmds": ["echo one", "echo two >&2"]}), registry)
        assert out.ok, out.error
        assert out.data["returncode"] == 0
        assert out.data["stdout"] == "one\n" and out.data["stderr"] == "two\n"
        assert [c["cmd_preview"] for c in out.data["commands"]] == ["echo one", "echo two >&2"]
        assert isinstance(out.data["duration_ms"], int)
        failed = execute(cmd("shell", {"cmds": ["echo a", "exit 3", "echo never"]}), registry)
        assert not failed.ok and failed.error == "shell: exit code 3"
        assert [c["returncode"] for c in failed.data["commands"]] == [0, 3]
    finally:
        registry.close()


def test_shell_is_killed_at_the_timeout_with_its_children() -> None:
    t0 = time.monotonic()
    out = execute(
        cmd("shell", {"command": "sleep 30 & sleep 30; wait", "timeout_seconds": 0.5}),
        default_registry(),
    )
    assert time.monotonic() - t0 < 10
    assert not out.ok and out.error_type == "timeout"


def test_duckdb_runs_sql_with_params_and_several_statements() -> None:
    import duckdb  # the duckdb extra is part of the test install; missing it is a failure

    assert duckdb.__version__
    out = execute(
        cmd(
            "duckdb",
            {
                "query": "CREATE TABLE t (a INT, b TEXT); INSERT INTO t VALUES (1, 'x');"
                " SELECT a, b, 1.5::DECIMAL(4,2) AS d FROM t"
            },
        ),
        default_registry(),
    )
    assert out.ok, out.error
    assert out.data["results"][-1]["rows"] == [{"a": 1, "b": "x", "d": "1.50"}]
    one = execute(cmd("duckdb", {"query": "SELECT ? + 1 AS n", "params": [41]}), default_registry())
    assert one.data == {
        "status": "success",
        "columns": ["n"],
        "rows": [{"n": 42}],
        "row_count": 1,
        "statement_count": 1,
        # NoETL's duckdb keys (a playbook on NoETL 4.26 read `{{ step.executed_commands }}`)
        "executed_commands": 1,
        "command_1_rows": 1,
        "command_1_sample": [[42]],
        "task_id": "1",
        "execution_id": "2",
        "database_path": ":memory:",
        "secrets_created": 0,
    }
    assert out.data["executed_commands"] == 3 and out.data["command_3_sample"] == [[1, "x", "1.50"]]
    assert "command_1_rows" not in out.data  # CREATE TABLE returns no rows
    bad = execute(cmd("duckdb", {"query": "SELEC 1"}), default_registry())
    assert not bad.ok and bad.error and bad.error.startswith("duckdb: ParserException")


def test_duckdb_without_the_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "duckdb", None)  # as if it were not installed
    from noetl_pgworker.tools.duckdb import DuckdbTool

    registry = ToolRegistry([DuckdbTool(None)])  # registered anyway: the command says why
    out = execute(cmd("duckdb", {"query": "SELECT 1"}), registry)
    assert not out.ok and "pip install 'noetl-pgworker[duckdb]'" in (out.error or "")
    assert "duckdb" not in default_registry().kinds()  # by default: not run, not claimed


@pytest.mark.parametrize("mode", MODES)
def test_python_arguments_are_rendered_against_the_render_context(mode: str) -> None:
    # NoETL's worker renders argument templates the server left (a bare `{{ name }}` of a
    # context key keeps its value, the rest render to text); the render context holds earlier
    # steps' results by name.
    command = Command(
        command_id="1",
        execution_id=1,
        step="s",
        tool_kind="python",
        catalog_id=1,
        input={
            "tool_config": {"code": "def main(x, label):\n    return {'x': x, 'label': label}\n"},
            "input": {"x": "{{ start }}", "label": "n={{ start.x + 1 }}"},
            "render_context": {"start": {"x": 41}},
        },
    )
    registry = ToolRegistry([PythonTool(mode=mode)])
    out = execute(command, registry, timeout=30)
    registry.close()
    assert out.ok, out.error
    assert out.data == {"x": {"x": 41}, "label": "n=42"}


def test_python_arguments_by_signature_without_inspect_match_inspect() -> None:
    import functools

    from noetl_pgworker.tools.pyrunner import call_with_matching_args

    def posonly(a, /, b, *, c=3):
        return (a, b, c)

    def kwargs(a, **kw):
        return (a, kw)

    @functools.wraps(kwargs)
    def wrapped(*args, **kw):
        return kwargs(*args, **kw)

    def varargs(b, *rest):
        return (b, rest)

    args = {"a": 1, "b": 2, "c": 4, "rest": 5, "kw": 6}
    with pytest.raises(TypeError):  # `a` is positional-only: never passed by name
        call_with_matching_args(posonly, args)
    assert call_with_matching_args(functools.partial(posonly, 0), args) == (0, 2, 4)
    assert call_with_matching_args(kwargs, args) == (1, {"b": 2, "c": 4, "rest": 5, "kw": 6})
    # functools.wraps: the wrapped function's signature, as inspect.signature says
    assert call_with_matching_args(wrapped, args) == (1, {"b": 2, "c": 4, "rest": 5, "kw": 6})
    assert call_with_matching_args(varargs, args) == (2, ())
    assert call_with_matching_args(lambda c, b: c - b, args) == 2


def test_python_runner_encodes_results_as_json_dumps_does() -> None:
    from noetl_pgworker.tools.pyrunner import dumps

    value = {"a": [1, 2.5, None, True], "é": "ünï\n", "n": {"1": -0.0, "big": 10**30}}
    assert dumps(value) == json.dumps(value, allow_nan=False)
    assert dumps({1: "int key"}) == json.dumps({1: "int key"})
    with pytest.raises(ValueError, match="Out of range float"):
        dumps({"x": float("inf")})
    with pytest.raises(TypeError, match="Object of type set is not JSON serializable"):
        dumps({"x": {1}})
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        dumps(loop)


def test_process_mode_python_runs_in_a_scratch_directory_not_in_root() -> None:
    code = (
        "import os\n"
        "def main():\n"
        "    with open('scratch.txt', 'w') as fh:\n"
        "        fh.write('x')\n"
        "    return os.getcwd()\n"
    )
    out = run_python("process", {"code": code})
    assert out.ok, out.error
    assert out.data != "/" and "noetl-pgworker-scratch-" in out.data


def test_without_duckdb_the_worker_neither_lists_nor_claims_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from noetl_pgworker.config import Settings
    from noetl_pgworker.errors import ConfigError
    from noetl_pgworker.tools import default_registry
    from noetl_pgworker.worker import Worker

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "duckdb" else real(name, *a)
    )
    registry = default_registry()
    try:
        assert "duckdb" not in registry.kinds() and "python" in registry.kinds()
    finally:
        registry.close()
    with pytest.raises(
        ConfigError, match=r"unknown tool kind\(s\) duckdb.*noetl-pgworker\[duckdb\]"
    ):
        Worker(Settings(dsn="", tool_kinds="noop,duckdb"))
