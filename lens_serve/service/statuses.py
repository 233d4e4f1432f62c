"""The one error -> status map, for every transport: the gRPC status an exception ends a call
with, what the client may read about it, and the HTTP status of each gRPC status. The gRPC
interceptor and the HTTP endpoint both ask `failure_of` (docs/design.md §7); no grpc here."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import redis.exceptions

from lens_serve.errors import MAX_MESSAGE_CHARS, LensError, LimitExceeded, shorten

# Infrastructure failures a client should retry, mapped here rather than wrapped at every call site.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # also BusyLoadingError (Redis replaying its AOF)
    redis.exceptions.TimeoutError,
)
_UNAVAILABLE_MESSAGE = "storage (redis) is unavailable; retry later"

HTTP_STATUS: dict[str, int] = {
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}
"""gRPC status name -> HTTP status, as google.rpc.Code documents it (what gRPC-HTTP gateways use).
Every status but OK."""
LIMIT_EXCEEDED_HTTP_STATUS = 413
"""A request over a size limit (`LimitExceeded`) fails again however often it is retried, and HTTP
clients (the OpenAI SDKs among them) retry every 429: it gets 413 Content Too Large instead."""
OVERLOADED_RETRY_AFTER_S = 1.0
"""The delay a RESOURCE_EXHAUSTED answer for a full server (`Overloaded`, not `LimitExceeded`)
suggests before a retry (google.rpc.RetryInfo on gRPC)."""


@dataclass(frozen=True)
class Failure:
    """What a client is told about an error."""

    status: str
    """The name of a gRPC status code (a key of HTTP_STATUS)."""
    message: str
    """Safe to send: client values cut short, no internals."""
    field: str | None
    """The request field at fault, when the error names one."""
    http_status: int
    retry_after: float | None = None
    """Seconds to wait before retrying the same request, when a retry can succeed (a full server);
    None when it would fail again or the status says it all."""


def failure_of(exc: Exception, method: str, log: logging.Logger) -> Failure:
    """How a call to `method` that raised `exc` ends, logged on `log`:

    - `LensError` -> its `status`, with its message (a bug, INTERNAL, is logged with its traceback);
    - redis connection/timeout errors -> UNAVAILABLE;
    - `NotImplementedError` -> UNIMPLEMENTED;
    - anything else -> logged with the method name, INTERNAL with a generic message and an error id.
    """
    if isinstance(exc, LensError):
        status = exc.status
        if status not in HTTP_STATUS:
            log.error("%s: %s has unknown status %r", method, type(exc).__name__, status)
            status = "INTERNAL"
        if status == "INTERNAL":
            log.error("%s failed", method, exc_info=exc)  # our bug, not the client's
        else:
            log.debug("%s: %s %s", method, status, exc)
        # Messages quote client values (ids, names); those raised below the service are not cut
        # where they are made, so every message is cut here too.
        message = shorten(str(exc), MAX_MESSAGE_CHARS)
        http_status = HTTP_STATUS[status]
        if isinstance(exc, LimitExceeded):
            http_status = LIMIT_EXCEEDED_HTTP_STATUS
        retry_after = (
            OVERLOADED_RETRY_AFTER_S
            if status == "RESOURCE_EXHAUSTED" and not isinstance(exc, LimitExceeded)
            else None
        )
        return Failure(status, message, getattr(exc, "field", None), http_status, retry_after)
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        log.warning("%s: redis unavailable: %s", method, exc)
        return Failure("UNAVAILABLE", _UNAVAILABLE_MESSAGE, None, HTTP_STATUS["UNAVAILABLE"])
    if isinstance(exc, NotImplementedError):
        message = f"{method} is not implemented"
        return Failure("UNIMPLEMENTED", message, None, HTTP_STATUS["UNIMPLEMENTED"])
    # The id ties the client's report to the log line without exposing internals; 8 hex digits are
    # plenty to find one line among a day's errors.
    error_id = uuid.uuid4().hex[:8]
    log.error("%s: unhandled error (error id %s)", method, error_id, exc_info=exc)
    message = f"internal error (error id {error_id})"
    return Failure("INTERNAL", message, None, HTTP_STATUS["INTERNAL"])
