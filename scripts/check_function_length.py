#!/usr/bin/env python3
"""Refuse functions longer than a limit (default 60 lines).

A function's length counts every line from its first decorator (or its ``def``) to its last
line, signature and docstring included, as Python's AST reports them. Nested functions are
measured on their own as well. Prints every offender as ``file:line name length`` and exits 1
when there is any; ruff has no rule for this.

    python scripts/check_function_length.py [--max 60] [paths ...]   (default: noetl_pgworker)
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path


def function_lengths(path: Path) -> Iterator[tuple[int, str, int]]:
    """Yield (first line, qualified name, length in lines) for every function in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[int, str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                end = child.end_lineno or child.lineno
                name = f"{prefix}{child.name}"
                yield first, name, end - first + 1
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def python_files(paths: list[str]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            yield from sorted(path.rglob("*.py"))
        else:
            yield path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=60, help="longest allowed function, in lines")
    parser.add_argument("--over", type=int, help="list functions over this length (no failure)")
    parser.add_argument("paths", nargs="*", default=["noetl_pgworker"])
    args = parser.parse_args(argv)
    limit = args.over if args.over is not None else args.max
    found = [
        (length, f"{path}:{line}", name)
        for path in python_files(args.paths)
        for line, name, length in function_lengths(path)
        if length > limit
    ]
    for length, where, name in sorted(found, reverse=True):
        print(f"{where} {name} {length}")
    if args.over is not None or not found:
        return 0
    print(f"{len(found)} function(s) longer than {args.max} lines", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
