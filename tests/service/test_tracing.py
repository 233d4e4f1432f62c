"""Tracing (lens_serve/tracing.py) through the real gRPC server and interceptor, on a FakeEngine
and a real redis-server: the span of a Generate call, its choose_wc and engine spans, the shadow
job's span under it, the caller's trace continued, a failed call's status, and nothing at all
while tracing is off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from lens_serve import tracing
from lens_serve.aio import cancel_and_wait
from lens_serve.service.composition import build_servicers
from lens_serve.service.lens_service import LensService
from lens_serve.service.server import build_server
from lens_serve.v1 import lens_serve_pb2 as pb
from lens_serve.v1 import lens_serve_pb2_grpc as pb_grpc
from tests.service.test_lens_service import make_service

GENERATE = "lens_serve.v1.LensServe/Generate"
CALLER_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN_ID = 0xB7AD6B7169203331


@asynccontextmanager
async def serving(redis: Redis) -> AsyncIterator[tuple[pb_grpc.LensServeAsyncStub, LensService]]:
    """The production server around a service that shadow-scores every request."""
    service = make_service(redis, shadow_rate=1.0, host="127.0.0.1", port=0)
    serve_servicer, admin_servicer = build_servicers(service)
    server, port = build_server(
        service.settings,
        serve_servicer=serve_servicer,
        admin_servicer=admin_servicer,
        health=health.aio.HealthServicer(),
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.LensServeStub(channel), service
    finally:
        await server.stop(grace=None)
        await service.aclose()


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    found = {span.name: span for span in exporter.get_finished_spans()}
    assert len(found) == len(exporter.get_finished_spans()), "one span per name expected"
    return found


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


async def test_generate_call_has_choose_wc_engine_and_shadow_spans_under_it(
    redis_client: Redis, spans: InMemorySpanExporter
) -> None:
    caller = f"00-{CALLER_TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"
    async with serving(redis_client) as (stub, service):
        assert service.shadow is not None
        worker = asyncio.create_task(service.shadow.run())
        try:
            session = await stub.CreateSession(pb.CreateSessionRequest())
            request = pb.GenerateRequest(session_id=session.session_id, prompt="x" * 300)
            responses = [
                r async for r in stub.Generate(request, metadata=[("traceparent", caller)])
            ]
            await service.shadow.drain()
        finally:
            await cancel_and_wait([worker])
    request_id = responses[-1].request_id
    found = by_name(spans)
    assert set(found) == {
        "lens_serve.v1.LensServe/CreateSession",
        GENERATE,
        "choose_wc",
        "engine",
        "shadow",
    }
    call = found[GENERATE]
    assert call.kind is trace.SpanKind.SERVER
    # The caller's trace goes on: its span is the call's parent, and every span is in its trace.
    assert (call.context.trace_id, parent_id(call)) == (CALLER_TRACE_ID, CALLER_SPAN_ID)
    assert call.attributes is not None
    assert dict(call.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "lens_serve.v1.LensServe",
        "rpc.method": "Generate",
        "rpc.grpc.status_code": 0,
        "lens.request_id": request_id,
        "lens.session_id": session.session_id,
    }
    for name in ("choose_wc", "engine", "shadow"):
        child = found[name]
        assert (child.context.trace_id, parent_id(child)) == (CALLER_TRACE_ID, call.context.span_id)
        assert child.attributes is not None
        assert child.attributes["lens.request_id"] == request_id
        assert child.attributes["lens.session_id"] == session.session_id
    assert found["choose_wc"].attributes["lens.policy"] == "lens"  # type: ignore[index]
    assert call.status.status_code is trace.StatusCode.UNSET


async def test_failed_call_span_carries_its_status(
    redis_client: Redis, spans: InMemorySpanExporter
) -> None:
    async with serving(redis_client) as (stub, _):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetSession(pb.GetSessionRequest(session_id="f" * 32))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    [call] = spans.get_finished_spans()
    assert call.name == "lens_serve.v1.LensServe/GetSession" and call.parent is None
    assert call.attributes is not None
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert call.status.status_code is trace.StatusCode.ERROR
    assert call.status.description == "NOT_FOUND"


async def test_tracing_off_installs_nothing_and_spans_are_no_ops(redis_client: Redis) -> None:
    tracing.configure("")  # the default: no endpoint
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    with tracing.request_span("call", {}, ()) as call, tracing.span("engine", rows=1) as span:
        assert call is span is trace.INVALID_SPAN and tracing.current() is None
    async with serving(redis_client) as (stub, _):
        session = await stub.CreateSession(pb.CreateSessionRequest())
        request = pb.GenerateRequest(session_id=session.session_id, prompt="x" * 50)
        assert [r async for r in stub.Generate(request)][-1].finish_reason
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
