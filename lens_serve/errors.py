"""The lens-serve error tree. Each class names the gRPC status it maps to; the mapping itself lives
in one place (the server's interceptor), so domain code never imports grpc."""

from __future__ import annotations


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
