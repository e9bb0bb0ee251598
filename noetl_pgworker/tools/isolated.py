"""Running the worker's own code on a row's data in a sandboxed child process.

What a row carries (templates, duckdb SQL) is evaluated by a function of this package, run in
a fresh fork of a fork server of its own (:class:`~noetl_pgworker.tools.process.Sandbox`)
under the sandbox's limits (address space, CPU time, processes, file size, ``--run-as``), a
scrubbed environment, and the command's remaining time: a template that loops, holds the GIL
in one C call or allocates without end, or SQL that reads the worker's files, ends that
command alone (killed at its timeout, or out of memory in its own process), never the worker.

The function is named by module and name (``entry``), called with JSON arguments; it returns
JSON. Its answer is read only up to ``max_bytes``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ToolError, ToolTimeout
from . import process

#: What this fork server imports before serving: the template engine (and its callers), and
#: its warm-up (constant templates rendered once, before any command's process is forked).
PRELOAD = (
    "json",
    "inspect",
    "traceback",
    "noetl_pgworker.render",
    "noetl_pgworker.tools.isolated_warm",
)
#: The answer's size when the caller names none.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: stdout/stderr kept of an isolated call (only for errors).
OUTPUT_LIMIT = 8 * 1024
#: The environment of its fork server: two malloc arenas, not eight per core (each reserves
#: 64 MiB of address space, which counts against the sandbox's limit).
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2"}
#: The function that renders a command's templates in the child.
RENDER_ENTRY = "noetl_pgworker.render:evaluate_isolated"


class IsolatedError(ToolError):
    """The isolated call failed (raised, ran out of memory, or its process died)."""

    error_type = "sandbox"


def preload(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """:data:`PRELOAD` plus those of ``extra`` that are installed."""
    found = tuple(name for name in extra if importlib.util.find_spec(name) is not None)
    return PRELOAD + found


def isolated_preload() -> tuple[str, ...]:
    """What the worker's isolated fork server imports: the templates' engine, and duckdb
    where it is installed."""
    return preload(("duckdb",))


class Isolated:
    """Calls into the package in a sandboxed child (see the module's docstring)."""

    def __init__(self, sandbox: process.Sandbox) -> None:
        self.sandbox = sandbox

    def start(self) -> None:
        self.sandbox.start()

    def close(self) -> None:
        self.sandbox.close()

    def call(
        self,
        entry: str,
        args: dict[str, Any],
        *,
        timeout: float,
        what: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        workdir: Path | None = None,
    ) -> Any:
        """``entry`` (``"module:function"``) called with ``args`` in a child; its value.
        ``what`` names the caller in errors (``templates``, ``duckdb``)."""
        module, _, name = entry.partition(":")
        limits = self.sandbox.limits
        spec = {
            "code": f"from {module} import {name} as main\n",
            "args": args,
            "step": what,
            "memory_mb": limits.memory_mb,
        }
        request = {"kind": "python", "spec": spec, "env": self.sandbox.env()}
        result_fd = self.sandbox.result_file()
        try:
            try:
                done = self.sandbox.run(
                    request,
                    timeout=timeout,
                    workdir=workdir,
                    limits=limits,
                    output_limit=OUTPUT_LIMIT,
                    tool=what,
                    result_fd=result_fd,
                )
            except process.TimedOut:
                raise ToolTimeout(
                    f"{what}: did not finish within the command's timeout ({timeout:g} s"
                    " left); its process was killed"
                ) from None
            except TypeError as exc:  # (json) a context that is not JSON
                raise IsolatedError(f"{what}: the command's data is not JSON: {exc}") from None
            size = os.fstat(result_fd).st_size
            if size > max_bytes + 1024:
                raise IsolatedError(f"{what}: the answer is larger than {max_bytes} bytes")
            raw = process.read_fd(result_fd) if size else b""
        finally:
            os.close(result_fd)
        return _answer(raw, done, what, limits)

    def templates(self, remaining: Callable[[], float]) -> Callable[[str, list[Any]], Any]:
        """A command's :data:`noetl_pgworker.render.ISOLATE`: its templates evaluated in a
        child, within the command's remaining time (``remaining()``)."""

        def isolate(op: str, args: list[Any]) -> Any:
            return self.call(
                RENDER_ENTRY, {"op": op, "data": args}, timeout=remaining(), what="templates"
            )

        return isolate


def _answer(raw: bytes, done: process.Finished, what: str, limits: process.Limits) -> Any:
    try:
        result = json.loads(raw.decode("utf-8"))
    except (UnicodeError, ValueError):
        result = None
    if not isinstance(result, dict):
        how = (
            f"was killed by {process.signal_name(done.returncode)}"
            if done.returncode < 0
            else f"exited with code {done.returncode}"
        )
        raise IsolatedError(
            f"{what}: its process {how} before it answered (limits:"
            f" {limits.memory_mb} MiB, {limits.cpu_seconds} CPU s)"
        )
    if result.get("ok"):
        return result.get("result")
    error = str(result.get("error") or "failed")
    if error.startswith("MemoryError"):
        raise IsolatedError(
            f"{what}: out of memory (the sandbox's limit is {limits.memory_mb} MiB)"
        )
    _kind, _, message = error.partition(": ")
    if message.startswith(f"{what}:"):  # the child's own error, already named
        error = message
    failure = IsolatedError(error if error.startswith(f"{what}:") else f"{what}: {error}")
    failure.error_type = str(result.get("error_type") or "exception")
    raise failure


__all__ = ["MALLOC_ENV", "RENDER_ENTRY", "Isolated", "IsolatedError", "preload"]
