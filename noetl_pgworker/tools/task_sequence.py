"""``task_sequence``: several tools in one command, in order, with per-task policy rules.

NoETL's server sends one for a step whose ``tool`` is a list (or a single tool with
``spec.policy.rules``): ``tool_config = {"tasks": [...]}``, unrendered, and a step name ending
in ``:task_sequence``. Each task is ``{name?, kind, ...its tool's config, spec?: {policy:
{rules: [...]}}}`` (a task without a name is ``task_<index>``). Tasks run one after another,
in this worker's tools, within the command's time, as NoETL's worker runs them:

* A task's config (without ``kind``, ``spec``, ``output``) is rendered against the command's
  context, every earlier task's result under its name, and ``_task``, ``_prev`` (the last
  result), ``_attempt``, ``output`` (the last task's ``{status, data|error, meta}``),
  ``results``, ``ctx`` and ``iter``; the tool then renders its own parts again.
* After a task, its rules are tried in order: ``when`` (a bool, or a template that renders to
  ``true``/``1``/``yes``) or ``else``, ``then: {do: continue|retry|jump|break|fail, attempts
  (3), backoff (none|linear|exponential), delay (1.0 s), to (for jump; ``previous``), set}``.
  ``set`` writes ``ctx.*`` (and bare names), ``iter.*``, ``step.*`` (into ctx). Without a
  matching rule a task that worked continues and one that failed fails the sequence.

Output: ``{"status": "ok"|"break", "_prev", "results", "ctx", "metrics"}`` (``break`` adds
``remaining_actions``). A failed sequence fails the command with the task's error message and
carries ``{"status": "failed", ..., "error", "failed_task"}``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ToolError, ToolTimeout
from ..models import Command, ToolOutput
from ..render import command_context, render_condition, render_value
from .base import ToolContext, ToolRegistry, command_timeout

#: Task runs (retries and jumps included) one sequence may make.
MAX_TASK_RUNS = 10_000
ACTIONS = ("continue", "retry", "jump", "break", "fail")
PREVIOUS = frozenset({"previous", "prev", "_previous", "@previous"})
_SQLSTATE = re.compile(r"^postgres \[([0-9A-Z]{5})\]")


@dataclass(frozen=True, slots=True)
class Task:
    name: str
    kind: Any
    config: dict[str, Any]
    rules: list[Any]


@dataclass(frozen=True, slots=True)
class Action:
    do: str
    to: Any = None
    attempts: int = 3
    backoff: str = "none"
    delay: float = 1.0
    set: dict[str, Any] | None = None

    def wait(self, attempt: int) -> float:
        if self.backoff == "none":
            return 0.0
        if self.backoff == "linear":
            return self.delay * attempt
        if self.backoff == "exponential":
            return float(self.delay * 2 ** (attempt - 1))
        return self.delay


@dataclass
class State:
    """The sequence's variables, as templates see them."""

    task: str = ""
    prev: Any = None
    attempt: int = 1
    output: dict[str, Any] | None = None
    results: dict[str, Any] = field(default_factory=dict)
    ctx: dict[str, Any] = field(default_factory=dict)
    iter: dict[str, Any] = field(default_factory=dict)
    timings: list[dict[str, Any]] = field(default_factory=list)

    def output_view(self) -> dict[str, Any]:
        if not isinstance(self.output, dict):
            return {}
        view = {k: self.output.get(k) for k in ("data", "ref", "error")}
        view["status"] = self.output.get("status", "ok")
        view.update({k: self.output[k] for k in ("http", "pg", "py", "meta") if k in self.output})
        return view

    def variables(self) -> dict[str, Any]:
        return {
            "_task": self.task,
            "_prev": self.prev,
            "_attempt": self.attempt,
            "output": self.output_view(),
            "results": self.results,
        }

    def finish(self, status: str, **extra: Any) -> dict[str, Any]:
        return {
            "status": status,
            "_prev": self.prev,
            "results": self.results,
            "ctx": self.ctx,
            **extra,
            "metrics": metrics(self.timings),
        }


class TaskSequenceTool:
    kind = "task_sequence"

    def __init__(
        self, registry: ToolRegistry, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.registry = registry
        self._sleep = sleep

    def run(self, command: Command, ctx: ToolContext) -> dict[str, Any]:
        config = command.tool_config
        raw_tasks = config.get("tasks")
        if not isinstance(raw_tasks, list):
            raise ToolError("task_sequence: tool_config.tasks must be a list of tasks")
        if not raw_tasks:
            return {"status": "ok", "_prev": None, "results": {}, "metrics": {"task_count": 0}}
        tasks = parse_tasks(raw_tasks)
        result = self._run(command, ctx, tasks, raw_tasks)
        remaining = config.get("remaining_actions")
        if remaining and result["status"] != "failed":
            result["remaining_actions"] = remaining
        if result["status"] == "failed":
            error = result.get("error")
            if isinstance(error, dict):
                message = str(error.get("message", error))
            else:
                message = str(error) if error else "Tool returned error status"
            raise ToolError(message, data=result)
        return result

    def _run(
        self, command: Command, ctx: ToolContext, tasks: list[Task], raw_tasks: list[Any]
    ) -> dict[str, Any]:
        base = command_context(command)
        base_ctx = _mapping(base.get("ctx"))
        base_iter = _mapping(base.get("iter"))
        state = State(iter=dict(base_iter))
        retries: dict[str, int] = {}
        index = 0
        runs = 0
        while index < len(tasks):
            task = tasks[index]
            if time.monotonic() - ctx.started >= ctx.timeout:
                raise ToolTimeout(
                    f"task_sequence: timed out after {ctx.timeout:g} s (at task {task.name!r})"
                )
            runs += 1
            if runs > MAX_TASK_RUNS:
                return _config_failure(
                    state, task, f"task_sequence: more than {MAX_TASK_RUNS} task runs"
                )
            state.task = task.name
            state.attempt = retries.get(task.name, 0) + 1
            render_ctx = {**base, **state.results, **state.variables()}
            render_ctx["ctx"] = {**base_ctx, **state.ctx}
            render_ctx["iter"] = {**base_iter, **state.iter}
            self._run_task(command, ctx, task, render_ctx, state)

            eval_ctx = {**render_ctx, **state.variables()}
            action = decide(task.rules, eval_ctx, state.output or {})
            _apply_set(state, action.set or {}, eval_ctx)

            error = (state.output or {}).get("error")
            if action.do == "continue":
                index += 1
            elif action.do == "retry":
                retries[task.name] = retries.get(task.name, 0) + 1
                if retries[task.name] >= action.attempts:
                    return state.finish("failed", error=error, failed_task=task.name)
                delay = action.wait(retries[task.name])
                if delay > 0:
                    self._sleep(min(delay, ctx.remaining()))
            elif action.do == "jump":
                jumped = _jump(tasks, index, action.to)
                if isinstance(jumped, str):
                    return _config_failure(state, task, jumped)
                index = jumped
            elif action.do == "break":
                return state.finish("break", remaining_actions=raw_tasks[index + 1 :])
            else:  # fail, or an action NoETL does not know (it fails too)
                if action.do != "fail" and not error:
                    error = {
                        "kind": "config",
                        "message": f"unknown policy action {action.do!r} at task {task.name!r}",
                    }
                return state.finish("failed", error=error, failed_task=task.name)
        return state.finish("ok")

    def _run_task(
        self,
        command: Command,
        ctx: ToolContext,
        task: Task,
        render_ctx: dict[str, Any],
        state: State,
    ) -> None:
        """Render and run one task; record its output in ``state``."""
        started = time.monotonic()
        kind = task.kind if isinstance(task.kind, str) else str(task.kind)
        times = {"render_ms": 0, "tool_ms": 0}
        error: dict[str, Any] | None = None
        result: Any = None
        try:
            result = self._call_tool(command, ctx, task, kind, render_ctx, times)
            if isinstance(result, dict) and result.get("status") == "error":
                error = returned_error(result)
        except ToolError as exc:
            error = raised_error(exc, kind)
        except Exception as exc:  # a tool's bug is this task's error, as in NoETL
            error = {
                "kind": "unknown",
                "retryable": False,
                "code": "UNKNOWN",
                "message": f"{type(exc).__name__}: {exc}",
            }
        duration_ms = _ms(started)
        status = "error" if error is not None else "ok"
        output = outcome(status, result, error, kind, duration_ms, state.attempt)
        state.output = output
        if error is None:
            state.prev = result
            state.results[task.name] = result
        state.timings.append(
            {
                "name": task.name,
                "kind": kind,
                "attempt": state.attempt,
                "status": status,
                "duration_ms": duration_ms,
                **times,
            }
        )

    def _call_tool(
        self,
        command: Command,
        ctx: ToolContext,
        task: Task,
        kind: str,
        render_ctx: dict[str, Any],
        times: dict[str, int],
    ) -> Any:
        """Render ``task``'s config and run its tool; ``times`` gets render_ms and tool_ms."""
        started = time.monotonic()
        config = {k: v for k, v in task.config.items() if k not in ("kind", "spec", "output")}
        if kind != "noop" and config:
            config = render_value(config, render_ctx)
        times["render_ms"] = _ms(started)
        sub = command.model_copy(
            update={
                "tool_kind": kind,
                "input": {"tool_config": config, "input": {}, "render_context": render_ctx},
            }
        )
        tool = self.registry.get(kind)
        remaining = ctx.remaining()
        sub_ctx = ToolContext(
            timeout=min(command_timeout(sub, remaining), remaining),
            credentials=ctx.credentials,
        )
        tool_started = time.monotonic()
        try:
            result = tool.run(sub, sub_ctx)
        finally:
            times["tool_ms"] = _ms(tool_started)
        return result.data if isinstance(result, ToolOutput) else result


def _config_failure(state: State, task: Task, message: str) -> dict[str, Any]:
    return state.finish(
        "failed", error={"kind": "config", "message": message}, failed_task=task.name
    )


def _apply_set(state: State, values: dict[Any, Any], eval_ctx: dict[str, Any]) -> None:
    """A policy's ``set``: ``iter.x`` into the iteration, ``ctx.x``/``step.x``/``x`` into ctx."""
    for key, value in values.items():
        if isinstance(value, str) and "{{" in value:
            value = render_condition(value, eval_ctx)
        key = str(key)
        if key.startswith("iter."):
            state.iter[key[5:]] = value
        elif key.startswith(("ctx.", "step.")):
            state.ctx[key.split(".", 1)[1]] = value
        else:
            state.ctx[key] = value


def _jump(tasks: list[Task], index: int, target: Any) -> int | str:
    """The index a jump from ``tasks[index]`` to ``target`` lands on, or why it cannot."""
    if not target:
        return "Jump action missing 'to' target"
    if isinstance(target, str) and target.strip().lower() in PREVIOUS:
        if index == 0:
            return "Jump target 'previous' invalid for first task"
        return index - 1
    found = [i for i, t in enumerate(tasks) if t.name == target]
    if not found:
        return f"Jump target '{target}' not found"
    return found[0]


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _ms(since: float) -> int:
    return int((time.monotonic() - since) * 1000)


def parse_tasks(raw: list[Any]) -> list[Task]:
    return [_task(index, item) for index, item in enumerate(raw)]


def _task(index: int, item: Any) -> Task:
    if not isinstance(item, dict):
        raise ToolError(f"task_sequence: task {index} must be an object")
    if "kind" not in item:
        raise ToolError(
            f"task_sequence: task {index} must be {{name, kind, ...}} or {{kind, ...}};"
            f" it has {sorted(map(str, item))}"
        )
    if "name" in item:
        name = str(item["name"])
        config = {k: v for k, v in item.items() if k != "name"}
    else:
        name, config = f"task_{index}", dict(item)
    if "eval" in config:
        raise ToolError(
            f"task_sequence: task {name!r}: 'eval' is not allowed; use spec.policy.rules"
        )
    spec = config.get("spec")
    policy = spec.get("policy") if isinstance(spec, dict) else None
    rules = policy.get("rules") if isinstance(policy, dict) else None
    return Task(name, config["kind"], config, rules if isinstance(rules, list) else [])


def decide(rules: list[Any], context: dict[str, Any], output: dict[str, Any]) -> Action:
    """The first matching rule's action; else continue after success, fail after an error."""
    for rule in rules:
        if not isinstance(rule, dict):
            continue
        if "else" in rule:
            branch = rule["else"]
            if isinstance(branch, dict) and "then" in branch:
                return parse_then(branch["then"])
            continue
        if "expr" in rule:
            raise ToolError("task_sequence: policy rules use 'when', not 'expr'")
        condition = rule.get("when")
        if condition is None:
            if "then" in rule:
                return parse_then(rule["then"])
            continue
        if _holds(condition, context):
            if "then" not in rule:
                raise ToolError(f"task_sequence: a rule with 'when' needs 'then': {rule}")
            return parse_then(rule["then"])
    return Action("fail" if output.get("status") == "error" else "continue")


def _holds(condition: Any, context: dict[str, Any]) -> bool:
    """A rule's ``when``: a boolean, or a template rendering to one (or true|1|yes)."""
    if isinstance(condition, bool):
        return condition
    rendered = render_condition(str(condition), context)
    if isinstance(rendered, bool):
        return rendered
    return str(rendered).strip().lower() in ("true", "1", "yes")


def parse_then(then: Any) -> Action:
    if not isinstance(then, dict):
        raise ToolError("task_sequence: a rule's 'then' must be an object")
    if "set_vars" in then:
        raise ToolError("task_sequence: use 'set', not 'set_vars'")
    if "do" not in then:
        raise ToolError(f"task_sequence: a rule's 'then' needs 'do' (one of {', '.join(ACTIONS)})")
    try:
        delay = float(then.get("delay", 1.0))
    except (TypeError, ValueError):
        delay = 1.0
    try:
        attempts = int(then.get("attempts", 3))
    except (TypeError, ValueError):
        attempts = 3
    values = then.get("set")
    return Action(
        do=str(then["do"]),
        to=then.get("to"),
        attempts=attempts,
        backoff=str(then.get("backoff", "none")),
        delay=delay,
        set=values if isinstance(values, dict) else None,
    )


def _status_code(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def returned_error(result: dict[str, Any]) -> dict[str, Any]:
    """A ``{"status": "error", ...}`` a tool returned, as NoETL's ``output.error``."""
    inner = result.get("data")
    raw = result.get("status_code")
    if raw is None and isinstance(inner, dict):
        raw = inner.get("status_code") or inner.get("status")
    code = _status_code(raw)
    retryable = result.get("retryable")
    if retryable is None:
        retryable = code is not None and (code == 429 or code >= 500)
    return {
        "kind": result.get("error_kind", "tool_error"),
        "retryable": bool(retryable),
        "code": result.get("code") or (f"HTTP_{code}" if code is not None else None),
        "status_code": code,
        "message": result.get("error") or result.get("message", "Tool returned error status"),
    }


def raised_error(exc: ToolError, kind: str) -> dict[str, Any]:
    """A tool's failure as NoETL's ``output.error`` (plus ``error_type``, this worker's)."""
    data = exc.data
    code = _status_code(data.get("status_code")) if isinstance(data, dict) else None
    error: dict[str, Any] = {
        "kind": "tool_error",
        "retryable": code is not None and (code == 429 or code >= 500),
        "code": f"HTTP_{code}" if code is not None else None,
        "status_code": code,
        "message": exc.message,
        "error_type": exc.error_type,
    }
    sqlstate = _SQLSTATE.match(exc.message)
    if sqlstate:
        state = sqlstate.group(1)
        error["code"] = f"PG_{state}"
        error["sqlstate"] = state
        # serialization failures, deadlocks and lost connections are worth another try
        error["retryable"] = state in ("40001", "40P01") or state.startswith("08")
    if kind == "python":
        error["exception"] = exc.error_type
        error["traceback"] = exc.extra.get("_traceback")
    return error


def outcome(
    status: str,
    result: Any,
    error: dict[str, Any] | None,
    kind: str,
    duration_ms: int,
    attempt: int,
) -> dict[str, Any]:
    """NoETL's per-task ``output``: ``{status, data|error, meta}`` and the kind's helpers."""
    out: dict[str, Any] = {
        "status": status,
        "meta": {"attempt": attempt, "duration_ms": duration_ms},
    }
    if error is None:
        out["data"] = result
    else:
        out["error"] = error
    if kind == "http":
        status_code: Any = result.get("status_code") if isinstance(result, dict) else None
        headers = result.get("headers", {}) if isinstance(result, dict) else {}
        if error:
            status_code = error.get("status_code") or error.get("code") or status_code
        if isinstance(status_code, str) and status_code.startswith("HTTP_"):
            status_code = _status_code(status_code[5:]) or status_code
        out["http"] = {"status": status_code, "headers": headers}
    elif kind == "postgres":
        out["pg"] = {"code": error.get("code"), "sqlstate": error.get("sqlstate")} if error else {}
    elif kind == "python":
        out["py"] = (
            {"exception": error.get("exception"), "traceback": error.get("traceback")}
            if error
            else {}
        )
    return out


def metrics(timings: list[dict[str, Any]]) -> dict[str, Any]:
    """NoETL's sequence metrics: totals, and per kind and per task name."""
    by_kind: dict[str, dict[str, int]] = {}
    by_name: dict[str, dict[str, int]] = {}
    totals = {"duration_ms": 0, "render_ms": 0, "tool_ms": 0}
    for item in timings:
        for key in totals:
            totals[key] += int(item.get(key) or 0)
        for bucket, key in ((by_kind, str(item["kind"])), (by_name, str(item["name"]))):
            slot = bucket.setdefault(
                key, {"count": 0, "error_count": 0, "duration_ms": 0, "render_ms": 0, "tool_ms": 0}
            )
            slot["count"] += 1
            slot["error_count"] += item.get("status") == "error"
            for part in ("duration_ms", "render_ms", "tool_ms"):
                slot[part] += int(item.get(part) or 0)
    return {
        "task_count": len(timings),
        **totals,
        "by_kind": by_kind,
        "by_name": by_name,
        "tasks": timings,
    }


__all__ = ["TaskSequenceTool", "decide", "parse_tasks"]
