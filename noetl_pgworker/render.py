"""Jinja templates in commands, rendered the way NoETL's worker renders them.

NoETL's server renders a single tool's config before it writes the command, but it keeps any
template it could not render (a name it did not know), and it leaves every task of a
``task_sequence`` unrendered. NoETL's worker renders those at run time, per tool, against the
command's ``render_context``; so does this worker:

* :func:`render_value` is NoETL's ``render_template``: a string without ``{{ }}``/``{% %}``
  is returned as is; a bare ``{{ a }}`` or ``{{ a.b.c }}`` returns the value itself (a dict
  stays a dict); anything else is rendered and the text parsed back (``[..]``/``{..}`` as
  JSON or a Python literal, ``true``/``false``, digits, numbers, ``null``) unless the template
  uses ``| tojson``; if rendering fails the template is kept. Dicts and lists are rendered
  item by item.
* :func:`render_text` renders to text only (NoETL's shell tool and policy conditions).
* A missing name renders as ``""``; an attribute of a missing name is an error (template kept).
* Step results (top-level dicts of the context) answer ``step.field`` for a key, ``step.data``
  for themselves when they have no ``data`` key, fall back to ``step.context.field``, and
  render as JSON; a top-level list also answers ``.result`` (itself).

Templates come from the command table, so they run in Jinja's sandbox (no private attributes,
no unsafe calls), with repetition (``*``) and powers (``**``) bounded; and, while a command
runs, in a sandboxed child process (:data:`ISOLATE`, set by the dispatcher) unless every
template a call renders is bounded (:mod:`noetl_pgworker.template_check`): a template can loop,
hold the GIL in one C call or allocate without end only in a process of its own, under the
sandbox's limits and the command's timeout.
"""

from __future__ import annotations

import ast
import base64
import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from jinja2 import Template
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from .models import Command
from .template_check import all_bounded

logger = logging.getLogger(__name__)

#: Context keys whose dicts stay plain (NoETL does not wrap them as step results).
RESERVED = frozenset(
    {"work", "workload", "context", "env", "job", "input", "data", "results", "ctx", "iter"}
    | {"loop", "event"}
)
#: What a template may build with ``*`` (characters or items).
MAX_REPEAT = 1_000_000
#: The largest exponent ``**`` takes (with a base other than 0, 1, -1).
MAX_EXPONENT = 4096
#: Rendered text longer than this is not parsed back as a Python literal.
MAX_LITERAL = 100_000
_FAST_PATH_OPERATORS = ("==", "!=", "<", ">", "+", "-", "*", "/", "|", " if ", " else ")


def has_template(value: str) -> bool:
    return ("{{" in value and "}}" in value) or ("{%" in value and "%}" in value)


class ResultView(Mapping[str, Any]):
    """A step result as templates see it (NoETL's ``TaskResultProxy``), without copying."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def lookup(self, name: Any) -> Any:
        data = self._data
        if name in data:
            return wrap(data[name])
        if name == "data":
            return self
        inner = data.get("context")
        if isinstance(inner, Mapping) and name in inner:
            return wrap(inner[name])
        if name == "is_defined":
            return True
        return _MISSING

    def __getitem__(self, key: str) -> Any:
        return wrap(self._data[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __str__(self) -> str:
        return json.dumps(self._data, default=str)

    __repr__ = __str__


class ListView(Sequence[Any]):
    """A top-level list result; ``.result`` is the list itself (NoETL's ``{{ x.result }}``)."""

    __slots__ = ("_items",)

    def __init__(self, items: list[Any]) -> None:
        self._items = items

    def __getitem__(self, index: Any) -> Any:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __str__(self) -> str:
        return str(self._items)

    __repr__ = __str__


_MISSING = object()
_DICT_METHODS = frozenset({"items", "keys", "values", "get"})


def wrap(value: Any) -> Any:
    return ResultView(value) if isinstance(value, dict) else value


def _unwrap(value: Any) -> Any:
    if isinstance(value, ResultView):
        return value._data
    if isinstance(value, ListView):
        return value._items
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(obj, default=_unwrap, **kwargs)


def _b64encode(value: Any) -> str:
    return base64.b64encode(str(value).encode("utf-8")).decode("ascii")


class TemplateEnvironment(SandboxedEnvironment):
    """The sandbox, plus step-result views and bounded ``*``/``**``."""

    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, ResultView):
            found = obj.lookup(attribute)
            if found is not _MISSING:
                return found
            if attribute in _DICT_METHODS:
                return getattr(obj._data, attribute)
            return self.undefined(obj=obj, name=attribute)
        if isinstance(obj, ListView) and attribute == "result":
            return obj
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, ResultView):
            found = obj.lookup(argument) if isinstance(argument, str) else _MISSING
            return self.undefined(obj=obj, name=argument) if found is _MISSING else found
        return super().getitem(obj, argument)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(times, int)
                    and len(seq) * times > MAX_REPEAT
                ):
                    raise SecurityError(f"a template may not build more than {MAX_REPEAT}")
            return left * right
        if operator == "**":
            if (
                isinstance(right, int | float)
                and abs(right) > MAX_EXPONENT
                and isinstance(left, int | float)
                and abs(left) not in (0, 1)
            ):
                raise SecurityError(f"a template may not raise to a power above {MAX_EXPONENT}")
            return left**right
        return super().call_binop(context, operator, left, right)


ENV = TemplateEnvironment(autoescape=False, keep_trailing_newline=True)
ENV.filters["b64encode"] = _b64encode
ENV.policies["json.dumps_function"] = _dumps


#: Templates up to this size are kept compiled (a task sequence renders the same ones often).
MAX_CACHED_TEMPLATE = 16 * 1024


@functools.lru_cache(maxsize=512)
def _compile_cached(source: str) -> Template:
    return ENV.from_string(source)


def _compile(source: str) -> Template:
    if len(source) > MAX_CACHED_TEMPLATE:
        return ENV.from_string(source)
    return _compile_cached(source)


def template_context(context: Mapping[str, Any]) -> dict[str, Any]:
    """The context as templates see it: step results (top-level dicts) as :class:`ResultView`,
    top-level lists as :class:`ListView`; NoETL's namespaces (``ctx``, ``input``…) plain."""
    out = dict(context)
    for key, value in context.items():
        if key in RESERVED:
            continue
        if isinstance(value, dict):
            out[key] = ResultView(value)
        elif isinstance(value, list):
            out[key] = ListView(value)
    return out


def _direct(expr: str, context: Mapping[str, Any]) -> Any:
    """The value of a bare ``{{ a }}`` / ``{{ a.b.c }}`` by lookup, or ``_MISSING``."""
    if not (expr.startswith("{{") and expr.endswith("}}")):
        return _MISSING
    path = expr[2:-2].strip()
    if not path or "{" in path or "}" in path or any(op in path for op in _FAST_PATH_OPERATORS):
        return _MISSING
    value: Any = context
    for part in path.split("."):
        part = part.strip()
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _parse_back(rendered: str, template: str) -> Any:
    if "| tojson" in template or "|tojson" in template:
        return rendered
    if (rendered.startswith("[") and rendered.endswith("]")) or (
        rendered.startswith("{") and rendered.endswith("}")
    ):
        try:
            return json.loads(rendered)
        except ValueError:
            pass
        literal = _literal(rendered)
        if literal is not _MISSING:
            return literal
    lowered = rendered.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if rendered.isascii() and rendered.isdigit():
        return int(rendered)
    if lowered.strip() in ("none", "null"):
        return None
    literal = _literal(rendered)
    if literal is not _MISSING:
        return literal
    return "" if not rendered.strip() else rendered


def _literal(text: str) -> Any:
    """A Python literal NoETL would take (numbers, quoted strings, lists…) if it is JSON-ready."""
    if len(text) > MAX_LITERAL:
        return _MISSING
    try:
        value = ast.literal_eval(text)
    except Exception:  # SyntaxError, ValueError, MemoryError, RecursionError…
        return _MISSING
    if isinstance(value, tuple):
        value = list(value)
    if value is None or isinstance(value, bool | int | float | str | list | dict):
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            return _MISSING
        return value
    return _MISSING


class _Renderer:
    """Renders many values against one context (the wrapped context is built once)."""

    def __init__(self, context: Mapping[str, Any]) -> None:
        self.context = context
        self._wrapped: dict[str, Any] | None = None

    @property
    def wrapped(self) -> dict[str, Any]:
        if self._wrapped is None:
            self._wrapped = template_context(self.context)
        return self._wrapped

    def value(self, template: Any) -> Any:
        if isinstance(template, str):
            return self.string(template)
        if isinstance(template, dict):
            return {k: self.value(v) for k, v in template.items()} if template else template
        if isinstance(template, list):
            return [self.value(item) for item in template]
        return template

    def string(self, template: str) -> Any:
        if not has_template(template):
            return template
        expr = template.strip()
        if expr == "{{}}":
            return ""
        direct = _direct(expr, self.context)
        if direct is not _MISSING:
            return direct
        try:
            rendered = _compile(template).render(self.wrapped)
        except MemoryError:
            raise  # not the template's fault NoETL forgives: the command fails
        except Exception as exc:  # NoETL keeps the template when it cannot render it
            logger.debug("template kept as is: %s: %s", type(exc).__name__, exc)
            return template
        return _parse_back(rendered, template)

    def text(self, template: str) -> str:
        if not has_template(template):
            return template
        try:
            return _compile(template).render(self.wrapped)
        except MemoryError:
            raise
        except Exception as exc:
            logger.debug("template kept as is: %s: %s", type(exc).__name__, exc)
            return template


#: While a command runs: how to evaluate, in the sandbox, a call whose templates are not all
#: bounded (``op``, its arguments) -> its value. None: everything is evaluated here.
ISOLATE: ContextVar[Callable[[str, list[Any]], Any] | None] = ContextVar(
    "noetl_pgworker_isolate", default=None
)
#: The largest answer an isolated evaluation may give (bytes of JSON).
MAX_ISOLATED_ANSWER = 32 * 1024 * 1024


def _evaluate(op: str, templates: Any, *args: Any) -> Any:
    """``_LOCAL[op](*args)``: here if every template in ``templates`` is bounded (or no
    command runs), else in the sandbox."""
    isolate = ISOLATE.get()
    if isolate is not None and not all_bounded(templates):
        return isolate(op, list(args))
    return _LOCAL[op](*args)


def evaluate_isolated(op: str, data: list[Any], max_bytes: int = MAX_ISOLATED_ANSWER) -> Any:
    """In the sandbox's child process: ``op`` evaluated, its answer at most ``max_bytes``."""
    value = _LOCAL[op](*data)
    if len(json.dumps(value, default=_unwrap)) > max_bytes:
        raise ValueError(f"templates: the rendered values are larger than {max_bytes} bytes")
    return value


def render_value(template: Any, context: Mapping[str, Any]) -> Any:
    """NoETL's ``render_template`` (see the module's docstring)."""
    return _evaluate("value", template, template, context)


def render_text(template: str, context: Mapping[str, Any]) -> str:
    """Render to text, no parsing back; the template itself if it cannot be rendered."""
    return str(_evaluate("text", template, template, context))


def render_condition(template: str, context: Mapping[str, Any]) -> Any:
    """A condition or ``set`` value (NoETL's task_sequence): text, ``[..]``/``{..}`` parsed."""
    return _evaluate("condition", template, template, context)


def _value_here(template: Any, context: Mapping[str, Any]) -> Any:
    return _Renderer(context).value(template)


def _text_here(template: str, context: Mapping[str, Any]) -> str:
    return _Renderer(context).text(template)


def _condition_here(template: str, context: Mapping[str, Any]) -> Any:
    return _json_like(_Renderer(context).text(template))


def _json_like(text: str) -> Any:
    """``text`` parsed if it looks like ``[..]``/``{..}`` (JSON, else a Python literal)."""
    stripped = text.strip()
    if (stripped.startswith("{") and stripped.endswith("}")) or (
        stripped.startswith("[") and stripped.endswith("]")
    ):
        try:
            return json.loads(stripped)
        except ValueError:
            literal = _literal(stripped)
            return text if literal is _MISSING else literal
    return text


def command_context(command: Command) -> dict[str, Any]:
    """What a command's templates see: its ``render_context`` (or, without one,
    ``{input, step}``), plus ``execution_id``, ``command_id``, ``event.command_id``, ``job``
    (as NoETL's worker adds them) and ``input`` (the merged arguments) when it has none."""
    args = command.args
    raw = command.input.get("render_context")
    context: dict[str, Any] = (
        dict(raw) if isinstance(raw, dict) and raw else {"input": args, "step": command.step}
    )
    execution_id = str(command.execution_id)
    context.setdefault("execution_id", execution_id)
    context["command_id"] = command.command_id
    event = context.get("event")
    context["event"] = {**event} if isinstance(event, dict) else {}
    context["event"].setdefault("command_id", command.command_id)
    context.setdefault("job", {"uuid": execution_id, "execution_id": execution_id})
    context.setdefault("input", args)
    return context


def task_with(command: Command) -> dict[str, Any]:
    """NoETL's ``task_with`` for most tools: the config, ``input``/``args`` (the merged
    arguments) and every argument at the top level (arguments win)."""
    args = command.args
    return {**command.tool_config, "input": args, "args": args, **args}


def sql_quoted(values: Mapping[str, Any]) -> dict[str, Any]:
    """String values with ``'`` doubled, for interpolation into SQL literals (NoETL's
    postgres tool does this to the step's parameters, never to the rest of the context)."""
    return {k: v.replace("'", "''") if isinstance(v, str) else v for k, v in values.items()}


def render_sql(command: Command, sql: Any, *, quote: bool = True) -> Any:
    """The SQL of ``postgres`` (``quote``) or ``duckdb`` rendered against the command's context
    with ``task_with`` over it; a string is rendered whole, a list item by item."""
    base = command_context(command)
    params = task_with(command)
    templates = [sql] if quote else [sql, params]
    return _evaluate("sql", templates, sql, base, params, quote)


def _sql_here(sql: Any, base: dict[str, Any], params: dict[str, Any], quote: bool) -> Any:
    params = sql_quoted(params) if quote else _value_here(params, base)
    return _value_here(sql, {**base, **params})


HTTP_KEYS = ("url", "endpoint", "params", "payload", "body", "json", "data", "headers")


def render_http(command: Command, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with the request parts NoETL's http tool renders (URL, query, body, headers)."""
    parts = [cfg[key] for key in HTTP_KEYS if key in cfg]
    return dict(_evaluate("http", parts, dict(cfg), command_context(command)))


def _http_here(cfg: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    renderer = _Renderer(context)
    out = dict(cfg)
    for key in HTTP_KEYS:
        if key in out:
            out[key] = renderer.value(out[key])
    return out


def render_shell(command: Command, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with the command(s) and ``env`` values rendered to text (NoETL's shell tool: only
    strings holding a template, against the render context; kept as is if rendering fails)."""
    parts = [cfg.get(key) for key in ("command", "cmd", "cmds", "env")]
    return dict(_evaluate("shell", parts, dict(cfg), command_context(command)))


def _shell_here(cfg: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    renderer = _Renderer(context)
    out = dict(cfg)
    for key in ("command", "cmd", "cmds"):
        value = out.get(key)
        if isinstance(value, str):
            out[key] = renderer.text(value)
        elif isinstance(value, list):
            out[key] = [renderer.text(v) if isinstance(v, str) else v for v in value]
    env = out.get("env")
    if isinstance(env, dict):
        out["env"] = {k: renderer.text(v) if isinstance(v, str) else v for k, v in env.items()}
    return out


def render_args(command: Command, args: Mapping[str, Any]) -> dict[str, Any]:
    """The python tool's arguments as NoETL renders them: a bare ``{{ name }}`` of a context
    key gives its value; other strings are rendered to text (kept if that fails), and every
    string that looks like ``[..]``/``{..}`` is parsed (JSON, else a Python literal)."""
    return dict(_evaluate("args", dict(args), dict(args), command_context(command)))


def _args_here(args: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    renderer = _Renderer(context)
    out: dict[str, Any] = {}
    for key, value in args.items():
        if not isinstance(value, str):
            out[key] = value
            continue
        stripped = value.strip()
        if stripped.startswith("{{") and stripped.endswith("}}"):
            name = stripped[2:-2].strip()
            if name.isidentifier() and name in context:
                out[key] = context[name]
                continue
        out[key] = _json_like(renderer.text(value))
    return out


_LOCAL: dict[str, Callable[..., Any]] = {
    "value": _value_here,
    "text": _text_here,
    "condition": _condition_here,
    "sql": _sql_here,
    "http": _http_here,
    "shell": _shell_here,
    "args": _args_here,
}


__all__ = [
    "ENV",
    "ISOLATE",
    "ListView",
    "ResultView",
    "command_context",
    "evaluate_isolated",
    "has_template",
    "render_args",
    "render_condition",
    "render_http",
    "render_shell",
    "render_sql",
    "render_text",
    "render_value",
    "task_with",
]
