"""``kind: workbook``: a step that runs a named action of its playbook's ``workbook:`` section.

As NoETL's worker does: the step's ``tool.name`` (or ``tool.task``) names an entry of the
playbook's ``workbook`` list; that entry's ``tool`` (an object with ``kind``, or the legacy
kind string with ``code``/``command``/... beside it) is run as the step's tool, with the
action's ``args`` and then the step's arguments (the step's win) as its input. The action is
looked up in the worker process before the command runs (:func:`expander`, a ``prepare`` step
of the dispatcher): the registered playbook comes from ``noetl.catalog.payload`` (the parsed
playbook NoETL's server keeps), read once per catalog entry. A step whose action cannot be
found fails saying why; a workbook row is never left waiting.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from psycopg.rows import dict_row

from .errors import ToolError
from .models import Command
from .queries import query

KIND = "workbook"
#: legacy string-tool actions: the fields copied beside the kind (NoETL's list)
LEGACY_FIELDS = (
    "code",
    "command",
    "commands",
    "sql",
    "url",
    "method",
    "endpoint",
    "headers",
    "params",
    "data",
    "payload",
    "timeout",
)

Connect = Callable[[], contextlib.AbstractContextManager[Any]]
Lookup = Callable[[int], list[Any]]


class Workbooks:
    """Workbook sections by catalog id (a catalog entry never changes: cached, bounded)."""

    def __init__(self, connect: Connect, cache_size: int = 256) -> None:
        self._connect = connect
        self._cache: OrderedDict[int, list[Any]] = OrderedDict()
        self._size = cache_size
        self._lock = threading.Lock()

    def __call__(self, catalog_id: int) -> list[Any]:
        with self._lock:
            if catalog_id in self._cache:
                self._cache.move_to_end(catalog_id)
                return self._cache[catalog_id]
        actions = self._read(catalog_id)
        with self._lock:
            self._cache[catalog_id] = actions
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return actions

    def _read(self, catalog_id: int) -> list[Any]:
        with self._connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query("catalog_workbook"), {"catalog_id": catalog_id})
            row = cur.fetchone()
        if row is None:
            raise ToolError(f"workbook: no playbook with catalog_id {catalog_id} in the catalog")
        if not row["parsed"]:
            raise ToolError(
                f"workbook: the catalog entry {catalog_id} holds no parsed playbook (payload)"
            )
        workbook = row["workbook"]
        return workbook if isinstance(workbook, list) else []


def find_action(actions: list[Any], name: str) -> dict[str, Any]:
    for action in actions:
        if isinstance(action, dict) and action.get("name") == name:
            return action
    names = [a.get("name") for a in actions if isinstance(a, dict)]
    raise ToolError(f"workbook: action {name!r} not found; the playbook's workbook has {names}")


def action_tool(action: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    """The action's tool kind and configuration (without ``kind``)."""
    spec = action.get("tool")
    if isinstance(spec, dict):
        kind = spec.get("kind")
        config = {k: v for k, v in spec.items() if k != "kind"}
    elif isinstance(spec, str):
        kind = spec
        config = {k: action[k] for k in LEGACY_FIELDS if k in action}
    else:
        raise ToolError(f"workbook: action {name!r} must define a tool (an object with kind)")
    if not isinstance(kind, str) or not kind.strip():
        raise ToolError(f"workbook: action {name!r} has a tool without a kind")
    if kind == KIND:
        raise ToolError(f"workbook: action {name!r} is itself a workbook step (not allowed)")
    return kind.strip(), config


def expand(command: Command, lookup: Lookup) -> Command:
    """The command a workbook step stands for: its action's tool, the arguments merged."""
    name = command.tool_config.get("task") or command.tool_config.get("name")
    if not isinstance(name, str) or not name:
        raise ToolError("workbook: tool.name (the workbook action to run) is required")
    action = find_action(lookup(command.catalog_id), name)
    kind, config = action_tool(action, name)
    defaults = {}
    for key in ("input", "args"):
        if isinstance(config.get(key), dict):
            defaults.update(config[key])
    if isinstance(action.get("args"), dict):
        defaults.update(action["args"])
    config.pop("args", None)
    config["input"] = {**defaults, **command.args}
    context = {**command.input, "tool_config": config, "input": {}}
    return command.model_copy(update={"tool_kind": kind, "input": context})


def expander(lookup: Lookup | None) -> Callable[[Command], Command]:
    """A dispatcher ``prepare`` step: workbook commands become their action's command."""

    def prepare(command: Command) -> Command:
        if command.tool_kind != KIND:
            return command
        if lookup is None:
            raise ToolError("workbook: the playbook's workbook can be read only with a database")
        return expand(command, lookup)

    return prepare


class WorkbookTool:
    """Claims ``workbook`` rows; the dispatcher runs them as their action (see ``expander``).

    Reached only when no expander ran (a registry used without the worker): fails saying so."""

    kind = KIND

    def run(self, command: Command, ctx: Any) -> Any:
        raise ToolError("workbook: the action was not resolved (no catalog lookup configured)")


__all__ = ["KIND", "WorkbookTool", "Workbooks", "action_tool", "expand", "expander", "find_action"]
