"""Logging set-up for the lens-serve processes: text lines by default, one JSON object per line
with `json=True` (for log collectors). Logs go to stderr; stdout is kept for the `listening on`
line. (Not named logging.py, which would shadow the standard library.)"""

from __future__ import annotations

import json as _json
import logging
import os
import sys
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message, exc_info if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return _json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    """Configures the root logger once for the process (replaces handlers set before), and points
    vLLM's own log handler at stderr too. Call it before vLLM is imported.

    Raises ValueError for an unknown level name.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level: unknown level {level!r}")
    # vLLM logs to stdout by default, which would bury the `listening on` line that launchers read
    # from stdout; an operator's own setting wins.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
