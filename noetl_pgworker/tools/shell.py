"""``shell``: run a command.

Input: ``command`` (a string, run by ``/bin/sh -c``, or a list, run directly), ``cwd``,
``env`` (added to a minimal environment: PATH, HOME, LANG, TZ… — not the worker's own, which
may hold the database password), ``timeout_seconds``, and limits that may only lower the
operator's (``memory_mb``, ``max_procs``, ``max_file_mb``, ``cpu_seconds``). It runs through the
fork server (see :mod:`~noetl_pgworker.tools.process`): its own session, the operator's limits,
the ``run_as`` user, and every process it started killed when it ends or times out. Output
``{returncode, stdout, stderr}`` (each kept to 256 KiB); a non-zero exit fails the command and
still carries the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ToolError, ToolTimeout
from ..models import Command
from ..render import render_shell
from . import ToolContext, process


class ShellTool:
    kind = "shell"

    def __init__(self, sandbox: process.Sandbox | None = None) -> None:
        self.sandbox = sandbox or process.Sandbox()

    def start(self) -> None:
        self.sandbox.start()

    def close(self) -> None:
        self.sandbox.close()

    def run(self, command: Command, ctx: ToolContext) -> dict[str, Any]:
        cfg = render_shell(command, {**command.args, **command.tool_config})
        cmd = cfg.get("command", cfg.get("cmd"))
        if isinstance(cmd, str) and cmd.strip():
            argv = ["/bin/sh", "-c", cmd]
        elif isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd):
            argv = list(cmd)
        else:
            raise ToolError("shell: tool_config.command must be a string or a list of strings")
        env = cfg.get("env") or {}
        if not isinstance(env, dict):
            raise ToolError("shell: tool_config.env must be an object")
        cwd = cfg.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise ToolError("shell: tool_config.cwd must be a string")
        sandbox = self.sandbox
        limits = sandbox.limits.lowered_by(command.tool_config, "shell")
        with sandbox.workdir("noetl-pgworker-sh-") as tmp:
            request = {
                "kind": "exec",
                "argv": argv,
                "cwd": cwd,
                "env": sandbox.env({str(k): str(v) for k, v in env.items()}),
            }
            try:
                done = sandbox.run(
                    request, timeout=ctx.remaining(), workdir=Path(tmp), limits=limits, tool="shell"
                )
            except process.TimedOut:
                raise ToolTimeout(f"shell: timed out after {ctx.timeout:g} s (killed)") from None
        out = {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
        if done.returncode != 0:
            if done.returncode < 0:
                why = f"killed by {process.signal_name(done.returncode)}"
            else:
                why = f"exit code {done.returncode}"
            last = done.stderr.strip().splitlines()[-1:] or [""]
            raise ToolError(f"shell: {why}" + (f": {last[0][:300]}" if last[0] else ""), data=out)
        return out
