"""Log output for the CLI: human text or one JSON object per line.

Library modules only call ``logging.getLogger(__name__)``; handlers are installed here, by the
CLI, never at import time.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


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
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def configure(level: str = "info", fmt: str = "text", worker_id: str | None = None) -> None:
    """Send the package's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker_id) if fmt == "json" else TextFormatter())
    root = logging.getLogger("noetl_pgworker")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # psycopg_pool logs every failed reconnection attempt at WARNING; the worker already says
    # once per outage that the database is gone.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
