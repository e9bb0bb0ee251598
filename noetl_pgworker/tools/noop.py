"""``noop``: does nothing, reports the step (NoETL's terminal and join steps use it)."""

from __future__ import annotations

from typing import Any

from ..models import Command
from .base import ToolContext


class NoopTool:
    kind = "noop"
    #: nothing of the command runs
    runs_apart = True

    def run(self, command: Command, ctx: ToolContext) -> dict[str, Any]:
        return {"status": "noop", "step": command.step}
