"""Which templates may be evaluated in the worker's own process.

A template from a row is evaluated in the sandbox (:mod:`noetl_pgworker.tools.isolated`)
unless it is *bounded*: its Jinja syntax tree holds nothing but text and expressions whose cost
is at most linear in the size of the values they read, which are the command's own (already in
the worker's memory). Bounded means, exactly, a template whose every statement is output
(``{{ … }}``, no ``{% … %}`` tag at all) of expressions built only from:

* names, attribute lookups (``a.b``) and subscripts by a constant (``a['b']``, ``a[0]``);
* constants (short strings, numbers, booleans, none);
* comparisons (``==``, ``!=``, ``<``, ``>``, ``<=``, ``>=``), ``and``, ``or``, ``not``;
* the tests ``defined``, ``undefined``, ``none``, ``string``, ``number``, ``mapping``;
* the filters in :data:`LINEAR_FILTERS`, with constant arguments.

No loop, no call, no arithmetic, no ``*``/``%``/``~``/``**``, no other filter: nothing that
can repeat, allocate beyond a copy of what it reads, or run code. Everything else goes to the
sandbox. Templates longer than :data:`MAX_CHECKED` are not parsed here at all (sandbox).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment

#: Filters whose cost is linear in their input (or constant), with constant arguments.
LINEAR_FILTERS = frozenset(
    {
        "tojson",
        "default",
        "d",
        "lower",
        "upper",
        "trim",
        "string",
        "length",
        "count",
        "first",
        "last",
        "b64encode",
        "int",
        "float",
        "bool",
    }
)
LINEAR_TESTS = frozenset({"defined", "undefined", "none", "string", "number", "mapping"})
COMPARISONS = frozenset({"eq", "ne", "lt", "gt", "lteq", "gteq"})
#: Longest template source checked (longer ones are evaluated in the sandbox).
MAX_CHECKED = 4096
#: Longest string constant a bounded template may hold.
MAX_CONSTANT = 1024

_PARSER = SandboxedEnvironment(autoescape=False)


def has_template(value: str) -> bool:
    return ("{{" in value and "}}" in value) or ("{%" in value and "%}" in value)


def is_bounded(source: str) -> bool:
    """Whether ``source`` (a template) is bounded (see the module's docstring)."""
    if not has_template(source):
        return True
    if len(source) > MAX_CHECKED or "{%" in source:
        return False
    return _checked(source)


@functools.lru_cache(maxsize=4096)
def _checked(source: str) -> bool:
    """(Cached: at most 4096 sources of at most :data:`MAX_CHECKED` characters.)"""
    try:
        tree = _PARSER.parse(source)
    except Exception:  # a syntax error, a RecursionError on deep nesting…
        return False
    return all(
        isinstance(stmt, nodes.Output)
        and all(isinstance(n, nodes.TemplateData) or _expr(n) for n in stmt.nodes)
        for stmt in tree.body
    )


def _const(node: nodes.Node) -> bool:
    if not isinstance(node, nodes.Const):
        return False
    value = node.value
    if isinstance(value, str):
        return len(value) <= MAX_CONSTANT
    return value is None or isinstance(value, bool | int | float)


def _expr(node: nodes.Node) -> bool:
    if isinstance(node, nodes.Name):
        return node.ctx == "load"
    if _const(node):
        return True
    if isinstance(node, nodes.Getattr):
        return _expr(node.node)
    if isinstance(node, nodes.Getitem):
        return _const(node.arg) and _expr(node.node)
    if isinstance(node, nodes.Compare):
        return _expr(node.expr) and all(op.op in COMPARISONS and _expr(op.expr) for op in node.ops)
    if isinstance(node, nodes.And | nodes.Or):
        return _expr(node.left) and _expr(node.right)
    if isinstance(node, nodes.Not):
        return _expr(node.node)
    if isinstance(node, nodes.Filter | nodes.Test):
        allowed = LINEAR_FILTERS if isinstance(node, nodes.Filter) else LINEAR_TESTS
        return (
            node.name in allowed
            and node.node is not None
            and _expr(node.node)
            and all(_const(a) for a in node.args)
            and all(_const(k.value) for k in node.kwargs)
            and node.dyn_args is None
            and node.dyn_kwargs is None
        )
    return False


def all_bounded(value: Any) -> bool:
    """Whether every template in ``value`` (a string, or dicts and lists of them) is bounded."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not is_bounded(item):
                return False
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return True


__all__ = ["LINEAR_FILTERS", "all_bounded", "has_template", "is_bounded"]
