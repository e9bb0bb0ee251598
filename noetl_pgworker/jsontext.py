"""JSON and text that PostgreSQL can store: compact JSON for jsonb, clean text for text columns.

PostgreSQL's jsonb refuses NaN, U+0000 and lone surrogates, and its ``text`` refuses NUL; a
tool's output may hold any of them. Everything the worker stores or sends goes through here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .redact import redact_secrets

#: ``noetl.command.error`` holds at most this many characters.
ERROR_LIMIT = 2000


class NotSerialisable(ValueError):
    """A value cannot be stored as JSON."""


#: What PostgreSQL cannot store in text or jsonb: NUL, and surrogates (a Python str may hold a
#: lone one, e.g. from ``"\\ud800"`` in a tool's output; it cannot be encoded as UTF-8).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """``text`` with what PostgreSQL cannot store replaced by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


def dumps(value: Any) -> str:
    """Compact JSON that PostgreSQL's jsonb accepts (no NaN, no NUL, no lone surrogates)."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise NotSerialisable(f"result is not JSON-serialisable: {storable(str(exc))}") from exc
    except RecursionError as exc:
        raise NotSerialisable("result is not JSON-serialisable: nested too deeply") from exc
    # NUL comes out escaped; a lone surrogate raw, and only in text that is not ASCII (which
    # Python knows without reading it: the scan is skipped for most outcomes).
    if "\\u0000" in text or (not text.isascii() and _UNSTORABLE.search(text)):
        # Replace rather than fail the whole batch (jsonb rejects U+0000 and lone surrogates).
        text = json.dumps(_scrub(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def clean_text(text: str | None, limit: int = ERROR_LIMIT) -> str | None:
    """Text safe for a ``text`` column: no NUL or surrogate, no password, at most ``limit``
    characters."""
    if text is None:
        return None
    text = redact_secrets(storable(text))
    if len(text) > limit:
        marker = "… [truncated]"
        text = text[: limit - len(marker)] + marker
    return text
