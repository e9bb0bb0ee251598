"""Runs one ``python`` command's code. Standard library only.

Used three ways: imported, by the in-process ("inline") mode; as a script, by the "spawn"
mode, in a fresh interpreter: ``python -I pyrunner.py RESULT_PATH`` with a JSON spec
(``code``, ``args``, ``step``, ``memory_mb``) on stdin; and loaded by the fork server
("process" mode), whose command processes call :func:`run_to_fd`. The script writes
``{"ok": true, "result": …}`` or ``{"ok": false, "error": "<Type>: <message>", "traceback": …}``
to RESULT_PATH; whatever the code prints goes to the process's own stdout/stderr.
"""

from __future__ import annotations

import builtins
import inspect
import json
import os
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any


class NoEntryPoint(Exception):
    """The code defines neither main() nor a `result` variable."""


CO_VARKEYWORDS = 0x08


def call_with_matching_args(
    func: Callable[..., Any], args: dict[str, Any], context: dict[str, Any] | None = None
) -> Any:
    """Call ``func`` with the entries of ``args`` that its signature accepts. With a
    ``context`` (NoETL's worker's): a parameter named ``context`` gets it, and a named
    parameter that no argument fills is looked up in its ``input``, its ``data``, then itself."""
    code = getattr(func, "__code__", None)
    if (
        type(func) is types.FunctionType
        and isinstance(code, types.CodeType)
        and not hasattr(func, "__wrapped__")
        and not hasattr(func, "__signature__")
    ):
        # A plain function: its code object names its parameters (what inspect.signature
        # would say, for a fraction of the work and of the memory pages touched in a fork).
        named = code.co_varnames[
            code.co_posonlyargcount : code.co_argcount + code.co_kwonlyargcount
        ]
        if context is not None:
            args = _from_context(named, args, context)
        if code.co_flags & CO_VARKEYWORDS:
            return func(**args)
        return func(**{k: v for k, v in args.items() if k in named})
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return func(**args)
    params = signature.parameters.values()
    names = tuple(
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    if context is not None:
        args = _from_context(names, args, context)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return func(**args)
    return func(**{k: v for k, v in args.items() if k in names})


def _from_context(
    names: tuple[str, ...], args: dict[str, Any], context: dict[str, Any]
) -> dict[str, Any]:
    """``args`` with the named parameters it lacks taken from ``context`` (NoETL's order)."""
    filled = dict(args)
    sources = [context.get("input"), context.get("data"), context]
    for name in names:
        if name == "context":
            filled["context"] = context
            continue
        if name in filled:
            continue
        for source in sources:
            if isinstance(source, dict) and name in source:
                filled[name] = source[name]
                break
    return filled


def import_libs(libs: dict[str, Any]) -> dict[str, Any]:
    """NoETL's ``libs``, as names to bind: ``alias: "m"`` is ``import m as alias`` (``import m``
    when the alias is ``m``, which binds m's top package), ``alias: {"from": "p", "import":
    "n"}`` is ``from p import n as alias`` (n may be a submodule)."""
    import importlib

    bound: dict[str, Any] = {}
    for alias, spec in libs.items():
        if isinstance(spec, str):
            module = importlib.import_module(spec)
            if alias == spec:
                top = spec.split(".", 1)[0]
                bound[top] = sys.modules[top]
            else:
                bound[alias] = module
            continue
        parent = importlib.import_module(spec["from"])
        try:
            bound[alias] = getattr(parent, spec["import"])
        except AttributeError:
            bound[alias] = importlib.import_module(f"{spec['from']}.{spec['import']}")
    return bound


#: Modules NoETL's worker gives every python step's code without an import (the two others
#: only when the code names them: importing them costs a command's process).
_GIVEN = {"os": os, "json": json}
_GIVEN_ON_USE = ("datetime", "uuid")


def _namespace(
    code: str, args: dict[str, Any], context: dict[str, Any] | None, libs: dict[str, Any] | None
) -> dict[str, Any]:
    """The code's globals, as NoETL's worker makes them: the given modules, ``context``, the
    arguments, ``data`` (from the context) unless an argument has that name, then ``libs``."""
    namespace: dict[str, Any] = {"__name__": "__noetl_step__", "__builtins__": builtins}
    if context is not None:
        namespace.update(_GIVEN)
        for name in _GIVEN_ON_USE:
            if name in code:
                namespace[name] = __import__(name)
        namespace["context"] = context
    namespace.update({k: v for k, v in args.items() if k.isidentifier()})
    if context is not None and "data" not in args:
        if "data" in context:
            namespace["data"] = context["data"]
        elif "result" in context:
            namespace["data"] = context["result"]
    if libs:
        namespace.update(import_libs(libs))
    return namespace


def compile_step(code: str, step: str) -> types.CodeType:
    return compile(code, f"<step {step}>", "exec")


def run_code(
    code: str,
    args: dict[str, Any],
    step: str,
    compiled: types.CodeType | None = None,
    *,
    context: dict[str, Any] | None = None,
    libs: dict[str, Any] | None = None,
) -> Any:
    """Execute ``code`` (``compiled``: already compiled, by :func:`compile_step`); the value of
    ``main(**matching args)``, else of ``result``. ``context`` is NoETL's ``context`` global
    (None: a bare namespace), ``libs`` its imports."""
    if compiled is None:
        compiled = compile_step(code, step)
    namespace = _namespace(code, args, context, libs)
    exec(compiled, namespace)
    main = namespace.get("main")
    if callable(main):
        return call_with_matching_args(main, args, context)
    if "result" in namespace:
        return namespace["result"]
    raise NoEntryPoint("python: the code defines neither main() nor a `result` variable")


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _c_encoder() -> Any:
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    return make(
        {}, _not_json, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, False
    )


#: Made once, when the fork server loads the runner: a command's process only calls it (one
#: call at a time: its circular-reference markers are its own).
_ENCODE = _c_encoder()


def dumps(value: Any) -> str:
    """``json.dumps(value, allow_nan=False)``, straight to the C encoder where there is one
    (json.dumps's Python layers cost a command's process dozens of copied memory pages)."""
    if _ENCODE is None:
        return json.dumps(value, allow_nan=False)
    return "".join(_ENCODE(value, 0))


def _main() -> int:
    return run_to_file(json.loads(sys.stdin.buffer.read()), sys.argv[1])


def run_to_file(spec: dict[str, Any], result_path: str) -> int:
    """:func:`run_to_fd`, the result written to the file ``result_path`` (the script's)."""
    fd = os.open(result_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        return run_to_fd(spec, fd)
    finally:
        os.close(fd)


def run_to_fd(spec: dict[str, Any], fd: int, compiled: types.CodeType | None = None) -> int:
    """Run a spec (``code``, ``args``, ``step``, ``memory_mb``); write its result as JSON to
    the open file ``fd``. Used by the fork server's command processes (``compiled``: the
    code, compiled by the fork server before the fork)."""
    memory_mb = spec.get("memory_mb")
    if memory_mb:
        try:
            import resource

            limit = int(memory_mb) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass  # not on this platform: run without the cap
    try:
        value = run_code(
            spec["code"],
            spec.get("args") or {},
            spec.get("step") or "step",
            compiled,
            context=spec.get("context"),
            libs=spec.get("libs"),
        )
        try:
            text = dumps({"ok": True, "result": value})
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
    data = text.encode("utf-8")
    while data:
        data = data[os.write(fd, data) :]
    return 0


if __name__ == "__main__":
    sys.exit(_main())
