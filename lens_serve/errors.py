"""The lens-serve error tree. Each class names the gRPC status it maps to; the mapping itself lives
in one place (the server's interceptor), so domain code never imports grpc."""

from __future__ import annotations

MAX_ECHO_CHARS = 64
"""Most characters of a client's value that an error message quotes."""
MAX_MESSAGE_CHARS = 512
"""Most characters of any error message sent to a client."""


def shorten(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters and marked when cut.

    Messages quote what a client sent, and a status message travels in the HTTP/2 trailers: a
    client refuses trailers over its metadata limit (8 KiB by default) and reports
    RESOURCE_EXHAUSTED instead of the real status. Logs stay readable too."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} chars)"


def echo(value: object) -> str:
    """`repr(value)` for an error message that quotes a client's value, at most MAX_ECHO_CHARS."""
    return shorten(repr(value), MAX_ECHO_CHARS)


class LensError(Exception):
    """Base class. `status` is the name of a `grpc.StatusCode` member."""

    status = "INTERNAL"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self!s})"


class InvalidRequest(LensError, ValueError):
    """A client-supplied value is wrong. The message always names the offending field."""

    status = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(LensError, KeyError):
    status = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Overloaded(LensError):
    status = "RESOURCE_EXHAUSTED"


class LimitExceeded(LensError):
    """A request is larger than a configured limit allows (an upload's bytes or tokens). Unlike
    `Overloaded`, the same request fails again: the client must send less. The message names the
    field."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotReady(LensError):
    status = "UNAVAILABLE"


class InvariantViolation(LensError, AssertionError):
    """A working context broke a docs/design.md §2 invariant: a bug in lens-serve, never the
    client's."""

    status = "INTERNAL"


class Unauthenticated(LensError):
    """The call carries no valid credentials (missing or unknown bearer token)."""

    status = "UNAUTHENTICATED"


class PermissionDenied(LensError):
    """The caller is authenticated but may not call this method."""

    status = "PERMISSION_DENIED"
