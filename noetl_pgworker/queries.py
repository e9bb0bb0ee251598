"""Named SQL statements, loaded once from the project's ``.sql`` files.

A file holds blocks that start with ``-- name: <name>``; the comment lines right after the name
are the statement's description, the rest is the statement. Values are always bound as named
parameters (``%(name)s``); no identifier or value is ever formatted into the text.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from pathlib import Path

from psycopg import sql

_NAME = re.compile(r"^-- name: (?P<name>[a-z_]+)\s*$", re.MULTILINE)


def sql_dir() -> Path:
    """The directory holding the ``.sql`` files: inside the installed package, or the checkout's."""
    packaged = importlib.resources.files("noetl_pgworker") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parent.parent / "sql"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("noetl-pgworker's sql/ directory is missing from the installation")


def read_sql_file(name: str) -> str:
    """The text of one ``.sql`` file, for scripts applied whole (schema)."""
    return (sql_dir() / name).read_text(encoding="utf-8")


def parse_queries(text: str) -> dict[str, str]:
    """Split a file of named statements into ``{name: statement}``."""
    queries: dict[str, str] = {}
    matches = list(_NAME.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end() : end].strip()
        lines = body.splitlines()
        while lines and lines[0].startswith("--"):
            lines.pop(0)  # the description
        statement = "\n".join(lines).strip().rstrip(";").strip()
        if not statement:
            raise ValueError(f"query {match['name']!r} is empty")
        if match["name"] in queries:
            raise ValueError(f"query {match['name']!r} is defined twice")
        queries[match["name"]] = statement
    return queries


@functools.cache
def all_queries() -> dict[str, sql.SQL]:
    return {
        name: sql.SQL(statement)  # trusted text: our own file
        for name, statement in parse_queries(read_sql_file("queries.sql")).items()
    }


def query(name: str) -> sql.SQL:
    """The named statement from ``sql/queries.sql``."""
    try:
        return all_queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in queries.sql") from None
