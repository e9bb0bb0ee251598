"""``python``: run a snippet of Python code, NoETL style.

Input (``context.tool_config`` merged with ``context.input``): ``code`` (source text) or
``code_b64``; ``args`` merged over ``context.input``. If the code defines ``main(...)`` it is
called with the arguments its signature names (all of them when it takes ``**kwargs``);
otherwise the module-level variable ``result`` is the output. The arguments are also visible
as module globals. An exception fails the command with ``<ExceptionType>: <message>``.

The code runs in the worker process, on a dispatcher thread: it can read and do anything the
worker can. Enable this kind only on workers whose ``noetl.command`` writers you trust.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import inspect
from collections.abc import Callable
from typing import Any

from ..errors import ToolError
from ..models import Command


class PythonTool:
    kind = "python"

    def run(self, command: Command) -> Any:
        config = command.tool_config
        code = _source(config)
        extra = config.get("args")
        if extra is not None and not isinstance(extra, dict):
            raise ToolError("python: tool_config.args must be an object")
        args: dict[str, Any] = {**command.args, **(extra or {})}
        compiled = compile(code, f"<step {command.step}>", "exec")
        namespace: dict[str, Any] = {"__name__": "__noetl_step__", "__builtins__": builtins}
        namespace.update({k: v for k, v in args.items() if k.isidentifier()})
        exec(compiled, namespace)
        main = namespace.get("main")
        if callable(main):
            return call_with_matching_args(main, args)
        if "result" in namespace:
            return namespace["result"]
        raise ToolError("python: the code defines neither main() nor a `result` variable")


def _source(config: dict[str, Any]) -> str:
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
        raise ToolError("python: tool_config.code (or code_b64) is required")
    return code


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
