"""``python``: run a snippet of Python code, NoETL style.

Input (``context.tool_config`` merged with ``context.input``): ``code`` (source text) or
``code_b64``; ``args`` merged over ``context.input``. If the code defines ``main(...)`` it is
called with the arguments its signature names (all of them when it takes ``**kwargs``);
otherwise the module-level variable ``result`` is the output. The arguments are also visible
as module globals. An exception fails the command with ``<ExceptionType>: <message>``.

By default (``mode="process"``) each command runs in a fresh fork of the fork server
(:mod:`~noetl_pgworker.tools.forkserver`), a helper process that has the runner and the
preloaded modules imported; ``mode="spawn"`` starts a new interpreter per command instead
(slower, nothing preloaded). Either way a crash, ``os._exit``, an endless loop or a memory
blow-up ends that process, not the worker; it is killed at the command's timeout with every
process it started; the operator's limits (address space, processes, file size, CPU time)
are its ceiling and ``memory_mb`` etc. can only lower them; it does not inherit the worker's
environment; it may run as another user (``run_as``); and what it prints is captured
(bounded) and returned beside the result as ``_stdout``/``_stderr``. In ``process`` mode it
runs in ``/`` (no directory of its own is made per command: scratch files belong in
``tempfile``'s directory); in ``spawn`` mode in a temporary directory. ``mode="inline"`` runs
the code on the worker's thread: faster, and unsafe — the code can crash or hang the worker,
and the timeout cannot stop it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ToolError, ToolTimeout
from ..models import Command, ToolOutput
from ..render import command_context, render_args
from . import process
from .base import Confinement, ToolContext
from .pyrunner import NoEntryPoint, run_code
from .scriptsource import command_script, has_script

RUNNER = process.RUNNER
MODES = ("process", "spawn", "inline")
OUTPUT_LIMIT = 64 * 1024


class PythonTool:
    kind = "python"

    def __init__(
        self,
        mode: str = "process",
        memory_mb: int = 2048,
        *,
        sandbox: process.Sandbox | None = None,
        confinement: Confinement | None = None,
    ) -> None:
        #: where a ``script`` from an http source may come from (as the http tool may go)
        self.confinement = confinement
        if mode not in MODES:
            raise ValueError("python mode must be 'process', 'spawn' or 'inline'")
        self.mode = mode
        #: process and spawn: each command in a process of its own; inline: on the worker
        self.runs_apart = mode != "inline"
        self.memory_mb = memory_mb
        self.sandbox: process.Sandbox | None = None
        if mode != "inline":
            self.sandbox = sandbox or process.Sandbox(process.Limits(memory_mb=memory_mb))

    def start(self) -> None:
        if self.sandbox is not None:
            self.sandbox.start()

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()

    def run(self, command: Command, ctx: ToolContext) -> Any:
        config = command.tool_config
        code = _source(command, ctx, self.confinement)
        for key in ("args", "input"):
            if config.get(key) is not None and not isinstance(config.get(key), dict):
                raise ToolError(f"python: tool_config.{key} must be an object")
        libs = checked_libs(config.get("libs"))
        # NoETL's worker renders the arguments' templates against the render context, and
        # gives the code that context as the global `context`.
        context = command_context(command)
        args: dict[str, Any] = render_args(command, command.args)
        if self.sandbox is None:
            try:
                return run_code(code, args, command.step, context=context, libs=libs)
            except NoEntryPoint as exc:
                raise ToolError(str(exc)) from None
        return self._run_process(self.sandbox, code, args, command, ctx, context, libs)

    def _run_process(
        self,
        sandbox: process.Sandbox,
        code: str,
        args: dict[str, Any],
        command: Command,
        ctx: ToolContext,
        context: dict[str, Any],
        libs: dict[str, Any] | None,
    ) -> ToolOutput:
        limits = sandbox.limits.lowered_by(command.tool_config, "python")
        spec = {
            "code": code,
            "args": args,
            "step": command.step,
            "memory_mb": limits.memory_mb,
            "context": context,
            "libs": libs,
        }
        try:
            spec_text = json.dumps(spec).encode()
        except (TypeError, ValueError) as exc:
            raise ToolError(f"python: the arguments are not JSON: {exc}") from exc
        if self.mode == "spawn":
            with sandbox.workdir("noetl-pgworker-py-") as tmp:
                result_path = Path(tmp) / "result.json"
                sandbox.shared_file(result_path)
                spec_path = Path(tmp) / "spec.json"
                spec_path.write_bytes(spec_text)
                request = {
                    "kind": "exec",
                    "argv": [sys.executable, "-I", str(RUNNER), str(result_path)],
                    "stdin_path": str(spec_path),
                    "env": sandbox.env(),
                }
                done = self._run(sandbox, request, Path(tmp), limits, ctx, None)
                result = _result(done, lambda: result_path.read_bytes())
        else:
            # No directory of its own: the command runs in the sandbox's scratch directory,
            # its output and its result go to unnamed files it is handed open (creating and
            # removing a directory per command cost more than the rest of the command on a
            # disk shared with PostgreSQL).
            result_fd = sandbox.result_file()
            try:
                request = {"kind": "python", "spec": spec, "env": sandbox.env()}
                done = self._run(sandbox, request, None, limits, ctx, result_fd)
                result = _result(done, lambda: process.read_fd(result_fd))
            finally:
                os.close(result_fd)
        logs = done_logs(done)
        if not result.get("ok"):
            if result.get("traceback"):
                logs["_traceback"] = result["traceback"]
            failure = ToolError(str(result.get("error")), extra=logs)
            failure.error_type = str(result.get("error_type") or "exception")
            raise failure
        return ToolOutput(result.get("result"), logs)

    @staticmethod
    def _run(
        sandbox: process.Sandbox,
        request: dict[str, Any],
        workdir: Path | None,
        limits: process.Limits,
        ctx: ToolContext,
        result_fd: int | None,
    ) -> process.Finished:
        try:
            return sandbox.run(
                request,
                timeout=ctx.remaining(),
                workdir=workdir,
                limits=limits,
                output_limit=OUTPUT_LIMIT,
                tool="python",
                result_fd=result_fd,
            )
        except process.TimedOut:
            raise ToolTimeout(
                f"python: timed out after {ctx.timeout:g} s (process killed)"
            ) from None


def done_logs(done: process.Finished) -> dict[str, str]:
    logs = {"_stdout": done.stdout, "_stderr": done.stderr}
    return {k: v for k, v in logs.items() if v}


def _result(done: process.Finished, read: Callable[[], bytes]) -> dict[str, Any]:
    """The runner's result document; a failure saying how the process died if it wrote none."""
    try:
        result = json.loads(read().decode("utf-8"))
    except (OSError, ValueError):
        raise ToolError(_died(done.returncode), extra=done_logs(done)) from None
    if not isinstance(result, dict):
        raise ToolError(_died(done.returncode), extra=done_logs(done))
    return result


def _died(returncode: int) -> str:
    if returncode < 0:
        name = process.signal_name(returncode)
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"python: the process was killed by {name}{hint} before it returned a result"
    return f"python: the process exited with code {returncode} before it returned a result"


def config_int(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ToolError(f"python: tool_config.{key} must be a positive integer")
    return value


_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def checked_libs(libs: Any) -> dict[str, Any] | None:
    """``tool_config.libs`` (NoETL's imports: alias → module, or alias → {from, import}),
    checked to hold only names; None when there are none."""
    if libs is None or libs == {}:
        return None
    if not isinstance(libs, dict):
        raise ToolError("python: tool_config.libs must be an object (alias: module)")
    for alias, spec in libs.items():
        names = (
            [spec]
            if isinstance(spec, str)
            else [spec.get("from"), spec.get("import")]
            if isinstance(spec, dict)
            else [None]
        )
        if not (
            isinstance(alias, str)
            and (alias.isidentifier() or alias == spec)  # `import a.b` binds `a`
            and all(isinstance(n, str) and _MODULE.fullmatch(n) for n in names)
        ):
            raise ToolError(
                f"python: tool_config.libs.{alias}: {spec!r} is not a module name"
                " (or {from: module, import: name})"
            )
    return libs


def _source(command: Command, ctx: ToolContext, confinement: Confinement | None) -> str:
    """The code: ``script`` (a file or an http source, NoETL's first choice), ``code_b64``,
    or ``code``."""
    config = command.tool_config
    if has_script(config):
        script = command_script(command, "python", ctx.remaining(), confinement)
        if not script.strip():
            raise ToolError("python: the script is empty")
        return script
    code = config.get("code")
    encoded = config.get("code_b64")
    if encoded is not None:
        if not isinstance(encoded, str):
            raise ToolError("python: tool_config.code_b64 must be a string")
        try:
            code = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ToolError(
                f"python: tool_config.code_b64 is not base64 UTF-8 text: {exc}"
            ) from exc
    if not isinstance(code, str) or not code.strip():
        raise ToolError(
            "python: tool_config.code (or code_b64) is required (or tool_config.script)"
        )
    return code
