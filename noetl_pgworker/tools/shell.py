"""``shell``: run a command.

Input: ``cmds`` (NoETL's form: a list of command lines, each run by ``/bin/sh -c`` in turn,
stopping at the first that fails; output adds ``commands`` and ``duration_ms`` as NoETL's), or
``command`` (a string, run by ``/bin/sh -c``, or a list, run directly), ``cwd``,
``env`` (added to a minimal environment: PATH, HOME, LANG, TZ… — not the worker's own, which
may hold the database password), ``timeout_seconds``, and limits that may only lower the
operator's (``memory_mb``, ``max_procs``, ``max_file_mb``, ``cpu_seconds``). It runs through the
fork server (see :mod:`~noetl_pgworker.tools.process`): its own session, the operator's limits,
the ``run_as`` user, and every process it started killed when it ends or times out. Output
``{returncode, stdout, stderr}`` (each kept to 256 KiB); a non-zero exit fails the command and
still carries the output.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..errors import ToolError, ToolTimeout
from ..models import Command
from ..render import render_shell
from . import process
from .base import ToolContext


class ShellTool:
    kind = "shell"
    #: every command in a process (session) of its own
    runs_apart = True

    def __init__(self, sandbox: process.Sandbox | None = None) -> None:
        self.sandbox = sandbox or process.Sandbox()

    def start(self) -> None:
        self.sandbox.start()

    def close(self) -> None:
        self.sandbox.close()

    def run(self, command: Command, ctx: ToolContext) -> dict[str, Any]:
        cfg = render_shell(command, {**command.args, **command.tool_config})
        cmds = cfg.get("cmds")
        if cmds is not None:
            # NoETL's form: a list of shell command lines, run one after the other by /bin/sh,
            # stopping at the first that fails.
            if isinstance(cmds, str):
                cmds = [cmds]
            if not (isinstance(cmds, list) and cmds and all(isinstance(c, str) for c in cmds)):
                raise ToolError("shell: tool_config.cmds must be a non-empty list of strings")
            return self._run_lines(command, cfg, cmds, ctx)
        cmd = cfg.get("command", cfg.get("cmd"))
        if isinstance(cmd, str) and cmd.strip():
            argv = ["/bin/sh", "-c", cmd]
        elif isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd):
            argv = list(cmd)
        else:
            raise ToolError(
                "shell: tool_config.cmds (a list of command lines) or command (a string, or an"
                " argv list) is required"
            )
        return self._run_argv(command, cfg, argv, ctx)

    def _run_lines(
        self, command: Command, cfg: dict[str, Any], lines: list[str], ctx: ToolContext
    ) -> dict[str, Any]:
        """NoETL's output: ``{returncode, stdout, stderr, commands: [...], duration_ms}``."""
        started = time.monotonic()
        done: list[dict[str, Any]] = []
        out: dict[str, Any] = {"returncode": 0, "stdout": "", "stderr": ""}
        for line in lines:
            t0 = time.monotonic()
            try:
                one = self._run_argv(command, cfg, ["/bin/sh", "-c", line], ctx)
            except ToolError as exc:
                data = exc.data if isinstance(exc.data, dict) else {}
                done.append(_line_result(line, data, t0))
                failed = {
                    **data,
                    "commands": done,
                    "duration_ms": int((time.monotonic() - started) * 1000),
                }
                raise ToolError(exc.message, data=failed) from None
            done.append(_line_result(line, one, t0))
            out = {
                "returncode": one["returncode"],
                "stdout": out["stdout"] + one["stdout"],
                "stderr": out["stderr"] + one["stderr"],
            }
        return {
            **out,
            "commands": done,
            "duration_ms": int((time.monotonic() - started) * 1000),
        }

    def _run_argv(
        self, command: Command, cfg: dict[str, Any], argv: list[str], ctx: ToolContext
    ) -> dict[str, Any]:
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


def _line_result(line: str, out: dict[str, Any], started: float) -> dict[str, Any]:
    return {
        "cmd_preview": line[:200],
        "returncode": out.get("returncode"),
        "stdout": out.get("stdout", ""),
        "stderr": out.get("stderr", ""),
        "duration_ms": int((time.monotonic() - started) * 1000),
    }
