"""Optional OpenTelemetry tracing, off by default (docs/deployment.md "Tracing").

`configure(endpoint)` turns it on: spans go over OTLP/gRPC to the collector at `endpoint`, through
lens-serve's own TracerProvider (the process-wide one is left alone, so vLLM's own tracing options
stay independent). While it is off, `request_span` and `span` return one shared no-op context
manager: no span objects, no context changes, and the SDK is never imported. The OpenTelemetry API
is a dependency; the SDK and the OTLP exporter are the `tracing` extra.

Spans: one per call (`request_span`: the gRPC interceptor, the HTTP middleware) and, under it,
`choose_wc`, `engine` and `shadow` (`span`). The current span lives in a ContextVar of this module
rather than in OpenTelemetry's context (attach/detach): a span can stay open across the yields of a
response stream, which gRPC may close from another context (the garbage collector), where
OpenTelemetry's detach fails and logs an error."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.util.types import AttributeValue

from lens_serve import log

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

logger = logging.getLogger(__name__)

Parent = Context
"""A position in a trace, captured with `current` in one task to parent spans in another."""
Span = trace.Span
"""What `request_span` and `span` yield (INVALID_SPAN, which ignores everything, while off)."""

_OFF: AbstractContextManager[trace.Span] = contextlib.nullcontext(trace.INVALID_SPAN)
"""Every span while tracing is off (INVALID_SPAN ignores attributes and statuses)."""

_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None
"""Set while tracing is on; None: every span is `_OFF`."""

_PARENT: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "lens_trace_parent", default=None
)
"""The innermost open span of this task, as a context to start children in."""
_REQUEST_SPAN: contextvars.ContextVar[trace.Span | None] = contextvars.ContextVar(
    "lens_request_span", default=None
)
"""The call's span: the domain binds the request's ids (log.py) after it was opened."""


def configure(endpoint: str) -> None:
    """Trace to the OTLP/gRPC collector at `endpoint` (e.g. http://otel-collector:4317; http://
    sends plaintext); empty leaves tracing off. The standard OTEL_* variables still apply: headers,
    certificates and timeouts of the exporter (OTEL_EXPORTER_OTLP_*), OTEL_SERVICE_NAME (default
    lens-serve), OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG) and OTEL_BSP_*.

    Raises RuntimeError when the exporter is not installed (the `tracing` extra)."""
    if not endpoint:
        return
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            f"otel_endpoint is set but OpenTelemetry's SDK or OTLP exporter is missing ({exc}): "
            "pip install 'lens-serve[tracing]'"
        ) from exc
    start(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    logger.info("tracing: spans go to %s", endpoint)


def start(processor: SpanProcessor) -> None:
    """Trace from now on, every span ending in `processor` (`configure` gives it a batching OTLP
    exporter; tests an in-memory one). Replaces, after shutting it down, an earlier provider."""
    global _provider, _tracer
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    shutdown()
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or "lens-serve"})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(processor)
    _tracer = _provider.get_tracer("lens_serve")


def shutdown() -> None:
    """Send the spans still buffered and turn tracing off (the server's last step)."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider, _tracer = None, None


def current() -> Parent | None:
    """The span of the call in progress, to parent work the call leaves for another task (a shadow
    job); None when tracing is off or no call is in progress."""
    call = _REQUEST_SPAN.get()
    return None if call is None else trace.set_span_in_context(call)


def request_span(
    name: str,
    attributes: Mapping[str, AttributeValue],
    headers: Iterable[tuple[str | bytes, str | bytes]],
) -> AbstractContextManager[trace.Span]:
    """The span of one call (a server span), open while the call runs. It continues the caller's
    trace when `headers` (gRPC metadata, HTTP headers) carry a W3C `traceparent`. Exceptions are
    not recorded on it: the caller knows the call's status (`set_failed`)."""
    if _tracer is None:
        return _OFF
    return _request_span(_tracer, name, attributes, headers)


def span(
    name: str, *, parent: Parent | None = None, **attributes: AttributeValue
) -> AbstractContextManager[trace.Span]:
    """A span under the innermost open one (or under `parent`), with `attributes` as
    `lens.<name>`, plus the request's ids from the log context (also written onto the call's span,
    which was opened before the domain bound them). An exception leaving it marks it failed."""
    if _tracer is None:
        return _OFF
    return _span(_tracer, name, parent, attributes)


def set_failed(span: trace.Span, status: str) -> None:
    """Mark a call's span failed with `status` (a gRPC status name: the error metrics' code)."""
    span.set_status(trace.Status(trace.StatusCode.ERROR, status))


@contextlib.contextmanager
def _request_span(
    tracer: trace.Tracer,
    name: str,
    attributes: Mapping[str, AttributeValue],
    headers: Iterable[tuple[str | bytes, str | bytes]],
) -> Iterator[trace.Span]:
    carrier = {_text(key).lower(): _text(value) for key, value in headers}
    caller = propagate.extract(carrier)
    call = tracer.start_span(name, caller, trace.SpanKind.SERVER, attributes)
    tokens = _PARENT.set(trace.set_span_in_context(call)), _REQUEST_SPAN.set(call)
    try:
        yield call
    finally:
        call.end()
        with contextlib.suppress(ValueError):  # closed from another context: see the module doc
            _REQUEST_SPAN.reset(tokens[1])
            _PARENT.reset(tokens[0])


@contextlib.contextmanager
def _span(
    tracer: trace.Tracer,
    name: str,
    parent: Parent | None,
    attributes: Mapping[str, AttributeValue],
) -> Iterator[trace.Span]:
    ids = _request_ids()
    call = _REQUEST_SPAN.get()
    if ids and call is not None:
        call.set_attributes(ids)
    tagged = {f"lens.{key}": value for key, value in attributes.items()} | ids
    context = parent if parent is not None else _PARENT.get()
    child = tracer.start_span(name, context, attributes=tagged)
    token = _PARENT.set(trace.set_span_in_context(child))
    try:
        yield child
    except Exception as exc:
        child.record_exception(exc)
        child.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        child.end()
        with contextlib.suppress(ValueError):  # closed from another context: see the module doc
            _PARENT.reset(token)


def _request_ids() -> dict[str, AttributeValue]:
    ids: dict[str, AttributeValue] = {}
    if request_id := log.REQUEST_ID.get():
        ids["lens.request_id"] = request_id
    if session_id := log.SESSION_ID.get():
        ids["lens.session_id"] = session_id
    return ids


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
