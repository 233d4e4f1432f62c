"""The one server interceptor: per RPC it authorizes the caller, times and traces the call, and maps
errors to gRPC status codes. This is the only place that turns exceptions into statuses, so
servicers and domain code just raise `LensError`s.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from contextlib import AbstractContextManager, aclosing
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from lens_serve import metrics, tracing
from lens_serve.errors import InvalidRequest
from lens_serve.service import auth
from lens_serve.service.config import Settings
from lens_serve.service.statuses import Failure, failure_of

logger = logging.getLogger(__name__)

# Exceptions that must propagate untouched: an abort already carries its status, and cancellation
# (client went away, server stopping) must reach asyncio. GeneratorExit closes a stream wrapper.
_PASS_THROUGH: tuple[type[BaseException], ...] = (
    grpc.aio.AbortError,
    asyncio.CancelledError,
    GeneratorExit,
)


@dataclass(frozen=True)
class _Method:
    """A method, as the auth rules and the error log name it (`path`) and as metrics and traces
    label it (`service`, `name`)."""

    path: str  # /lens_serve.v1.LensServe/Generate
    service: str  # lens_serve.v1.LensServe
    name: str  # Generate

    @classmethod
    def of(cls, path: str) -> _Method:
        service, _, name = path.removeprefix("/").rpartition("/")
        return cls(path, service, name)


class _Outcome:
    """The status an RPC ended with, as far as the interceptor can see it."""

    __slots__ = ("code", "ended")

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.ended = False
        """The handler has run to its end (returned or raised)."""


class LensInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler (all four arities) so that, in the RPC's own task, the caller is
    authorized (`auth.current_owner()` works in the handler), the call is counted
    (`lens_rpc_started_total`), timed (`lens_rpc_latency_seconds`) and traced (its span, when
    tracing is on), and errors become statuses (counted in `lens_rpc_errors_total`):
    `grpc.aio.AbortError` and `asyncio.CancelledError` are re-raised as they are, every other error
    gets the status `statuses.failure_of` gives it (the map the HTTP endpoint shares).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        method = _Method.of(handler_call_details.method)
        if handler.request_streaming and handler.response_streaming:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        if behavior is None:
            return handler
        # gRPC picks how to drive a streaming handler from its function type (coroutine using
        # context.write vs. generator), so the wrapper keeps the handler's kind.
        if not handler.response_streaming or inspect.iscoroutinefunction(behavior):
            wrapped: Callable[..., Any] = self._wrap_coroutine(method, behavior)
        else:
            wrapped = self._wrap_generator(method, behavior)
        return factory(
            wrapped,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap_coroutine(
        self, method: _Method, behavior: Callable[..., Any]
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            outcome = _counted(method, context)
            start = time.perf_counter()
            with _span(method, context) as span:
                try:
                    self._authorize(method, context)
                    result = behavior(_checked(request), context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                except _PASS_THROUGH as exc:
                    outcome.code = _pass_through_code(exc, context)
                    raise
                except Exception as exc:
                    await _abort(exc, method, context, outcome)
                finally:
                    outcome.ended = True
                    _finish(method, start, span, outcome.code or _context_code(context))

        return wrapper

    def _wrap_generator(
        self, method: _Method, behavior: Callable[..., Any]
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        async def wrapper(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            outcome = _counted(method, context)
            start = time.perf_counter()
            with _span(method, context) as span:
                try:
                    self._authorize(method, context)
                    async with aclosing(relay(behavior(_checked(request), context))) as responses:
                        async for response in responses:
                            yield response
                except _PASS_THROUGH as exc:
                    outcome.code = _pass_through_code(exc, context)
                    raise
                except Exception as exc:
                    await _abort(exc, method, context, outcome)
                finally:
                    outcome.ended = True
                    _finish(method, start, span, outcome.code or _context_code(context))

        return wrapper

    def _authorize(self, method: _Method, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        owner = auth.authorize(method.path, context.invocation_metadata(), self._settings)
        auth.bind_owner(owner)


def _span(
    method: _Method, context: grpc.aio.ServicerContext[Any, Any]
) -> AbstractContextManager[tracing.Span]:
    """The call's span (OpenTelemetry's RPC conventions), continuing the caller's trace."""
    attributes = {"rpc.system": "grpc", "rpc.service": method.service, "rpc.method": method.name}
    name = f"{method.service}/{method.name}"
    return tracing.request_span(name, attributes, context.invocation_metadata() or ())


def _finish(
    method: _Method, start: float, span: tracing.Span, code: grpc.StatusCode | None
) -> None:
    """Time the call and give its span the status it ended with (as far as it is known here:
    `_counted` has the last word for the metrics)."""
    metrics.RPC_LATENCY_SECONDS.labels(method.service, method.name).observe(
        time.perf_counter() - start
    )
    code = code or grpc.StatusCode.OK
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        tracing.set_failed(span, code.name)


class _Undecodable:
    """Stands for a request message protobuf could not parse (invalid UTF-8 in a string field,
    a wrong wire type): gRPC would answer INTERNAL for a deserializer error, but it is bad input."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def invalid(self) -> InvalidRequest:
        return InvalidRequest("request", f"cannot decode the message ({self.error})")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError and friends: reported per call as INVALID_ARGUMENT
            return _Undecodable(e)

    return decode


def _checked(request: Any) -> Any:
    """Raise for an undecodable request; for a request stream, when its bad message arrives."""
    if isinstance(request, _Undecodable):
        raise request.invalid()
    if isinstance(request, AsyncIterable):
        return _checked_stream(request)
    return request


async def _checked_stream(requests: AsyncIterable[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.invalid()
        yield request


async def relay(responses: object) -> AsyncGenerator[Any, None]:
    """Re-yields what a streaming handler produced, whatever its shape: an async iterable, a plain
    iterable, or an awaitable (a handler that writes with context.write and returns None).

    Closing the relay closes an async-generator handler at once, in this task, so its own
    `finally` (e.g. aborting an engine request) runs now rather than later from the GC.
    """
    if inspect.isawaitable(responses):
        await responses
    elif inspect.isasyncgen(responses):
        async with aclosing(responses):
            async for response in responses:
                yield response
    elif isinstance(responses, AsyncIterable):
        async for response in responses:
            yield response
    elif isinstance(responses, Iterable):
        for response in responses:
            yield response
    else:
        raise TypeError(f"a streaming handler returned {type(responses).__name__}")


def _pass_through_code(
    exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]
) -> grpc.StatusCode:
    if isinstance(exc, grpc.aio.AbortError):  # the handler aborted itself: its code is set
        return _context_code(context) or grpc.StatusCode.UNKNOWN
    # CancelledError: the client went away (or the server is stopping). GeneratorExit: gRPC stopped
    # reading this stream before its end, which it does only when the call ends that way too.
    return grpc.StatusCode.CANCELLED


async def _abort(
    exc: Exception,
    method: _Method,
    context: grpc.aio.ServicerContext[Any, Any],
    outcome: _Outcome,
) -> NoReturn:
    """Aborts the call (raises grpc.aio.AbortError) with the status the one error map gives, and
    its `google.rpc.Status` details (`status_details`) in the trailers."""
    failure = failure_of(exc, method.path, logger)
    code = grpc.StatusCode[failure.status]
    outcome.code = code
    await context.abort_with_status(rpc_status.to_status(status_details(failure)))


def status_details(failure: Failure) -> status_pb2.Status:
    """The `google.rpc.Status` of a failure (docs/design.md §7): its code and message, with a
    `BadRequest` field violation when the failure names a field (INVALID_ARGUMENT, or a size
    limit's RESOURCE_EXHAUSTED) and a `RetryInfo` when a retry after a delay can succeed."""
    status = status_pb2.Status(
        code=grpc.StatusCode[failure.status].value[0], message=failure.message
    )
    if failure.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=failure.field, description=failure.message
        )
        _add_detail(status, error_details_pb2.BadRequest(field_violations=[violation]))
    if failure.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(failure.retry_after * 1e9))
        _add_detail(status, error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def _add_detail(status: status_pb2.Status, detail: Any) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)
    status.details.append(packed)


def _context_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode | None:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else None


def _counted(method: _Method, context: grpc.aio.ServicerContext[Any, Any]) -> _Outcome:
    """Counts the call started (`lens_rpc_started_total`), and returns its outcome, which is
    counted in `lens_rpc_errors_total` exactly once, when gRPC reports the call done.

    Not when the handler unwinds: a stream cancelled while gRPC was sending one of its responses is
    abandoned mid-stream, and gRPC leaves closing it (GeneratorExit) to the garbage collector:
    before or after the call is done, or much later. (`context.cancelled()` does not help: it
    reports only a CANCELLED status the server set itself.)"""
    metrics.RPC_STARTED_TOTAL.labels(method.service, method.name).inc()
    outcome = _Outcome()

    def count(_: object) -> None:
        if outcome.code is not None:
            code: grpc.StatusCode | None = outcome.code
        elif not outcome.ended:  # abandoned mid-stream: the call was cancelled
            code = grpc.StatusCode.CANCELLED
        else:  # a handler may also end a call with context.set_code() and a normal return
            code = _context_code(context)
        if code is not None and code is not grpc.StatusCode.OK:
            metrics.RPC_ERRORS_TOTAL.labels(method.service, method.name, code.name).inc()

    # The stubs type the callback as a class of their own; gRPC calls it with the context.
    context.add_done_callback(count)  # type: ignore[arg-type]
    return outcome
