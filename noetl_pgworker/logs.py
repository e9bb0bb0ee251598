"""Log output for the CLI: human text or one JSON object per line.

Library modules only call ``logging.getLogger(__name__)``; handlers are installed here, by the
CLI, never at import time. Every record passes :class:`RedactingFilter` on its way out, so no
password in a URL or a ``password=`` value reaches the log, whoever wrote the message.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from .redact import redact_secrets

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class RedactingFilter(logging.Filter):
    """Removes passwords from a record's message, its extra fields and its traceback."""

    _traceback = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let the handler report it as usual
            return True
        record.msg, record.args = redact_secrets(message), None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and not key.startswith("_") and isinstance(value, str):
                setattr(record, key, redact_secrets(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = self._traceback.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_secrets(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, worker_id: str | None = None) -> None:
        super().__init__()
        self.worker_id = worker_id

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker_id:
            payload["worker_id"] = self.worker_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exception"] = record.exc_text
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def configure(level: str = "info", fmt: str = "text", worker_id: str | None = None) -> None:
    """Send the package's logs, and psycopg's, to stderr in the chosen format, redacted."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker_id) if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger("noetl_pgworker")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # The driver's own records (pool errors quote connection problems) take the same way out.
    driver = logging.getLogger("psycopg")
    driver.handlers[:] = [handler]
    driver.propagate = False
    # psycopg_pool logs every failed reconnection attempt at WARNING; the worker already says
    # once per outage that the database is gone.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
