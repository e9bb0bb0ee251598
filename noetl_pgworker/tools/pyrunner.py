"""Runs one ``python`` command's code. Standard library only.

Used two ways: imported, by the in-process ("inline") mode; and as a script, by the default
"spawn" mode, in a fresh interpreter: ``python -I pyrunner.py RESULT_PATH`` with a JSON
spec (``code``, ``args``, ``step``, ``memory_mb``) on stdin; and loaded by the fork server
("process" mode), whose command processes call :func:`run_to_file`. The script writes
``{"ok": true, "result": …}`` or ``{"ok": false, "error": "<Type>: <message>", "traceback": …}``
to RESULT_PATH; whatever the code prints goes to the process's own stdout/stderr.
"""

from __future__ import annotations

import builtins
import inspect
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any


class NoEntryPoint(Exception):
    """The code defines neither main() nor a `result` variable."""


def call_with_matching_args(func: Callable[..., Any], args: dict[str, Any]) -> Any:
    """Call ``func`` with the entries of ``args`` that its signature accepts."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return func(**args)
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return func(**args)
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return func(**{k: v for k, v in args.items() if k in names})


def run_code(code: str, args: dict[str, Any], step: str) -> Any:
    """Execute ``code``; the value of ``main(**matching args)``, else of ``result``."""
    compiled = compile(code, f"<step {step}>", "exec")
    namespace: dict[str, Any] = {"__name__": "__noetl_step__", "__builtins__": builtins}
    namespace.update({k: v for k, v in args.items() if k.isidentifier()})
    exec(compiled, namespace)
    main = namespace.get("main")
    if callable(main):
        return call_with_matching_args(main, args)
    if "result" in namespace:
        return namespace["result"]
    raise NoEntryPoint("python: the code defines neither main() nor a `result` variable")


def _main() -> int:
    return run_to_file(json.loads(sys.stdin.buffer.read()), sys.argv[1])


def run_to_file(spec: dict[str, Any], result_path: str) -> int:
    """Run a spec (``code``, ``args``, ``step``, ``memory_mb``); write its result as JSON to
    ``result_path``. Used by the script and by the fork server's command processes."""
    memory_mb = spec.get("memory_mb")
    if memory_mb:
        try:
            import resource

            limit = int(memory_mb) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass  # not on this platform: run without the cap
    try:
        value = run_code(spec["code"], spec.get("args") or {}, spec.get("step") or "step")
        try:
            text = json.dumps({"ok": True, "result": value}, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            text = json.dumps(
                {
                    "ok": False,
                    "error": f"result is not JSON-serialisable: {exc}",
                    "error_type": "serialisation",
                }
            )
    except NoEntryPoint as exc:
        text = json.dumps({"ok": False, "error": str(exc), "error_type": "tool_error"})
    except BaseException as exc:  # user code may raise anything, SystemExit included
        text = json.dumps(
            {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "error_type": "exception",
                "traceback": traceback.format_exc()[-8000:],
            }
        )
    with open(result_path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
