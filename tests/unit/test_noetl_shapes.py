"""NoETL's shapes the suite relies on: results that report failure, ``script:`` sources,
``kind: workbook`` actions (each seen in NoETL's regression suite, on NoETL 4.26)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from noetl_pgworker.errors import ToolError
from noetl_pgworker.models import Command
from noetl_pgworker.tools.artifact import ArtifactTool
from noetl_pgworker.tools.base import Confinement, ToolContext
from noetl_pgworker.tools.returned import returned_failure
from noetl_pgworker.tools.scriptsource import MAX_SCRIPT_BYTES, load_script
from noetl_pgworker.workbook import expand, expander

from ..helpers import serving

pytestmark = pytest.mark.unit


def cmd(kind: str, config: dict[str, Any], args: dict[str, Any] | None = None) -> Command:
    return Command(
        command_id="1",
        execution_id=2,
        step="s",
        tool_kind=kind,
        catalog_id=3,
        input={"tool_config": config, "input": args or {}, "render_context": {"x": 1}},
    )


# --- results that report their own failure (NoETL: "Tool returned error status") -------------


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ({"status": "failed"}, "Tool returned error status"),
        ({"status": "error", "error": "boom"}, "boom"),
        ({"status": "failed", "error": {"message": "nested", "kind": "x"}}, "nested"),
        ({"status": "ok", "data": {"part": {"status": "error", "message": "bad"}}}, "part: bad"),
        ({"status": "ok", "data": {"part": {"status": "error"}}}, "part: Unknown error"),
    ],
)
def test_a_result_reporting_failure_is_a_failure(result: dict[str, Any], message: str) -> None:
    assert returned_failure(result) == message


@pytest.mark.parametrize(
    "result",
    [
        {"status": "success"},
        {"status": "ok", "data": {"status": "failed"}},  # only entries of data are looked at
        {"status": "FAILED"},  # NoETL compares exactly
        {"failed": True},
        [{"status": "failed"}],
        "failed",
        None,
    ],
)
def test_other_results_are_not_failures(result: Any) -> None:
    assert returned_failure(result) is None


# --- script: {uri, source: {type: file|http}} -------------------------------------------------


def test_a_file_script_is_read_relative_to_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "a.py").write_text("result = 1\n")
    here = Confinement(script_dir=str(tmp_path))
    config = {"script": {"uri": "./scripts/a.py", "source": {"type": "file"}}}
    assert load_script(config, "python", confinement=here) == "result = 1\n"
    absolute = {"script": {"uri": str(tmp_path / "scripts/a.py"), "source": {"type": "file"}}}
    assert load_script(absolute, "python", confinement=here) == "result = 1\n"


def test_file_scripts_are_read_only_under_the_script_dir(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "secret.txt").write_text("s3cret")
    (tmp_path / "scripts" / "link.py").symlink_to(tmp_path / "secret.txt")
    here = Confinement(script_dir=str(tmp_path / "scripts"))
    for uri in ("../secret.txt", str(tmp_path / "secret.txt"), "link.py", "/etc/passwd"):
        config = {"script": {"uri": uri, "source": {"type": "file"}}}
        with pytest.raises(ToolError) as exc:
            load_script(config, "python", confinement=here)
        assert f"script file {uri} is outside the worker's --script-dir" in exc.value.message
    config = {"script": {"uri": "a.py", "source": {"type": "file"}}}
    with pytest.raises(ToolError) as exc:
        load_script(config, "python")
    assert "file scripts are refused: the worker reads them only under --script-dir" in (
        exc.value.message
    )


def test_a_file_script_uri_template_is_rendered(tmp_path: Path) -> None:
    (tmp_path / "q.sql").write_text("SELECT 1")
    config = {"script": {"uri": "{{ name }}", "source": {"type": "file"}}}
    here = Confinement(script_dir=str(tmp_path))
    text = load_script(config, "postgres", render=lambda t: "q.sql", confinement=here)
    assert text == "SELECT 1"


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ("x", "tool_config.script must be an object"),
        ({"uri": "a"}, "script.source.type is required"),
        ({"uri": "a", "source": {"type": "ftp"}}, "must be one of file, http, gcs, s3"),
        ({"uri": "gs://b/a.py", "source": {"type": "gcs"}}, "'gcs' is not supported"),
        ({"uri": "", "source": {"type": "file"}}, "script.uri (a file path) is required"),
        ({"uri": "missing.py", "source": {"type": "file"}}, "script file not found: missing.py"),
        ({"source": {"type": "http"}}, "endpoint or script.uri is required"),
        ({"uri": "http://x", "source": {"type": "http", "method": "TRACE"}}, "method must be"),
        ({"uri": "http://x", "source": {"type": "http", "timeout": 0}}, "timeout must be"),
    ],
)
def test_bad_script_configs_fail_saying_why(tmp_path: Path, script: Any, error: str) -> None:
    with pytest.raises(ToolError) as exc:
        load_script({"script": script}, "python", confinement=Confinement(script_dir=str(tmp_path)))
    assert error in exc.value.message


def test_a_script_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.py"
    with big.open("wb") as f:
        f.truncate(MAX_SCRIPT_BYTES + 1)
    with pytest.raises(ToolError, match="larger than"):
        load_script(
            {"script": {"uri": "big.py", "source": {"type": "file"}}},
            "python",
            confinement=Confinement(script_dir=str(tmp_path)),
        )


LOOPBACK = Confinement(http_allow_loopback=True)


class _Scripts(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        codes = {"/hello.py": 200, "/secret.py": 403, "/broken.py": 500}
        code = codes.get(self.path.split("?")[0], 404)
        body = f"result = {{'token': {self.headers.get('X-Token')!r}}}\n".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def script_server() -> Iterator[str]:
    with serving(_Scripts) as url:
        yield url


def test_an_http_script_is_fetched_with_rendered_endpoint_and_headers(script_server: str) -> None:
    config = {
        "script": {
            "uri": "ignored-when-an-endpoint-is-given",
            "source": {
                "type": "http",
                "endpoint": "{{ base }}/hello.py",
                "headers": {"X-Token": "{{ token }}"},
            },
        }
    }
    rendered = {"{{ base }}/hello.py": f"{script_server}/hello.py", "{{ token }}": "t-1"}
    text = load_script(config, "python", render=lambda t: rendered[t], confinement=LOOPBACK)
    assert text == "result = {'token': 't-1'}\n"
    by_uri = {"script": {"uri": f"{script_server}/hello.py", "source": {"type": "http"}}}
    assert load_script(by_uri, "python", confinement=LOOPBACK).startswith("result = ")


def test_an_http_script_goes_only_where_the_http_tool_may(script_server: str) -> None:
    config = {"script": {"uri": f"{script_server}/hello.py", "source": {"type": "http"}}}
    with pytest.raises(ToolError) as exc:
        load_script(config, "python")  # loopback, not allowed by default
    assert "script source refused: 127.0.0.1 is a loopback address" in exc.value.message
    port = int(script_server.rsplit(":", 1)[1])
    own = Confinement(http_allow_loopback=True, own_ports=(port,))
    with pytest.raises(ToolError) as exc:
        load_script(config, "python", confinement=own)
    assert "is this worker's own port" in exc.value.message


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/nothing.py", "HTTP 404: Script not found at"),
        ("/secret.py", "HTTP 403: Access denied to"),
        ("/broken.py", "HTTP 500: Failed to fetch script from"),
    ],
)
def test_http_script_errors_say_what_happened(script_server: str, path: str, error: str) -> None:
    config = {"script": {"uri": f"{script_server}{path}", "source": {"type": "http"}}}
    with pytest.raises(ToolError) as exc:
        load_script(config, "python", confinement=LOOPBACK)
    assert error in exc.value.message


def test_an_unreachable_script_host_fails_within_the_time_given() -> None:
    config = {"script": {"uri": "http://127.0.0.1:9/x.py", "source": {"type": "http"}}}
    with pytest.raises(ToolError) as exc:
        load_script(config, "python", timeout=5, confinement=LOOPBACK)
    assert "cannot fetch script from http://127.0.0.1:9/x.py" in exc.value.message


# --- kind: workbook --------------------------------------------------------------------------

WORKBOOK = [
    {
        "name": "compute_flag",
        "tool": {
            "kind": "python",
            "input": {"temperature_c": None, "unit": "C"},
            "code": "result = {'hot': temperature_c >= 25}",
        },
    },
    {"name": "legacy", "tool": "python", "code": "result = 1", "args": {"a": 1}, "other": 2},
    {"name": "nested", "tool": {"kind": "workbook", "name": "compute_flag"}},
    {"name": "kindless", "tool": {"code": "x"}},
]


def test_a_workbook_step_becomes_its_action_with_the_steps_arguments() -> None:
    seen: list[int] = []

    def lookup(catalog_id: int) -> list[Any]:
        seen.append(catalog_id)
        return WORKBOOK

    step = cmd("workbook", {"name": "compute_flag", "input": {"temperature_c": 30}})
    out = expand(step, lookup)
    assert seen == [3]
    assert out.tool_kind == "python"
    assert out.tool_config["code"] == "result = {'hot': temperature_c >= 25}"
    # the step's arguments win over the action's defaults
    assert out.args == {"temperature_c": 30, "unit": "C"}
    assert out.command_id == step.command_id and out.step == step.step
    assert out.input["render_context"] == {"x": 1}


def test_a_legacy_string_tool_action_copies_its_fields_and_args() -> None:
    out = expand(cmd("workbook", {"task": "legacy"}, {"b": 2}), lambda _: WORKBOOK)
    assert out.tool_kind == "python"
    assert out.tool_config == {"code": "result = 1", "input": {"a": 1, "b": 2}}


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({}, "tool.name (the workbook action to run) is required"),
        ({"name": "absent"}, "action 'absent' not found; the playbook's workbook has"),
        ({"name": "nested"}, "is itself a workbook step"),
        ({"name": "kindless"}, "has a tool without a kind"),
    ],
)
def test_a_workbook_step_that_cannot_run_fails_saying_why(
    config: dict[str, Any], error: str
) -> None:
    with pytest.raises(ToolError) as exc:
        expand(cmd("workbook", config), lambda _: WORKBOOK)
    assert error in exc.value.message


def test_the_expander_leaves_other_kinds_and_needs_a_lookup_for_workbooks() -> None:
    python = cmd("python", {"code": "result = 1"})
    assert expander(None)(python) is python
    with pytest.raises(ToolError, match="only with a database"):
        expander(None)(cmd("workbook", {"name": "compute_flag"}))


# --- kind: artifact (a result NoETL's server keeps by reference) ------------------------------


class _Results(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        ref = parse_qs(url.query).get("ref", [""])[0]
        if url.path != "/api/result/resolve":
            code, body = 404, {"detail": "Not Found"}
        elif ref == "noetl://execution/1/result/big/ab":
            code, body = 200, {"data": {"items": [1, 2, 3]}}
        else:
            code, body = 404, {"detail": f"no such ref {ref}"}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def result_server() -> Iterator[str]:
    with serving(_Results) as url:
        yield url


@pytest.mark.parametrize(
    "config",
    [
        {"result_ref": {"kind": "result_ref", "ref": "noetl://execution/1/result/big/ab"}},
        {"result_ref": "noetl://execution/1/result/big/ab"},
        {"action": "get", "uri": "noetl://execution/1/result/big/ab"},
    ],
)
def test_an_artifact_step_loads_the_data_a_reference_names(
    result_server: str, config: dict[str, Any]
) -> None:
    tool = ArtifactTool(result_server)
    try:
        assert tool.run(cmd("artifact", config), ToolContext(timeout=10)) == {"items": [1, 2, 3]}
    finally:
        tool.close()


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({}, "give result_ref (a reference) or uri"),
        ({"result_ref": {"kind": "other", "ref": "x"}}, "result_ref must be {kind"),
        ({"uri": "file:///etc/passwd"}, "is not a noetl:// reference"),
        ({"uri": "s3://bucket/key"}, "is not a noetl:// reference"),
        ({"action": "put", "uri": "file:///tmp/x", "data": 1}, "action 'put' is not supported"),
        ({"uri": "noetl://execution/1/result/none/00"}, "result not found"),
    ],
)
def test_an_artifact_step_that_cannot_load_fails_saying_why(
    result_server: str, config: dict[str, Any], error: str
) -> None:
    tool = ArtifactTool(result_server)
    try:
        with pytest.raises(ToolError) as exc:
            tool.run(cmd("artifact", config), ToolContext(timeout=10))
        assert error in exc.value.message
    finally:
        tool.close()
