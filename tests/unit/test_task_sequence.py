"""task_sequence: tasks in order, rendered against earlier results, NoETL's policy rules."""

from __future__ import annotations

import time
from typing import Any

import pytest

from noetl_pgworker.dispatcher import execute
from noetl_pgworker.errors import ToolError
from noetl_pgworker.models import Command, Outcome
from noetl_pgworker.tools import ToolContext, ToolRegistry, default_registry
from noetl_pgworker.tools.noop import NoopTool
from noetl_pgworker.tools.python import PythonTool
from noetl_pgworker.tools.task_sequence import TaskSequenceTool


class Flaky:
    """Fails with HTTP ``status`` ``failures`` times, then answers ``{"ok": n}``."""

    def __init__(self, kind: str = "http", failures: int = 2, status: int = 503) -> None:
        self.kind = kind
        self.failures = failures
        self.status = status
        self.calls: list[dict[str, Any]] = []

    def run(self, command: Command, ctx: ToolContext) -> Any:
        self.calls.append(command.tool_config)
        if len(self.calls) <= self.failures:
            raise ToolError(
                f"HTTP {self.status}: Unavailable", data={"status_code": self.status, "data": ""}
            )
        return {"status_code": 200, "headers": {"x": "1"}, "data": {"ok": len(self.calls)}}


class Slow:
    kind = "slow"

    def run(self, command: Command, ctx: ToolContext) -> Any:
        time.sleep(min(0.05, ctx.remaining()))
        raise ToolError("still not ready")


def registry(*extra: Any) -> tuple[ToolRegistry, list[float]]:
    reg = ToolRegistry([NoopTool(), PythonTool(mode="inline"), *extra])
    slept: list[float] = []
    reg.register(TaskSequenceTool(reg, sleep=slept.append))
    return reg, slept


def run(
    reg: ToolRegistry,
    tasks: list[Any],
    render_context: dict[str, Any] | None = None,
    timeout: float = 30,
    **config: Any,
) -> Outcome:
    command = Command(
        command_id="11",
        execution_id=22,
        step="fetch_all:task_sequence",
        tool_kind="task_sequence",
        catalog_id=1,
        input={"tool_config": {"tasks": tasks, **config}, "render_context": render_context or {}},
    )
    return execute(command, reg, timeout=timeout)


def py(name: str, code: str, **input: Any) -> dict[str, Any]:
    return {"name": name, "kind": "python", "code": code, "input": input}


def test_tasks_run_in_order_with_earlier_results_in_their_templates() -> None:
    reg, _ = registry()
    out = run(
        reg,
        [
            py(
                "first", "def main(base):\n    return {'n': base * 2}\n", base="{{ workload.base }}"
            ),
            py(
                "second",
                "def main(n, prev):\n    return n + prev['n']\n",
                n="{{ first.n }}",
                prev="{{ _prev }}",
            ),
            {"kind": "noop"},
        ],
        render_context={"workload": {"base": 5}},
    )
    assert out.ok, out.error
    assert out.data["status"] == "ok"
    assert out.data["results"] == {
        "first": {"n": 10},
        "second": 20,
        "task_2": {"status": "noop", "step": "fetch_all:task_sequence"},
    }
    assert out.data["_prev"] == out.data["results"]["task_2"] and out.data["ctx"] == {}
    metrics = out.data["metrics"]
    assert metrics["task_count"] == 3 and metrics["by_kind"]["python"]["count"] == 2
    assert [t["name"] for t in metrics["tasks"]] == ["first", "second", "task_2"]
    assert set(metrics) >= {"duration_ms", "render_ms", "tool_ms", "by_name"}


def test_retry_with_exponential_backoff_until_the_task_works() -> None:
    flaky = Flaky(failures=2)
    reg, slept = registry(flaky)
    rules = [
        {
            "when": "{{ output.status == 'error' and output.error.retryable }}",
            "then": {"do": "retry", "attempts": 5, "backoff": "exponential", "delay": 0.5},
        },
        {"else": {"then": {"do": "continue"}}},
    ]
    out = run(
        reg,
        [
            {
                "name": "fetch",
                "kind": "http",
                "url": "u/{{ _attempt }}",
                "spec": {"policy": {"rules": rules}},
            }
        ],
    )
    assert out.ok, out.error
    assert slept == [0.5, 1.0]
    # each attempt rendered again; kind, spec and name are not part of the tool's config
    assert flaky.calls == [{"url": "u/1"}, {"url": "u/2"}, {"url": "u/3"}]
    assert out.data["results"]["fetch"]["data"] == {"ok": 3}
    assert out.data["metrics"]["by_name"]["fetch"] == {
        **out.data["metrics"]["by_name"]["fetch"],
        "count": 3,
        "error_count": 2,
    }


def test_an_error_without_rules_fails_the_command_with_the_tasks_message() -> None:
    flaky = Flaky(failures=1, status=404)
    reg, _ = registry(flaky)
    out = run(reg, [py("a", "result = 1"), {"name": "b", "kind": "http"}, {"kind": "noop"}])
    assert not out.ok and out.error == "HTTP 404: Unavailable"
    assert out.data["status"] == "failed" and out.data["failed_task"] == "b"
    assert out.data["results"] == {"a": 1} and out.data["_prev"] == 1
    assert out.data["error"]["code"] == "HTTP_404" and out.data["error"]["retryable"] is False
    assert out.data["error"]["status_code"] == 404


def test_retries_run_out() -> None:
    flaky = Flaky(failures=10)
    reg, slept = registry(flaky)
    rules = [{"when": "{{ output.error.retryable }}", "then": {"do": "retry", "attempts": 3}}]
    out = run(reg, [{"name": "f", "kind": "http", "spec": {"policy": {"rules": rules}}}])
    assert not out.ok and out.data["failed_task"] == "f"
    assert len(flaky.calls) == 3 and slept == []  # backoff none


def test_break_returns_the_remaining_tasks() -> None:
    reg, _ = registry()
    tasks = [
        {
            "name": "a",
            "kind": "noop",
            "spec": {"policy": {"rules": [{"when": True, "then": {"do": "break"}}]}},
        },
        {"name": "b", "kind": "noop"},
    ]
    out = run(reg, tasks)
    assert out.ok and out.data["status"] == "break"
    assert out.data["remaining_actions"] == [tasks[1]] and list(out.data["results"]) == ["a"]
    # the worker adds remaining_actions of tool_config when the sequence did not fail
    out = run(reg, tasks[1:], remaining_actions=[{"step": "next"}])
    assert out.data["status"] == "ok" and out.data["remaining_actions"] == [{"step": "next"}]


def test_jump_and_set_loop_until_a_condition() -> None:
    reg, _ = registry()
    rules = [
        {
            "when": "{{ _prev < 3 }}",
            "then": {
                "do": "jump",
                "to": "count",
                "set": {"ctx.n": "{{ _prev }}", "iter.seen": True},
            },
        },
        {"else": {"then": {"do": "continue"}}},
    ]
    count = py("count", "def main(n):\n    return n + 1\n", n="{{ ctx.n | default(0) }}")
    count["spec"] = {"policy": {"rules": rules}}
    out = run(reg, [count, {"name": "done", "kind": "noop"}], render_context={"ctx": {"x": 1}})
    assert out.ok, out.error
    assert out.data["results"]["count"] == 3 and "done" in out.data["results"]
    assert out.data["ctx"] == {"n": "2"}  # set values render to text, as in NoETL
    assert out.data["metrics"]["by_name"]["count"]["count"] == 3


def test_jump_to_previous_and_to_nowhere() -> None:
    reg, _ = registry()
    rules = [
        {
            "when": "{{ results.a == 1 and _attempt == 1 and not ctx.again }}",
            "then": {"do": "jump", "to": "previous", "set": {"again": True}},
        }
    ]
    tasks = [
        py("a", "result = 1"),
        {"name": "b", "kind": "noop", "spec": {"policy": {"rules": rules}}},
    ]
    out = run(reg, tasks)
    assert out.ok and out.data["metrics"]["task_count"] == 4 and out.data["ctx"] == {"again": True}
    lost = [
        {
            "name": "a",
            "kind": "noop",
            "spec": {"policy": {"rules": [{"when": True, "then": {"do": "jump", "to": "zz"}}]}},
        }
    ]
    out = run(reg, lost)
    assert not out.ok and out.error == "Jump target 'zz' not found"


def test_an_unknown_tool_or_a_bad_rule_fails_the_command() -> None:
    reg, _ = registry()
    out = run(reg, [{"name": "x", "kind": "teleport"}])
    assert not out.ok and "unknown tool kind 'teleport'" in (out.error or "")
    assert out.data["failed_task"] == "x"
    bad = run(reg, [{"kind": "noop", "spec": {"policy": {"rules": [{"expr": "1", "then": {}}]}}}])
    assert not bad.ok and "'when', not 'expr'" in (bad.error or "")
    assert not run(reg, [{"kind": "noop", "eval": []}]).ok
    assert not run(reg, [{"label": {"kind": "noop"}}]).ok
    assert not run(
        reg, [{"kind": "noop", "spec": {"policy": {"rules": [{"when": True, "then": {}}]}}}]
    ).ok


def test_a_python_error_carries_its_exception() -> None:
    reg, _ = registry()
    rules = [
        {
            "when": "{{ output.status == 'error' }}",
            "then": {"do": "continue", "set": {"why": "{{ output.py.exception }}"}},
        }
    ]
    out = run(
        reg,
        [
            {
                "name": "p",
                "kind": "python",
                "code": "raise ValueError('no')",
                "spec": {"policy": {"rules": rules}},
            }
        ],
    )
    assert out.ok, out.error
    assert out.data["ctx"]["why"] and out.data["results"] == {}


def test_the_sequence_keeps_to_the_commands_time() -> None:
    reg, _ = registry(Slow())
    rules = [{"when": True, "then": {"do": "retry", "attempts": 1000000}}]
    started = time.monotonic()
    out = run(
        reg, [{"name": "s", "kind": "slow", "spec": {"policy": {"rules": rules}}}], timeout=0.3
    )
    assert not out.ok and out.error_type == "timeout" and "at task 's'" in (out.error or "")
    assert time.monotonic() - started < 2


def test_empty_and_malformed_sequences() -> None:
    reg, _ = registry()
    out = run(reg, [])
    assert out.ok and out.data == {
        "status": "ok",
        "_prev": None,
        "results": {},
        "metrics": {"task_count": 0},
    }
    command = Command(
        command_id="1",
        execution_id=1,
        step="s",
        tool_kind="task_sequence",
        catalog_id=1,
        input={"tool_config": {"tasks": "nope"}},
    )
    assert not execute(command, reg).ok


def test_the_default_registry_runs_task_sequences() -> None:
    reg = default_registry(python_mode="inline")
    try:
        assert "task_sequence" in reg
        out = run(reg, [{"name": "a", "kind": "noop"}])
        assert out.ok and list(out.data["results"]) == ["a"]
    finally:
        reg.close()


@pytest.mark.parametrize(("status", "retryable"), [(429, True), (500, True), (400, False)])
def test_http_errors_as_policy_rules_see_them(status: int, retryable: bool) -> None:
    flaky = Flaky(failures=1, status=status)
    reg, _ = registry(flaky)
    rules = [
        {
            "when": "{{ output.http.status == " + str(status) + " }}",
            "then": {"do": "continue", "set": {"retryable": "{{ output.error.retryable }}"}},
        }
    ]
    out = run(reg, [{"name": "h", "kind": "http", "spec": {"policy": {"rules": rules}}}])
    assert out.ok, out.error
    assert out.data["ctx"] == {"retryable": str(retryable)}
