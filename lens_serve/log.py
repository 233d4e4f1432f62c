"""Logging set-up for the lens-serve processes: text lines by default, one JSON object per line
with `json=True` (for log collectors). Logs go to stderr; stdout is kept for the `listening on`
line. (Not named logging.py, which would shadow the standard library.) Every record of a request
carries its request and session ids (`request_context`, `RequestIdFilter`)."""

from __future__ import annotations

import contextlib
import contextvars
import json as _json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s:%(request_ids)s %(message)s"

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("lens_request_id", default="")
"""The id of the request the current task serves ("" outside a request)."""
SESSION_ID: contextvars.ContextVar[str] = contextvars.ContextVar("lens_session_id", default="")
"""The session of the request the current task serves ("" for none)."""


@contextlib.contextmanager
def request_context(request_id: str, session_id: str = "") -> Iterator[None]:
    """Tag every log record emitted inside with `request_id` and `session_id`."""
    tokens = REQUEST_ID.set(request_id), SESSION_ID.set(session_id)
    try:
        yield
    finally:
        # An async generator closed from another task (or by the garbage collector) runs this in
        # another context, where the tokens are foreign: the ids die with their own context then.
        with contextlib.suppress(ValueError):
            SESSION_ID.reset(tokens[1])
            REQUEST_ID.reset(tokens[0])


def is_log_json_env() -> bool:
    """LENS_LOG_JSON, as every lens-serve process reads it (1, true or yes: JSON lines)."""
    return os.environ.get("LENS_LOG_JSON", "").lower() in ("1", "true", "yes")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` and `session_id` (from the context; "" outside a request) to every record,
    and `request_ids`, the text formatter's " request=<id> session=<id>" (empty when unset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id, session_id = REQUEST_ID.get(), SESSION_ID.get()
        record.request_id = request_id
        record.session_id = session_id
        text = f" request={request_id}" if request_id else ""
        record.request_ids = text + (f" session={session_id}" if session_id else "")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message, exc_info if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "session_id"):
            value = getattr(record, key, "")
            if value:
                entry[key] = value
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
    handler.addFilter(RequestIdFilter())  # on the handler: records of every logger pass it
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
